//! The training loop shared by `kd train` and `kd distill`: [`prepare`] the run, train its
//! epochs ([`epoch`]), and hand each epoch's files to a background writer ([`writes`]).
//!
//! Written by hand rather than with burn-train's `Learner` (0.22), because the Learner does
//! not give what `kd` promises: its resume restores no data-order/augmentation state (the
//! loader RNG restarts), its multi-worker loader returns batches in a non-deterministic
//! order, its model/optimizer/scheduler checkpoint files are written separately and not as
//! one atomic set, a teacher would have to live inside the trained module (and be saved in
//! every checkpoint), and it has no NaN policy. Here every random choice derives from
//! `(seed, epoch, index)`, so a resumed run replays exactly.

mod epoch;
mod interrupt;
pub mod prepare;
pub mod projection;
pub mod schedule;
pub mod teacher;
mod writer;
mod writes;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use burn::module::Module;

pub use interrupt::{Interrupted, request_interrupt};
pub use schedule::CosineSchedule;
pub use teacher::Teacher;

use crate::device::DeviceSpec;
use crate::io::write_atomic;
use crate::models::weights;
use crate::run::{Checkpoint, EpochMetrics, TrainConfig, files};
use writer::BackgroundWriter;

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

/// Trains (or distills into) a model as configured, writing the run folder `out`.
pub fn train(config: &TrainConfig, out: &Path, options: &TrainOptions) -> Result<TrainSummary> {
    let (run, trainee) = prepare::prepare(config, out, options)?;
    let prepare::Trainee {
        mut model,
        mut optim,
        mut state,
        mut projection,
    } = trainee;
    let epochs = run.config.epochs;
    let resumed_at_the_end = state.epochs_done == epochs;
    let mut writer = BackgroundWriter::default();
    for epoch in state.epochs_done..epochs {
        let (trained, m) = epoch::run_epoch(
            &run,
            model,
            (&mut optim, projection.as_mut()),
            &mut state,
            &mut writer,
            epoch,
            options.quiet,
        )?;
        model = trained;
        let improved = m.val_accuracy > state.best_accuracy;
        if improved {
            state.best_accuracy = m.val_accuracy;
        }
        state.seconds += m.seconds;
        state.history.push(m);
        state.epochs_done = epoch + 1;
        // Serialised now, written while the next epoch trains.
        let model_bytes = Arc::new(weights::to_bytes(&model.valid())?);
        let jobs = writes::epoch_end(
            out,
            &model_bytes,
            (&optim, projection.as_ref()),
            &state,
            improved,
            state.epochs_done == epochs,
        )?;
        writer.write(jobs)?;
    }
    if resumed_at_the_end {
        // Nothing left to train: the model is the last finished epoch's, which is the final
        // checkpoint (missing, or older, when the run had been asked for more epochs).
        let bytes = weights::to_bytes(&model.valid())?;
        let path = out
            .join(files::CHECKPOINTS)
            .join(Checkpoint::Final.file_name());
        write_atomic(&path, &bytes)?;
    }
    writer.wait()?;
    drop(run);
    Ok(TrainSummary {
        dir: out.to_path_buf(),
        history: state.history,
        best_accuracy: state.best_accuracy,
    })
}
