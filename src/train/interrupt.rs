//! Stopping a training on request (Ctrl-C): the flag the loop checks after each batch, and
//! the error it then returns once a resumable state is saved.

use std::path::PathBuf;

/// Asks a running training to stop after its current batch and save a resumable state
/// (what Ctrl-C does).
pub fn request_interrupt() {
    crate::interrupt::request();
}

/// Whether a stop was asked for.
pub fn interrupted() -> bool {
    crate::interrupt::requested()
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
