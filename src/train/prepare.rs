//! Preparing a training run: the config checked against the data and any earlier run in the
//! folder, the folder locked and its config written, the images verified, the normalization
//! settled, the teacher loaded, and the model, optimizer and loop state built or restored.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;

use super::TrainOptions;
use super::projection::Projection;
use super::teacher::{self, OutputsCache, Teacher};
use crate::data::{CacheMode, Loader, RunData, Transform, channel_stats};
use crate::io::{ensure_dir, write_json};
use crate::models::memory::{self, Role};
use crate::models::{Network, weights};
use crate::ops::{Ctx, FusedAdam};
use crate::run::checkpoint::{DataFingerprint, LoopState, ResumeState};
use crate::run::{RunLock, TrainConfig, classes_map, files, resume};

/// Everything a run needs to train its epochs.
pub struct Prepared {
    /// The effective config (normalization filled in), as written to `config.json`.
    pub config: TrainConfig,
    /// The run folder.
    pub out: PathBuf,
    /// Class names.
    pub classes: Vec<String>,
    /// The plain device (evaluation, the teacher).
    pub device: Device,
    /// The same device with autodiff (training).
    pub autodiff: Device,
    /// Training images, augmented.
    pub train_loader: Loader,
    /// Validation images.
    pub val_loader: Loader,
    /// The frozen teacher of a distillation run.
    pub teacher: Option<Teacher>,
    /// The teacher's outputs of every training image, with `cache_teacher`.
    pub teacher_cache: Option<OutputsCache>,
    /// Whether this process started the run (rather than resuming it).
    pub started_fresh: bool,
    /// Held while the run trains.
    pub lock: RunLock,
}

/// What training changes: the model, its optimizer, the loop state, and the feature
/// projection of feature distillation.
pub struct Trainee {
    /// The model, on the autodiff device.
    pub model: Network,
    /// Its optimizer.
    pub optim: ModuleOptimizer,
    /// Epochs done and their metrics (restored on `--resume`).
    pub state: LoopState,
    /// The student's features onto the teacher's, when a method reads features of
    /// different sizes.
    pub projection: Option<Projection>,
}

/// Prepares the run of `config` in `out`.
pub fn prepare(
    config: &TrainConfig,
    out: &Path,
    options: &TrainOptions,
) -> Result<(Prepared, Trainee)> {
    config.validate()?;
    let mut config = config.clone();
    crate::data::dataset::check_out_is_not_read(out, &config.data)?;
    let data = config.images()?;
    crate::data::report_skipped(&data.skipped, Some(config.strict))?;

    let fingerprint = DataFingerprint::of(&config.data, &data.train, &data.val);
    // An existing run folder is locked before it is judged, so that a second process
    // cannot take a first epoch in progress for an abandoned one.
    let lock = out.is_dir().then(|| RunLock::acquire(out)).transpose()?;
    let restart = resume::saved_no_epoch(out);
    if restart {
        eprintln!(
            "note: {} holds a run that saved no epoch it can continue from (it stopped during its first); starting it again",
            out.display()
        );
        resume::clear(out)?;
    }
    let resumed = if restart {
        None
    } else if options.resume {
        Some(resume::check_resume(
            &mut config,
            out,
            &data.classes,
            &fingerprint,
        )?)
    } else {
        if out.join(files::CONFIG).exists() {
            bail!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        None
    };

    let device = crate::device::open(options.device, config.precision)?;
    let teacher_run = match config.teacher.clone() {
        Some(tc) => {
            let run = teacher::open(&config, &tc, &data)?;
            let crc = teacher::checkpoint_crc32(&run, &tc)?;
            if let Some(saved) = tc.checkpoint_crc32
                && saved != crc
            {
                bail!(
                    "cannot resume {}: the {} checkpoint of teacher {} changed since this run began (retrained in place?); distill into a new --out",
                    out.display(),
                    tc.checkpoint,
                    tc.run.display()
                );
            }
            if let Some(t) = &mut config.teacher {
                t.checkpoint_crc32 = Some(crc);
            }
            Some((run, tc))
        }
        None => None,
    };
    // Refused before anything of the size asked for is allocated.
    let mut roles = vec![Role {
        spec: &config.model,
        train: true,
    }];
    if let Some((run, _)) = &teacher_run {
        roles.push(Role {
            spec: &run.config.model,
            train: false,
        });
    }
    let batch = config.batch_size.min(data.train.len()).max(1);
    let step = (data.classes.len(), config.image_size, batch);
    memory::check_step(&roles, step, config.precision, &device)?;
    let teacher = match teacher_run {
        Some((run, tc)) => {
            // The student sees the teacher's normalization unless it was given (and equal).
            config.mean = config.mean.or(run.config.mean);
            config.std = config.std.or(run.config.std);
            Some(Teacher::load(
                &run,
                &tc,
                &device,
                Ctx::new(config.precision),
            )?)
        }
        None => None,
    };

    // Every image is decoded once before any training, so a corrupt, truncated or empty file
    // is reported by name now rather than hours later; computing the training images'
    // statistics decodes (and so checks) them in the same pass.
    verify_images(&data.val)?;
    if config.mean.is_none() || config.std.is_none() {
        let stats = channel_stats(&data.train, Some(config.image_size))?;
        config.mean.get_or_insert(stats.mean);
        config.std.get_or_insert(stats.std);
    } else {
        verify_images(&data.train)?;
    }
    // Held until training returns (dropped after the checkpoint writer has finished).
    let lock = match lock {
        Some(lock) => lock,
        None => RunLock::acquire(out)?,
    };
    ensure_dir(&out.join(files::CHECKPOINTS))?;

    let (train_loader, val_loader) = loaders(&config, data.clone());
    let teacher_cache = match (&teacher, &config.teacher) {
        (Some(t), Some(tc)) if tc.cache_logits => Some(t.outputs_of_all(&train_loader)?),
        _ => None,
    };

    let ad = device.clone().autodiff();
    ad.seed(config.seed);
    let mut model = config
        .model
        .build(data.classes.len(), config.image_size, &ad)?;
    if let (Some(init), None) = (&config.init_from, &resumed) {
        weights::load_pytorch(&mut model, init)?;
    }
    let optim = FusedAdam::new(config.adam_epsilon as f32).init();
    let mut projection = match &teacher {
        Some(t) if t.method.needs_features() => {
            let (student, teacher) = (model.num_features(), t.net.num_features());
            (student != teacher)
                .then(|| Projection::new(student, teacher, config.adam_epsilon, &ad))
        }
        _ => None,
    };
    let fresh = LoopState {
        epochs_done: 0,
        history: Vec::new(),
        best_accuracy: -1.0, // below any accuracy; finite so it survives JSON
        seconds: 0.0,
        partial: None,
        data: Some(fingerprint),
    };
    let started_fresh = resumed.is_none();
    let (model, optim, state) = match resumed {
        Some(mut r) => {
            let path = resume::resume_path(out);
            match (projection.as_mut(), r.projection.take()) {
                (Some(p), Some(bytes)) => p.restore(bytes, &path)?,
                (None, None) => {}
                _ => anyhow::bail!(
                    "cannot resume {}: its resume state {} does not fit the method's feature projection; train it again in a new --out",
                    out.display(),
                    path.display()
                ),
            }
            restore(model, optim, r, out)?
        }
        None => (model, optim, fresh),
    };
    // Recorded once the state is restored, so that a resume refused above leaves the
    // recorded config as it was. A finished run extended by more epochs is no longer
    // finished: its final checkpoint goes, and a crash meanwhile leaves it resumable.
    write_json(&out.join(files::CONFIG), &config)?;
    write_json(&out.join(files::CLASSES), &classes_map(&data.classes))?;
    let final_path = out
        .join(files::CHECKPOINTS)
        .join(files::Checkpoint::Final.file_name());
    if state.epochs_done < config.epochs && final_path.is_file() {
        std::fs::remove_file(&final_path)
            .with_context(|| format!("cannot remove {}", final_path.display()))?;
    }
    let prepared = Prepared {
        config,
        out: out.to_path_buf(),
        classes: data.classes,
        device,
        autodiff: ad,
        train_loader,
        val_loader,
        teacher,
        teacher_cache,
        started_fresh,
        lock,
    };
    Ok((
        prepared,
        Trainee {
            model,
            optim,
            state,
            projection,
        },
    ))
}

/// The training loader (augmented, shuffled) and the validation loader of a run.
fn loaders(config: &TrainConfig, data: RunData) -> (Loader, Loader) {
    let eval_t = crate::run::eval_transform(config);
    let train_t = Transform {
        augment: Some(config.augment.clone()),
        ..eval_t.clone()
    };
    let train = Loader::new(data.train, train_t, config.batch_size, true, config.seed)
        .with_cache(config.cache_images, config.cache_mib);
    // Validation images are always cached as decoded (exact), so that `kd eval` agrees.
    let val_cache = match config.cache_images {
        CacheMode::Off => CacheMode::Off,
        _ => CacheMode::Decoded,
    };
    let val = Loader::new(data.val, eval_t, config.batch_size, false, config.seed)
        .with_cache(val_cache, config.cache_mib);
    (train, val)
}

/// The model, optimizer and loop state of a resumed run.
fn restore(
    mut model: Network,
    optim: ModuleOptimizer,
    resumed: ResumeState,
    out: &Path,
) -> Result<(Network, ModuleOptimizer, LoopState)> {
    let path = resume::resume_path(out);
    weights::load_bytes(&mut model, resumed.model, &path)?;
    let optim = optim
        .from_bytes(burn::tensor::Bytes::from_bytes_vec(resumed.optimizer))
        .map_err(|e| anyhow::anyhow!("cannot restore optimizer from {}: {e:?}", path.display()))?;
    Ok((model, optim, resumed.state))
}

/// Decodes every image of `samples` in parallel; the first that fails is named in the error.
fn verify_images(samples: &[crate::data::Sample]) -> Result<()> {
    use rayon::prelude::*;
    samples
        .par_iter()
        .try_for_each(|s| crate::data::load_image(&s.path).map(|_| ()))
}
