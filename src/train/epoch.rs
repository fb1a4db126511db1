//! One training epoch: batches through the model (and the teacher), the loss and its parts,
//! the optimizer step, the NaN policy, Ctrl-C, and the validation at its end.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use super::interrupt::{Interrupted, interrupted};
use super::prepare::Prepared;
use super::projection::Projection;
use super::schedule::CosineSchedule;
use super::teacher::{OutputsCache, Teacher};
use super::writer::BackgroundWriter;
use super::writes;
use crate::data::Batch;
use crate::data::loader::mix_seed;
use crate::data::tensors::{labels_tensor, take_images_tensor};
use crate::eval::Evaluation;
use crate::eval::evaluate;
use crate::losses::{self, cross_entropy};
use crate::models::{Network, Outputs, weights};
use crate::ops::{Ctx, Precision};
use crate::run::checkpoint::{EpochProgress, LoopState};
use crate::run::{EpochMetrics, NanPolicy, resume};

/// Test hook: `KD_FAULT_NAN_AT_BATCH=N` treats the N-th training batch of the run (1-based,
/// counted across epochs) as if its loss were NaN.
fn fault_nan_at() -> Option<usize> {
    std::env::var("KD_FAULT_NAN_AT_BATCH").ok()?.parse().ok()
}

/// One training step's loss: plain cross-entropy, or a distillation method with the
/// teacher's outputs (live or cached) for the very same augmented batch.
struct Step<'a> {
    teacher: Option<&'a Teacher>,
    cache: Option<&'a OutputsCache>,
    device: &'a Device,
}

/// What the step reads besides the batch: the epoch (0-based), the forward context and the
/// feature projection.
struct StepInputs<'a> {
    epoch: usize,
    cx: &'a Ctx,
    projection: Option<&'a burn::nn::Linear>,
}

impl Step<'_> {
    /// The loss to minimise and its named parts, still on the device (reading them waits for
    /// the device, so the caller reads them after queueing the backward pass). Consumes the
    /// batch's images.
    fn loss(
        &self,
        model: &Network,
        batch: &mut Batch,
        StepInputs {
            epoch,
            cx,
            projection,
        }: StepInputs,
    ) -> (Tensor<1>, Vec<Tensor<1>>) {
        let labels = labels_tensor(batch, self.device);
        let Some(t) = self.teacher else {
            let logits = model.forward(take_images_tensor(batch, self.device), cx);
            return (cross_entropy(logits, labels), Vec::new());
        };
        let (images, teacher) = match self.cache {
            Some(cache) => (
                take_images_tensor(batch, self.device),
                cache.outputs(&batch.indices, self.device),
            ),
            // The teacher sees exactly the student's (augmented) images: one upload, shared;
            // its outputs join the student's graph as constants, without leaving the device.
            None => {
                let images = take_images_tensor(batch, t.device());
                let out = t.outputs(images.clone());
                let teacher = Outputs {
                    logits: out.logits.autodiff(),
                    features: out.features.map(Tensor::autodiff),
                };
                (images.autodiff(), teacher)
            }
        };
        let student = if t.method.needs_features() {
            model.outputs(images, cx)
        } else {
            Outputs {
                logits: model.forward(images, cx),
                features: None,
            }
        };
        let loss = t.method.loss(&losses::Step {
            student: &student,
            teacher: &teacher,
            targets: &labels,
            epoch: epoch + 1,
            projection,
        });
        (loss.total, loss.parts)
    }
}

/// Reads a step's loss and its parts from the device in one transfer.
fn read_losses(loss: Tensor<1>, parts: Vec<Tensor<1>>) -> Result<(f32, Vec<f32>)> {
    // Outside the graph: the backward pass has already been taken.
    let all: Vec<Tensor<1>> = std::iter::once(loss)
        .chain(parts)
        .map(|t| t.inner().reshape([1]))
        .collect();
    let values: Vec<f32> = Tensor::cat(all, 0)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("cannot read the training loss: {e:?}"))?;
    Ok((values[0], values[1..].to_vec()))
}

/// The metrics of a finished epoch.
fn metrics(
    progress: &EpochProgress,
    (parts, factors): (&[&str], Vec<(&str, f64)>),
    eval: &Evaluation,
    lr: f64,
    (seconds, train_seconds): (f64, f64),
) -> EpochMetrics {
    let n = progress.seen.max(1) as f64;
    EpochMetrics {
        epoch: progress.epoch + 1,
        train_loss: progress.loss_sum / n,
        train_parts: parts
            .iter()
            .map(|&p| {
                let sum = progress.part_sums.get(p).copied().unwrap_or(0.0);
                (p.to_string(), sum / n)
            })
            .collect(),
        train_factors: factors
            .into_iter()
            .map(|(f, v)| (f.to_string(), v))
            .collect(),
        val_loss: eval.loss,
        val_accuracy: eval.accuracy,
        val_macro_f1: eval.macro_f1,
        lr,
        seconds,
        images_per_second: progress.seen as f64 / train_seconds.max(1e-9),
        skipped_batches: progress.skipped,
        peak_device_mib: progress.device_memory.mib(),
    }
}

/// Trains epoch `epoch` (0-based) of a prepared run, continuing its interrupted progress in
/// `state` if any, then validates; returns the model and the epoch's metrics. On Ctrl-C it
/// saves a resumable state and returns [`Interrupted`].
pub fn run_epoch(
    p: &Prepared,
    mut model: Network,
    (optim, mut projection): (&mut ModuleOptimizer, Option<&mut Projection>),
    state: &mut LoopState,
    writer: &mut BackgroundWriter,
    epoch: usize,
    quiet: bool,
) -> Result<(Network, EpochMetrics)> {
    let config = &p.config;
    let lr = CosineSchedule::of(config).lr(epoch);
    let mut progress = match state.partial.take() {
        Some(partial) if partial.epoch == epoch => partial,
        _ => EpochProgress {
            epoch,
            ..Default::default()
        },
    };
    let start = Instant::now();
    let batches = p.train_loader.num_batches();
    let bar = progress_bar(batches, epoch, config.epochs, quiet);
    bar.set_position(progress.batches as u64);
    let ad = &p.autodiff;
    let step = Step {
        teacher: p.teacher.as_ref(),
        cache: p.teacher_cache.as_ref(),
        device: ad,
    };
    let parts: Vec<&str> = p.teacher.as_ref().map_or(Vec::new(), |t| t.method.parts());
    // What a stop for non-finite losses leaves behind.
    let kept = |epochs_done: usize| {
        if p.started_fresh && epochs_done == 0 {
            "no epoch was saved, so the same command starts again".to_string()
        } else {
            format!(
                "the last good checkpoint is kept in {}",
                p.out.join(crate::run::files::CHECKPOINTS).display()
            )
        }
    };
    for batch in p.train_loader.epoch(epoch, progress.batches) {
        // The last epoch's files are written meanwhile; a failure stops training now.
        writer.poll()?;
        let mut batch = batch?;
        // Dropout masks and the like: one seeded stream per batch, replayed on resume.
        let cx = step_context(config.precision, config.seed, epoch, progress.batches);
        let inputs = StepInputs {
            epoch,
            cx: &cx,
            projection: projection.as_ref().map(|p| &p.layer),
        };
        let (loss, part_tensors) = step.loss(&model, &mut batch, inputs);
        // The backward pass is queued before the loss is read, so a GPU has it in hand
        // while the host waits; a non-finite loss then skips the optimizer step.
        let mut grads = loss.clone().backward();
        let (mut value, part_values) = read_losses(loss, part_tensors)?;
        // Right after the read, where the host has waited for the device anyway.
        progress.device_memory.sample(ad);
        progress.batches += 1;
        if fault_nan_at() == Some(epoch * batches + progress.batches) {
            value = f32::NAN;
        }
        if value.is_finite() {
            let model_grads = GradientsParams::from_module(&mut grads, &model);
            model = optim.step(lr, model, model_grads);
            if let Some(p) = projection.as_mut() {
                p.step(lr, &mut grads);
            }
            let n = batch.len() as f64;
            progress.loss_sum += f64::from(value) * n;
            for (name, v) in parts.iter().zip(part_values) {
                *progress.part_sums.entry(name.to_string()).or_default() += f64::from(v) * n;
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
            let batch = progress.batches;
            state.partial = Some(progress);
            let model_bytes = Arc::new(weights::to_bytes(&model.valid())?);
            writer.write(vec![writes::resume_state(
                &p.out,
                &model_bytes,
                optim,
                state,
                projection.as_deref(),
            )?])?;
            writer.wait()?;
            return Err(Interrupted {
                epoch: epoch + 1,
                batch,
                resume: resume::resume_path(&p.out),
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
    let eval = evaluate(
        &model.valid(),
        &p.val_loader,
        &p.classes,
        &p.device,
        &Ctx::new(config.precision),
    )?;
    progress.device_memory.sample(&p.device);
    let seconds = progress.seconds + start.elapsed().as_secs_f64();
    let factors = p
        .teacher
        .as_ref()
        .map_or(Vec::new(), |t| t.method.factors(epoch + 1));
    let m = metrics(
        &progress,
        (&parts, factors),
        &eval,
        lr,
        (seconds, train_seconds),
    );
    if !quiet {
        print_epoch(&m, &parts, config.epochs);
    }
    Ok((model, m))
}

/// The forward context of training batch `batch` of `epoch`.
fn step_context(precision: Precision, seed: u64, epoch: usize, batch: usize) -> Ctx {
    // Its own stream, apart from the augmentation's (seed, epoch, image index).
    const STREAM: u64 = 1 << 40;
    Ctx::seeded(
        precision,
        mix_seed(seed, epoch as u64, STREAM + batch as u64),
    )
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

fn print_epoch(m: &EpochMetrics, parts: &[&str], epochs: usize) {
    let parts = if parts.is_empty() {
        String::new()
    } else {
        let shown: Vec<String> = parts
            .iter()
            .map(|p| format!("{p} {:.4}", m.train_parts.get(*p).copied().unwrap_or(0.0)))
            .collect();
        let factors: String = m
            .train_factors
            .iter()
            .map(|(f, v)| format!(", {f} {v:.2}"))
            .collect();
        format!(" ({}{factors})", shown.join(" + "))
    };
    let memory = m
        .peak_device_mib
        .map(|mib| format!("  {mib:.0} MiB on the device"))
        .unwrap_or_default();
    println!(
        "epoch {}/{}: train loss {:.4}{parts}  val loss {:.4}  val acc {:.2}%  lr {:.3e}  {:.1}s  {:.1} img/s{memory}",
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
