//! The training loop shared by `kd train` and `kd distill`.
//!
//! Written by hand rather than with burn-train's `Learner` (0.22), because the Learner does
//! not give what `kd` promises: its resume restores no data-order/augmentation state (the
//! loader RNG restarts), its multi-worker loader returns batches in a non-deterministic
//! order, its model/optimizer/scheduler checkpoint files are written separately and not as
//! one atomic set, a teacher would have to live inside the trained module (and be saved in
//! every checkpoint), and it has no NaN policy. Here every random choice derives from
//! `(seed, epoch, index)`, so a resumed run replays exactly.

pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod metrics;
pub mod teacher;
pub mod writer;

use crate::data::CacheMode;
use crate::device::DeviceSpec;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::optim::FusedAdam;
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};

pub use config::{NanPolicy, TeacherConfig, TrainConfig};
pub use metrics::EpochMetrics;
pub use teacher::Teacher;

use crate::data::{Batch, Loader, Transform, channel_stats};
use crate::eval::{evaluate, labels_tensor, take_images_tensor};
use crate::io::{ensure_dir, write_atomic, write_json};
use crate::losses::cross_entropy;
use crate::metrics::Evaluation;
use crate::models::{Network, weights};
use crate::run::{Run, classes_map, files};
use checkpoint::{DataFingerprint, EpochProgress, LoopState, load_resume, save_resume};
use writer::{BackgroundWriter, WriteJob};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks a running training to stop after its current batch and save a resumable state
/// (what Ctrl-C does).
pub fn request_interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Test hook: `KD_FAULT_NAN_AT_BATCH=N` treats the N-th training batch of the run (1-based,
/// counted across epochs) as if its loss were NaN.
fn fault_nan_at() -> Option<usize> {
    std::env::var("KD_FAULT_NAN_AT_BATCH").ok()?.parse().ok()
}

/// Training stopped on request; the state up to the last batch is saved.
#[derive(Debug, thiserror::Error)]
#[error(
    "interrupted at epoch {epoch} after batch {batch}; progress saved in {}: continue with --resume",
    resume.display()
)]
pub struct Interrupted {
    /// 1-based epoch in progress.
    pub epoch: usize,
    /// Batches done in that epoch.
    pub batch: usize,
    /// The resume file.
    pub resume: PathBuf,
}

/// One training step's loss: plain cross-entropy, or a distillation loss with the
/// teacher's logits (live or cached) for the very same augmented batch.
struct Step<'a> {
    teacher: Option<&'a Teacher>,
    cache: Option<&'a [Vec<f32>]>,
    n_classes: usize,
    device: &'a Device,
}

impl Step<'_> {
    /// The loss to minimise, and its (KD, CE) parts for distillation, all still on the
    /// device (reading them waits for the device, so the caller reads them after queueing
    /// the backward pass). Consumes the batch's images.
    fn loss(&self, model: &Network, batch: &mut Batch) -> (Tensor<1>, Option<[Tensor<1>; 2]>) {
        let labels = labels_tensor(batch, self.device);
        let Some(t) = self.teacher else {
            let logits = model.forward(take_images_tensor(batch, self.device));
            return (cross_entropy(logits, labels), None);
        };
        let (images, t_logits) = match self.cache {
            Some(cache) => {
                let rows: Vec<f32> = batch
                    .indices
                    .iter()
                    .flat_map(|&i| cache[i].iter().copied())
                    .collect();
                let t_logits = Tensor::from_data(
                    TensorData::new(rows, [batch.len(), self.n_classes]),
                    self.device,
                );
                (take_images_tensor(batch, self.device), t_logits)
            }
            // The teacher sees exactly the student's (augmented) images: one upload, shared;
            // its logits join the student's graph as constants, without leaving the device.
            None => {
                let images = take_images_tensor(batch, t.device());
                let t_logits = t.forward(images.clone()).autodiff();
                (images.autodiff(), t_logits)
            }
        };
        let logits = model.forward(images);
        let p = t.loss.loss(logits, t_logits, labels);
        (p.total, Some([p.kd, p.ce]))
    }
}

/// Reads a step's loss and its parts from the device in one transfer.
fn read_losses(
    loss: Tensor<1>,
    parts: Option<[Tensor<1>; 2]>,
) -> Result<(f32, Option<(f32, f32)>)> {
    // Outside the graph: the backward pass has already been taken.
    let all: Vec<Tensor<1>> = std::iter::once(loss)
        .chain(parts.into_iter().flatten())
        .map(|t| t.inner().reshape([1]))
        .collect();
    let values: Vec<f32> = Tensor::cat(all, 0)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("cannot read the training loss: {e:?}"))?;
    Ok((
        values[0],
        (values.len() == 3).then(|| (values[1], values[2])),
    ))
}

impl EpochProgress {
    fn metrics(
        &self,
        kd: bool,
        eval: &Evaluation,
        lr: f64,
        seconds: f64,
        train_seconds: f64,
    ) -> EpochMetrics {
        let n = self.seen.max(1) as f64;
        EpochMetrics {
            epoch: self.epoch + 1,
            train_loss: self.loss_sum / n,
            train_kd_loss: kd.then(|| self.kd_sum / n),
            train_ce_loss: kd.then(|| self.ce_sum / n),
            val_loss: eval.loss,
            val_accuracy: eval.accuracy,
            val_macro_f1: eval.macro_f1,
            lr,
            seconds,
            images_per_second: self.seen as f64 / train_seconds.max(1e-9),
            skipped_batches: self.skipped,
            peak_device_mib: self.device_memory.mib(),
        }
    }
}

/// How a training call behaves.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue the run in `out` from its last completed epoch.
    pub resume: bool,
    /// No progress bar or per-epoch lines.
    pub quiet: bool,
    /// Where to compute.
    pub device: DeviceSpec,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Run folder.
    pub dir: PathBuf,
    /// Per-epoch metrics.
    pub history: Vec<EpochMetrics>,
    /// Best validation accuracy.
    pub best_accuracy: f64,
}

/// The CPU device, for work that needs no `--device` choice (export, parameter counts).
pub fn default_device() -> Device {
    Device::flex()
}

/// Trains (or distills into) a model as configured, writing the run folder `out`.
pub fn train(config: &TrainConfig, out: &Path, options: &TrainOptions) -> Result<TrainSummary> {
    config.validate()?;
    let mut config = config.clone();
    check_out_is_not_read(out, &config.data)?;
    let data = dataset::for_config(&config)?;
    let n_classes = data.classes.len();
    dataset::report_skipped(&data.skipped, Some(config.strict))?;

    let resume_path = out.join(files::CHECKPOINTS).join(files::RESUME);
    let fingerprint = DataFingerprint::of(&config.data, &data.train, &data.val);
    // An existing run folder is locked before it is judged, so that a second process
    // cannot take a first epoch in progress for an abandoned one.
    let lock = if out.is_dir() {
        Some(lock_run_folder(out)?)
    } else {
        None
    };
    let restart = saved_no_epoch(out);
    if restart {
        eprintln!(
            "note: {} holds a run that saved no epoch (it stopped during its first); starting it again",
            out.display()
        );
    }
    let resumed = if restart {
        None
    } else if options.resume {
        Some(check_resume(
            &mut config,
            out,
            &resume_path,
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
    crate::device::set_precision(config.precision);
    let teacher = Teacher::load(&mut config, &data, &device)?;

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
    let _lock = match lock {
        Some(lock) => lock,
        None => lock_run_folder(out)?,
    };
    ensure_dir(&out.join(files::CHECKPOINTS))?;
    write_json(&out.join(files::CONFIG), &config)?;
    write_json(&out.join(files::CLASSES), &classes_map(&data.classes))?;

    let eval_t = crate::run::eval_transform(&config);
    let train_t = Transform {
        augment: Some(config.augment.clone()),
        ..eval_t.clone()
    };
    let train_loader = Loader::new(data.train, train_t, config.batch_size, true, config.seed)
        .with_cache(config.cache_images, config.cache_mib);
    // Validation images are always cached as decoded (exact), so that `kd eval` agrees.
    let val_cache = match config.cache_images {
        CacheMode::Off => CacheMode::Off,
        _ => CacheMode::Decoded,
    };
    let val_loader = Loader::new(data.val, eval_t, config.batch_size, false, config.seed)
        .with_cache(val_cache, config.cache_mib);

    let teacher_cache = match (&teacher, &config.teacher) {
        (Some(t), Some(tc)) if tc.cache_logits => Some(t.logits_of_all(&train_loader)?),
        _ => None,
    };

    let ad = device.clone().autodiff();
    ad.seed(config.seed);
    let mut model = config.model.build(n_classes, config.image_size, &ad)?;
    if let (Some(init), None) = (&config.init_from, &resumed) {
        weights::load_pytorch(&mut model, init)?;
    }
    let mut optim = FusedAdam::new(config.adam_epsilon as f32).init();
    let mut state = LoopState {
        epochs_done: 0,
        history: Vec::new(),
        best_accuracy: -1.0, // below any accuracy; finite so it survives JSON
        seconds: 0.0,
        partial: None,
        data: Some(fingerprint.clone()),
    };
    let started_fresh = resumed.is_none();
    if let Some(r) = resumed {
        weights::load_bytes(&mut model, r.model, &resume_path)?;
        optim = optim
            .from_bytes(burn::tensor::Bytes::from_bytes_vec(r.optimizer))
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot restore optimizer from {}: {e:?}",
                    resume_path.display()
                )
            })?;
        state = r.state;
    }

    let schedule = config.schedule();
    let ckpt = out.join(files::CHECKPOINTS);
    // The resume state, written last in each batch of writes: model, optimizer, loop state.
    let resume_job = |model: &Arc<Vec<u8>>, optim: &ModuleOptimizer, state: &LoopState| {
        let optim_bytes = optim
            .into_bytes()
            .map_err(|e| anyhow::anyhow!("cannot serialise optimizer state: {e:?}"))?;
        let (path, model, state) = (resume_path.clone(), model.clone(), state.clone());
        Ok::<WriteJob, anyhow::Error>(Box::new(move || {
            save_resume(&path, &model, &optim_bytes, &state)
        }))
    };
    // What a stop for non-finite losses leaves behind.
    let kept = |epochs_done: usize| {
        if started_fresh && epochs_done == 0 {
            "no epoch was saved, so the same command starts again".to_string()
        } else {
            format!("the last good checkpoint is kept in {}", ckpt.display())
        }
    };
    let mut writer = BackgroundWriter::default();
    let resumed_at_the_end = state.epochs_done == config.epochs;
    for epoch in state.epochs_done..config.epochs {
        let lr = schedule.lr(epoch);
        let mut progress = match state.partial.take() {
            Some(p) if p.epoch == epoch => p,
            _ => EpochProgress {
                epoch,
                ..Default::default()
            },
        };
        let start = Instant::now();
        let bar = progress_bar(
            train_loader.num_batches(),
            epoch,
            config.epochs,
            options.quiet,
        );
        bar.set_position(progress.batches as u64);
        let step = Step {
            teacher: teacher.as_ref(),
            cache: teacher_cache.as_deref(),
            n_classes,
            device: &ad,
        };
        for batch in train_loader.epoch(epoch, progress.batches) {
            // The last epoch's files are written meanwhile; a failure stops training now.
            writer.poll()?;
            let mut batch = batch?;
            let (loss, parts) = step.loss(&model, &mut batch);
            // The backward pass is queued before the loss is read, so a GPU has it in hand
            // while the host waits; a non-finite loss then skips the optimizer step.
            let grads = loss.clone().backward();
            let (mut value, parts) = read_losses(loss, parts)?;
            // Right after the read, where the host has waited for the device anyway.
            progress.device_memory.sample(&ad);
            progress.batches += 1;
            if fault_nan_at() == Some(epoch * train_loader.num_batches() + progress.batches) {
                value = f32::NAN;
            }
            if value.is_finite() {
                let grads = GradientsParams::from_grads(grads, &model);
                model = optim.step(lr, model, grads);
                let n = batch.len() as f64;
                progress.loss_sum += f64::from(value) * n;
                if let Some((kd, ce)) = parts {
                    progress.kd_sum += f64::from(kd) * n;
                    progress.ce_sum += f64::from(ce) * n;
                }
                progress.seen += batch.len();
            } else if config.nan_policy == NanPolicy::Stop {
                bail!(
                    "training loss became {value} at epoch {} batch {}: lower --lr or check the data; \
                     {} (or pass --nan-policy skip-batch)",
                    epoch + 1,
                    progress.batches,
                    kept(state.epochs_done),
                );
            } else {
                progress.skipped += 1;
            }
            let elapsed = progress.seconds + start.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.4}  {:.1} img/s",
                progress.loss_sum / progress.seen.max(1) as f64,
                progress.seen as f64 / elapsed.max(1e-9)
            ));
            bar.inc(1);
            if interrupted() {
                bar.abandon();
                progress.seconds += start.elapsed().as_secs_f64();
                state.partial = Some(progress.clone());
                let model_bytes = Arc::new(weights::to_bytes(&model.valid())?);
                writer.write(vec![resume_job(&model_bytes, &optim, &state)?])?;
                writer.wait()?;
                return Err(Interrupted {
                    epoch: epoch + 1,
                    batch: progress.batches,
                    resume: resume_path.clone(),
                }
                .into());
            }
        }
        bar.finish_and_clear();
        if progress.seen == 0 {
            // Nothing was learnt and there is no training loss to record.
            bail!(
                "every batch of epoch {} ({}) had a non-finite training loss and was skipped: \
                 lower --lr or check the data; {}",
                epoch + 1,
                progress.skipped,
                kept(state.epochs_done),
            );
        }
        let train_seconds = progress.seconds + start.elapsed().as_secs_f64();
        let valid = model.valid();
        let eval = evaluate(&valid, &val_loader, &data.classes, &device)?;
        progress.device_memory.sample(&device);
        let seconds = progress.seconds + start.elapsed().as_secs_f64();
        let m = progress.metrics(teacher.is_some(), &eval, lr, seconds, train_seconds);
        if !options.quiet {
            print_epoch(&m, config.epochs);
        }
        state.history.push(m);
        state.epochs_done = epoch + 1;
        state.seconds += seconds;
        // Serialised now, written while the next epoch trains. Order matters for a crash at
        // any point: checkpoints and metrics first, the resume state last, so a resumed run
        // redoes (deterministically) whatever was not recorded.
        let model_bytes = Arc::new(weights::to_bytes(&valid)?);
        let mut jobs: Vec<WriteJob> = Vec::new();
        let checkpoint = |name: &str| -> WriteJob {
            let (path, bytes) = (ckpt.join(name), model_bytes.clone());
            Box::new(move || write_atomic(&path, &bytes))
        };
        if eval.accuracy > state.best_accuracy {
            state.best_accuracy = eval.accuracy;
            jobs.push(checkpoint("best.bpk"));
        }
        let (dir, history) = (out.to_path_buf(), state.history.clone());
        jobs.push(Box::new(move || metrics::write_metrics(&dir, &history)));
        // After the metrics: a run with `final.bpk` counts as finished (`kd run` skips it).
        if state.epochs_done == config.epochs {
            jobs.push(checkpoint("final.bpk"));
        }
        jobs.push(resume_job(&model_bytes, &optim, &state)?);
        writer.write(jobs)?;
    }
    if resumed_at_the_end {
        // Nothing left to train: the model is the last finished epoch's, which is the final
        // checkpoint (missing, or older, when the run had been asked for more epochs).
        let bytes = weights::to_bytes(&model.valid())?;
        write_atomic(&ckpt.join("final.bpk"), &bytes)?;
    }
    writer.wait()?;
    Ok(TrainSummary {
        dir: out.to_path_buf(),
        history: state.history,
        best_accuracy: state.best_accuracy,
    })
}

/// Decodes every image of `samples` in parallel; the first that fails is named in the error.
fn verify_images(samples: &[crate::data::Sample]) -> Result<()> {
    use rayon::prelude::*;
    samples
        .par_iter()
        .try_for_each(|s| crate::data::load_image(&s.path).map(|_| ()))
}

/// Refuses a run folder inside the folders the run reads its images from (`data`, or its
/// `train/` and `val/`): it would be read as a class.
fn check_out_is_not_read(out: &Path, data: &Path) -> Result<()> {
    let (train, val) = (data.join("train"), data.join("val"));
    let read = if train.is_dir() && val.is_dir() {
        vec![train, val]
    } else {
        vec![data.to_path_buf()]
    };
    let out_resolved = crate::io::resolved(out);
    if let Some(dir) = read
        .iter()
        .find(|d| out_resolved.starts_with(crate::io::resolved(d)))
    {
        bail!(
            "--out {} is inside {}, where the run reads its images: choose an --out outside it",
            out.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Holds `out/.kd-lock` exclusively while this process trains in `out`, so that a second
/// `kd train` / `kd distill` on the same folder stops at once instead of mixing its files in.
/// The operating system releases it when the process ends, however it ends.
pub(crate) fn lock_run_folder(out: &Path) -> Result<std::fs::File> {
    ensure_dir(out)?;
    let path = out.join(".kd-lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| {
            format!(
                "cannot create {}: check that the folder is writable",
                path.display()
            )
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{} is in use by another kd process training there: wait for it to finish, or choose another --out",
            out.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Whether `out` holds a run that stopped before saving anything of its first epoch (an
/// error or `kill -9` then; Ctrl-C saves a resumable state): nothing in it is worth keeping,
/// so a new run (with or without `--resume`) starts there afresh.
fn saved_no_epoch(out: &Path) -> bool {
    let ckpt = out.join(files::CHECKPOINTS);
    Run::open(out).is_ok()
        && !out.join("metrics.json").exists()
        && ["best.bpk", "final.bpk", files::RESUME]
            .iter()
            .all(|f| !ckpt.join(f).exists())
}

/// Checks that `out` holds a resumable run made with the same config and data; fills in
/// the recorded normalization.
fn check_resume(
    config: &mut TrainConfig,
    out: &Path,
    resume_path: &Path,
    classes: &[String],
    fingerprint: &DataFingerprint,
) -> Result<checkpoint::ResumeState> {
    let previous = Run::open(out).with_context(|| format!("cannot resume {}", out.display()))?;
    if previous.classes != classes {
        let (now, before) = crate::data::folder::class_difference(classes, &previous.classes);
        bail!(
            "cannot resume {}: {} now has other classes (new: {now:?}, gone: {before:?}); restore the class folders or train a new run in another --out",
            out.display(),
            config.data.display()
        );
    }
    if config.mean.is_none() {
        config.mean = previous.config.mean;
    }
    if config.std.is_none() {
        config.std = previous.config.std;
    }
    let mut wanted = config.clone();
    wanted.epochs = previous.config.epochs; // extending a run is allowed
    let diff = wanted.differing_keys(&previous.config);
    if !diff.is_empty() {
        bail!(
            "cannot resume {}: its config differs in {}; rerun with the same settings or use a new --out",
            out.display(),
            diff.join("; ")
        );
    }
    if !resume_path.is_file() {
        bail!(
            "cannot resume {}: its resume state {} is missing: train it again in a new --out, or delete the folder",
            out.display(),
            resume_path.display()
        );
    }
    let resumed = load_resume(resume_path)?;
    // Fewer epochs than it has done cannot be undone; as many ends the run where it is
    // (its final checkpoint is written then), unless it stopped inside the next epoch.
    let done = resumed.state.epochs_done;
    let partial = resumed
        .state
        .partial
        .as_ref()
        .is_some_and(|p| p.epoch == done);
    if config.epochs < done || (config.epochs == done && partial) {
        bail!(
            "cannot resume {} with {} epochs: it has finished {done}{}; ask for {} or more \
             (--epochs, or `epochs` in a kd run file)",
            out.display(),
            config.epochs,
            if partial { " and started the next" } else { "" },
            if partial { done + 1 } else { done }
        );
    }
    if let Some(saved) = &resumed.state.data
        && saved != fingerprint
    {
        bail!(
            "cannot resume {}: the images under {} changed since it started ({} training and {} validation images then, {} and {} now, or other files): restore them, or train a new run in another --out",
            out.display(),
            config.data.display(),
            saved.train_images,
            saved.val_images,
            fingerprint.train_images,
            fingerprint.val_images
        );
    }
    Ok(resumed)
}

fn progress_bar(batches: usize, epoch: usize, epochs: usize, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(batches as u64);
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{}", epoch + 1, epochs));
    bar
}

fn print_epoch(m: &EpochMetrics, epochs: usize) {
    let kd = match (m.train_kd_loss, m.train_ce_loss) {
        (Some(k), Some(c)) => format!(" (kd {k:.4} + ce {c:.4})"),
        _ => String::new(),
    };
    let memory = m
        .peak_device_mib
        .map(|mib| format!("  {mib:.0} MiB on the device"))
        .unwrap_or_default();
    println!(
        "epoch {}/{}: train loss {:.4}{kd}  val loss {:.4}  val acc {:.2}%  lr {:.3e}  {:.1}s  {:.1} img/s{memory}",
        m.epoch,
        epochs,
        m.train_loss,
        m.val_loss,
        m.val_accuracy * 100.0,
        m.lr,
        m.seconds,
        m.images_per_second
    );
}
