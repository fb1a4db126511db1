//! The names of a run folder's files, and [`Checkpoint`], the saved models a run keeps.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Effective configuration.
pub const CONFIG: &str = "config.json";
/// Class name to index.
pub const CLASSES: &str = "classes.json";
/// Per-epoch metrics (JSON).
pub const METRICS: &str = "metrics.json";
/// Per-epoch metrics (CSV).
pub const METRICS_CSV: &str = "metrics.csv";
/// Checkpoint folder.
pub const CHECKPOINTS: &str = "checkpoints";
/// Resume state inside [`CHECKPOINTS`].
pub const RESUME: &str = "last.kdc";
/// The lock a training process holds.
pub const LOCK: &str = ".kd-lock";
/// Evaluation outputs (`kd eval`).
pub const EVAL: &str = "eval";

/// A saved model of a run.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum Checkpoint {
    /// The first epoch of best validation accuracy.
    #[default]
    Best,
    /// The last epoch.
    Final,
}

impl Checkpoint {
    /// Its file name inside [`CHECKPOINTS`].
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Best => "best.bpk",
            Self::Final => "final.bpk",
        }
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Best => "best",
            Self::Final => "final",
        })
    }
}
