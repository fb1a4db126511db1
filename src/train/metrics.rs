//! Per-epoch training metrics, written as JSON and CSV.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::io::{write_atomic, write_json};

/// One epoch's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss (the optimised objective).
    pub train_loss: f64,
    /// Mean weighted soft-target part (distillation runs).
    pub train_kd_loss: Option<f64>,
    /// Mean weighted cross-entropy part (distillation runs).
    pub train_ce_loss: Option<f64>,
    /// Mean validation cross-entropy.
    pub val_loss: f64,
    /// Validation accuracy in `[0, 1]`.
    pub val_accuracy: f64,
    /// Validation macro F1.
    pub val_macro_f1: f64,
    /// Learning rate in effect.
    pub lr: f64,
    /// Wall time of the epoch (training and validation).
    pub seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
    /// Batches skipped for a non-finite loss.
    pub skipped_batches: usize,
    /// Peak memory the device's allocator reserved in the epoch, MiB (GPU; none on the CPU).
    #[serde(default)]
    pub peak_device_mib: Option<f64>,
}

/// Writes `metrics.json` and `metrics.csv` into `dir`, atomically.
pub fn write_metrics(dir: &Path, history: &[EpochMetrics]) -> Result<()> {
    write_json(&dir.join("metrics.json"), &history)?;
    let mut csv = String::from(
        "epoch,train_loss,train_kd_loss,train_ce_loss,val_loss,val_accuracy,val_macro_f1,lr,seconds,images_per_second,skipped_batches,peak_device_mib\n",
    );
    let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for m in history {
        csv += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}\n",
            m.epoch,
            m.train_loss,
            opt(m.train_kd_loss),
            opt(m.train_ce_loss),
            m.val_loss,
            m.val_accuracy,
            m.val_macro_f1,
            m.lr,
            m.seconds,
            m.images_per_second,
            m.skipped_batches,
            opt(m.peak_device_mib)
        );
    }
    write_atomic(&dir.join("metrics.csv"), csv.as_bytes())
}
