//! The process-wide stop request (Ctrl-C): set by the handler in `main.rs`, read by whatever
//! long work is under way (a training after each batch, `kd split` after each file).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks the running work to stop at its next safe point (what Ctrl-C does).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Work other than a training stopped on request, having removed what it had half written.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: {0}")]
pub struct Stopped(pub String);
