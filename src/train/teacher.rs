//! The frozen teacher of a distillation run.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::TrainConfig;
use super::dataset::{self, RunData};
use crate::data::{Batch, Loader, Sample};
use crate::eval::{images_tensor, logits_rows};
use crate::io::resolved;
use crate::losses::DistillLoss;
use crate::models::Network;
use crate::run::Run;

/// A trained network in inference mode (BatchNorm running statistics, no autodiff graph,
/// never updated) and the distillation loss that uses its logits.
pub struct Teacher {
    /// The network, on a plain (non-autodiff) device.
    pub net: Network,
    /// The loss comparing student and teacher logits.
    pub loss: Box<dyn DistillLoss>,
    device: Device,
}

impl Teacher {
    /// Loads the frozen teacher of a distillation config and checks it fits the data; the
    /// student takes the teacher's normalization unless one is given (it must then match).
    pub fn load(config: &mut TrainConfig, data: &RunData, device: &Device) -> Result<Option<Self>> {
        let classes = data.classes.as_slice();
        let Some(tc) = config.teacher.clone() else {
            return Ok(None);
        };
        let run = Run::open(&tc.run).context("cannot load the teacher")?;
        for (name, mine, theirs) in [
            ("mean", &mut config.mean, run.config.mean),
            ("std", &mut config.std, run.config.std),
        ] {
            match (*mine, theirs) {
                (None, t) => *mine = t,
                (Some(m), Some(t)) if m != t => bail!(
                    "--{name} {m:?} differs from the teacher's {t:?} ({}): the teacher must see the same normalization; drop --{name}",
                    tc.run.display()
                ),
                _ => {}
            }
        }
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
        let net = run.load_network(&tc.checkpoint, device)?.valid();
        Ok(Some(Self {
            net,
            loss: tc.kd.build(),
            device: device.clone(),
        }))
    }

    /// Teacher logits for a batch (the exact images the student sees), outside any graph.
    pub fn logits(&self, batch: &Batch) -> Tensor<2> {
        self.forward(images_tensor(batch, &self.device))
    }

    /// Teacher logits for images already on [`Teacher::device`].
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.net.forward(images)
    }

    /// The plain (non-autodiff) device the teacher runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits of every image of a loader, indexed like its samples (the logit cache).
    pub fn logits_of_all(&self, loader: &Loader) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![Vec::new(); loader.len()];
        for batch in loader.epoch(0, 0) {
            let batch = batch?;
            for (row, &i) in logits_rows(self.logits(&batch))?
                .into_iter()
                .zip(&batch.indices)
            {
                out[i] = row;
            }
        }
        Ok(out)
    }
}

/// Refuses a student whose validation images include the teacher's training images (the
/// teacher's folder split with another seed or fraction, say): the teacher would have seen
/// the answers, and the comparison would flatter distillation. Skipped when the teacher's
/// data folder can no longer be read.
fn check_no_leak(
    run_dir: &Path,
    teacher: &TrainConfig,
    student_data: &Path,
    student_val: &[Sample],
) -> Result<()> {
    let Ok(teacher_data) = dataset::for_config(teacher) else {
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
