//! What a run writes at the end of each epoch (and when interrupted): checkpoints, metrics
//! and the resume state, as jobs for the background writer, in the order that keeps the
//! folder consistent after a crash at any point.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use burn::optim::ModuleOptimizer;

use super::projection::Projection;
use super::writer::WriteJob;
use crate::io::write_atomic;
use crate::run::checkpoint::{LoopState, save_resume};
use crate::run::metrics::write_metrics;
use crate::run::{Checkpoint, files, resume};

/// Writes `model` (burnpack bytes) as `checkpoint` of the run in `out`.
pub fn checkpoint(out: &Path, checkpoint: Checkpoint, model: &Arc<Vec<u8>>) -> WriteJob {
    let path = out.join(files::CHECKPOINTS).join(checkpoint.file_name());
    let bytes = model.clone();
    Box::new(move || write_atomic(&path, &bytes))
}

/// Writes the resume state: model, optimizer and feature projection (serialised now) and
/// loop state.
pub fn resume_state(
    out: &Path,
    model: &Arc<Vec<u8>>,
    optim: &ModuleOptimizer,
    state: &LoopState,
    projection: Option<&Projection>,
) -> Result<WriteJob> {
    let optim_bytes = optim
        .into_bytes()
        .map_err(|e| anyhow::anyhow!("cannot serialise optimizer state: {e:?}"))?;
    let projection = projection.map(Projection::to_bytes).transpose()?;
    let (path, model, state) = (resume::resume_path(out), model.clone(), state.clone());
    Ok(Box::new(move || {
        let projection = projection
            .as_ref()
            .map(|(p, o)| (p.as_slice(), o.as_slice()));
        save_resume(&path, &model, &optim_bytes, &state, projection)
    }))
}

/// The writes after a finished epoch, in order: the best checkpoint when it improved, the
/// metrics, the final checkpoint after the last epoch (a run with `final.bpk` counts as
/// finished, so it comes after the metrics), and the resume state last, so that a resumed run
/// redoes (deterministically) whatever was not recorded.
pub fn epoch_end(
    out: &Path,
    model: &Arc<Vec<u8>>,
    (optim, projection): (&ModuleOptimizer, Option<&Projection>),
    state: &LoopState,
    improved: bool,
    last: bool,
) -> Result<Vec<WriteJob>> {
    let mut jobs: Vec<WriteJob> = Vec::new();
    if improved {
        jobs.push(checkpoint(out, Checkpoint::Best, model));
    }
    let (dir, history) = (out.to_path_buf(), state.history.clone());
    jobs.push(Box::new(move || write_metrics(&dir, &history)));
    if last {
        jobs.push(checkpoint(out, Checkpoint::Final, model));
    }
    jobs.push(resume_state(out, model, optim, state, projection)?);
    Ok(jobs)
}
