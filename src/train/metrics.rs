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

/// The epoch whose weights `best.bpk` holds: the first one of the highest validation
/// accuracy (training keeps a checkpoint only on a strict improvement).
pub fn best_epoch(history: &[EpochMetrics]) -> Option<&EpochMetrics> {
    history
        .iter()
        .rev()
        .max_by(|a, b| a.val_accuracy.total_cmp(&b.val_accuracy))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_epoch_is_the_first_of_tied_accuracies() {
        let epoch = |epoch, val_accuracy| EpochMetrics {
            epoch,
            train_loss: 1.0,
            train_kd_loss: None,
            train_ce_loss: None,
            val_loss: 1.0,
            val_accuracy,
            val_macro_f1: val_accuracy,
            lr: 1e-3,
            seconds: 1.0,
            images_per_second: 1.0,
            skipped_batches: 0,
            peak_device_mib: None,
        };
        let history = [epoch(1, 0.5), epoch(2, 0.8), epoch(3, 0.7), epoch(4, 0.8)];
        assert_eq!(best_epoch(&history).map(|e| e.epoch), Some(2));
        assert!(best_epoch(&[]).is_none());
    }
}
