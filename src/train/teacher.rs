//! The frozen teacher of a distillation run: its network in inference mode, the checks that
//! it fits the student's data, and the cache of its outputs.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::data::tensors::{from_rows, images_tensor, rows};
use crate::data::{Loader, RunData, Sample};
use crate::io::resolved;
use crate::losses::Distiller;
use crate::models::{Network, Outputs};
use crate::ops::Ctx;
use crate::run::{Run, TeacherConfig, TrainConfig, files};

/// A trained network in inference mode (BatchNorm running statistics, no autodiff graph,
/// never updated) and the distillation method that reads its outputs.
pub struct Teacher {
    /// The network, on a plain (non-autodiff) device.
    pub net: Network,
    /// The method comparing student and teacher outputs.
    pub method: Box<dyn Distiller>,
    device: Device,
    cx: Ctx,
}

/// The CRC-32 of the teacher's checkpoint file (its checksum trailer). Refuses a teacher still training (its
/// checkpoints are still changing).
pub fn checkpoint_crc32(run: &Run, tc: &TeacherConfig) -> Result<u32> {
    if crate::io::is_locked(&run.dir.join(files::LOCK))? {
        bail!(
            "teacher {} is still training (its folder is locked): wait until it has finished",
            tc.run.display()
        );
    }
    crate::io::file_checksum(&run.checkpoint_path(tc.checkpoint)?)
}

/// Opens the teacher run of a distillation config and checks that it fits the student: the
/// same classes, image size and normalization, and no validation image of the student among
/// its training images.
pub fn open(config: &TrainConfig, tc: &TeacherConfig, data: &RunData) -> Result<Run> {
    let run = Run::open(&tc.run).context("cannot load the teacher")?;
    for (name, mine, theirs) in [
        ("mean", config.mean, run.config.mean),
        ("std", config.std, run.config.std),
    ] {
        if let (Some(m), Some(t)) = (mine, theirs)
            && m != t
        {
            bail!(
                "--{name} {m:?} differs from the teacher's {t:?} ({}): the teacher must see the same normalization; drop --{name}",
                tc.run.display()
            );
        }
    }
    let classes = data.classes.as_slice();
    if run.classes != classes {
        let (missing, extra) = crate::data::folder::class_difference(classes, &run.classes);
        bail!(
            "teacher {} was trained on other classes than {} (data only: {missing:?}, teacher only: {extra:?}{}): train the teacher on the same class folders",
            tc.run.display(),
            config.data.display(),
            if missing.is_empty() && extra.is_empty() {
                ", same names in another order"
            } else {
                ""
            }
        );
    }
    check_no_leak(&tc.run, &run.config, &config.data, &data.val)?;
    if run.config.image_size != config.image_size {
        bail!(
            "teacher {} uses image size {} but the student {}: use --image-size {}",
            tc.run.display(),
            run.config.image_size,
            config.image_size,
            run.config.image_size
        );
    }
    Ok(run)
}

impl Teacher {
    /// Loads the teacher network of `run` as `tc` says, on `device`, computing in the
    /// student's precision (`cx`).
    pub fn load(run: &Run, tc: &TeacherConfig, device: &Device, cx: Ctx) -> Result<Self> {
        let net = run.load_network(tc.checkpoint, device)?.valid();
        Ok(Self {
            net,
            method: tc.distiller(),
            device: device.clone(),
            cx,
        })
    }

    /// The teacher's outputs for images already on [`Teacher::device`]: logits, and pooled
    /// features when the method reads them.
    pub fn outputs(&self, images: Tensor<4>) -> Outputs {
        if self.method.needs_features() {
            self.net.outputs(images, &self.cx)
        } else {
            Outputs {
                logits: self.net.forward(images, &self.cx),
                features: None,
            }
        }
    }

    /// The plain (non-autodiff) device the teacher runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The outputs of every image of a loader, indexed like its samples (the teacher cache).
    pub fn outputs_of_all(&self, loader: &Loader) -> Result<OutputsCache> {
        let mut logits = vec![Vec::new(); loader.len()];
        let mut features = self.method.needs_features().then(|| logits.clone());
        for batch in loader.epoch(0, 0) {
            let batch = batch?;
            let out = self.outputs(images_tensor(&batch, &self.device));
            for (row, &i) in rows(out.logits)?.into_iter().zip(&batch.indices) {
                logits[i] = row;
            }
            if let (Some(cache), Some(f)) = (features.as_mut(), out.features) {
                for (row, &i) in rows(f)?.into_iter().zip(&batch.indices) {
                    cache[i] = row;
                }
            }
        }
        Ok(OutputsCache { logits, features })
    }
}

/// The teacher's outputs of every training image, computed once (training without random
/// augmentation shows it the same images every epoch).
pub struct OutputsCache {
    logits: Vec<Vec<f32>>,
    features: Option<Vec<Vec<f32>>>,
}

impl OutputsCache {
    /// The cached outputs of the samples `indices`, as tensors on `device`.
    pub fn outputs(&self, indices: &[usize], device: &Device) -> Outputs {
        let pick = |all: &[Vec<f32>]| from_rows(indices.iter().map(|&i| all[i].as_slice()), device);
        Outputs {
            logits: pick(&self.logits),
            features: self.features.as_deref().map(pick),
        }
    }
}

/// Refuses a student whose validation images include the teacher's training images (the
/// teacher's folder split with another seed or fraction, say): the teacher would have seen
/// the answers, and the comparison would flatter distillation. Where the teacher's data
/// folder cannot be read (moved, or a relative path from another working folder), the check
/// cannot be made, and a warning says so.
fn check_no_leak(
    run_dir: &Path,
    teacher: &TrainConfig,
    student_data: &Path,
    student_val: &[Sample],
) -> Result<()> {
    let Ok(teacher_data) = teacher.images() else {
        eprintln!(
            "warning: cannot read teacher {}'s data ({}) from here, so whether it trained on the student's validation images is not checked: run from the folder the teacher was trained in",
            run_dir.display(),
            teacher.data.display()
        );
        return Ok(());
    };
    let seen: HashSet<PathBuf> = teacher_data
        .train
        .iter()
        .map(|s| resolved(&s.path))
        .collect();
    // Copies count too (`kd split` copies files under their names): a file of the same
    // class and name with the same bytes. Only such name matches are read.
    let mut by_name: HashMap<(usize, &OsStr), Vec<&Path>> = HashMap::new();
    for s in &teacher_data.train {
        if let Some(name) = s.path.file_name() {
            by_name.entry((s.label, name)).or_default().push(&s.path);
        }
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    let same_bytes = |a: &Path, b: &Path| {
        size(a) == size(b)
            && matches!((std::fs::read(a), std::fs::read(b)), (Ok(x), Ok(y)) if x == y)
    };
    let is_copy = |s: &Sample| {
        s.path
            .file_name()
            .and_then(|n| by_name.get(&(s.label, n)))
            .is_some_and(|originals| originals.iter().any(|o| same_bytes(o, &s.path)))
    };
    let leaked: Vec<&Sample> = student_val
        .iter()
        .filter(|s| seen.contains(&resolved(&s.path)) || is_copy(s))
        .collect();
    let Some(first) = leaked.first() else {
        return Ok(());
    };
    let fix = if resolved(student_data) == resolved(&teacher.data) {
        format!(
            "pass --split-seed {} --val-fraction {} to validate on the teacher's held-out images, or split the folder once with `kd split`",
            teacher.data_seed(),
            teacher.val_fraction
        )
    } else {
        format!(
            "pass the teacher's --data {} (and its split), so that both hold out the same images",
            teacher.data.display()
        )
    };
    bail!(
        "{} of the {} validation images (e.g. {}) are training images of teacher {}, or copies of them (its data: {}, split seed {}, val fraction {}): {fix}",
        leaked.len(),
        student_val.len(),
        first.path.display(),
        run_dir.display(),
        teacher.data.display(),
        teacher.data_seed(),
        teacher.val_fraction,
    )
}
