//! Per-epoch training metrics, written as JSON and CSV (`metrics.json`, `metrics.csv`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::files;
use crate::io::{read_json, write_atomic, write_json};

/// One epoch's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RecordedEpoch")]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss (the optimised objective).
    pub train_loss: f64,
    /// Mean of each named part of a distillation method's loss (`kd`, `ce`, ...), as the
    /// method weights it; empty without distillation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub train_parts: BTreeMap<String, f64>,
    /// The factors the method applied in the epoch (DKD's `warmup`); empty for most.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub train_factors: BTreeMap<String, f64>,
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

/// [`EpochMetrics`] as any kd wrote it: before methods had named parts, a distillation run
/// wrote its two parts as `train_kd_loss` and `train_ce_loss`.
#[derive(Deserialize)]
struct RecordedEpoch {
    epoch: usize,
    train_loss: f64,
    #[serde(default)]
    train_parts: BTreeMap<String, f64>,
    #[serde(default)]
    train_factors: BTreeMap<String, f64>,
    #[serde(default)]
    train_kd_loss: Option<f64>,
    #[serde(default)]
    train_ce_loss: Option<f64>,
    val_loss: f64,
    val_accuracy: f64,
    val_macro_f1: f64,
    lr: f64,
    seconds: f64,
    images_per_second: f64,
    skipped_batches: usize,
    #[serde(default)]
    peak_device_mib: Option<f64>,
}

impl From<RecordedEpoch> for EpochMetrics {
    fn from(r: RecordedEpoch) -> Self {
        let mut train_parts = r.train_parts;
        for (name, value) in [("kd", r.train_kd_loss), ("ce", r.train_ce_loss)] {
            if let Some(v) = value {
                train_parts.entry(name.into()).or_insert(v);
            }
        }
        Self {
            epoch: r.epoch,
            train_loss: r.train_loss,
            train_parts,
            train_factors: r.train_factors,
            val_loss: r.val_loss,
            val_accuracy: r.val_accuracy,
            val_macro_f1: r.val_macro_f1,
            lr: r.lr,
            seconds: r.seconds,
            images_per_second: r.images_per_second,
            skipped_batches: r.skipped_batches,
            peak_device_mib: r.peak_device_mib,
        }
    }
}

/// Reads a run folder's `metrics.json`.
/// Reads a run folder's `metrics.json`, refusing numbers no training writes (an accuracy
/// outside [0, 1], a non-finite or negative time, epochs out of order), naming the file.
pub fn read_metrics(dir: &Path) -> Result<Vec<EpochMetrics>> {
    let path = dir.join(files::METRICS);
    let history: Vec<EpochMetrics> = read_json(&path)?;
    for (i, m) in history.iter().enumerate() {
        let bad = |what: &str, value: f64| {
            anyhow::anyhow!(
                "{} is damaged: epoch {} has {what} {value}, which no training writes; restore it from a copy, or retrain the run",
                path.display(),
                m.epoch
            )
        };
        if m.epoch != i + 1 {
            return Err(bad("the number", m.epoch as f64));
        }
        for (what, v) in [
            ("val_accuracy", m.val_accuracy),
            ("val_macro_f1", m.val_macro_f1),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(what, v));
            }
        }
        for (what, v) in [
            ("lr", m.lr),
            ("seconds", m.seconds),
            ("images_per_second", m.images_per_second),
            ("val_loss", m.val_loss),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(bad(what, v));
            }
        }
        if !m.train_loss.is_finite() {
            return Err(bad("train_loss", m.train_loss));
        }
    }
    Ok(history)
}

/// The epoch whose weights `best.bpk` holds: the first one of the highest validation
/// accuracy (training keeps a checkpoint only on a strict improvement).
pub fn best_epoch(history: &[EpochMetrics]) -> Option<&EpochMetrics> {
    history
        .iter()
        .rev()
        .max_by(|a, b| a.val_accuracy.total_cmp(&b.val_accuracy))
}

/// Writes `metrics.json` and `metrics.csv` into `dir`, atomically. The CSV has a
/// `train_<part>_loss` column for each part of the method's loss and a column for each of its
/// factors (`warmup`).
pub fn write_metrics(dir: &Path, history: &[EpochMetrics]) -> Result<()> {
    write_json(&dir.join(files::METRICS), &history)?;
    let mut parts: Vec<&String> = history.iter().flat_map(|m| m.train_parts.keys()).collect();
    parts.sort();
    parts.dedup();
    let mut factors: Vec<&String> = history
        .iter()
        .flat_map(|m| m.train_factors.keys())
        .collect();
    factors.sort();
    factors.dedup();
    let mut csv = String::from("epoch,train_loss,");
    for p in &parts {
        csv += &format!("train_{p}_loss,");
    }
    for f in &factors {
        csv += &format!("{f},");
    }
    csv += "val_loss,val_accuracy,val_macro_f1,lr,seconds,images_per_second,skipped_batches,peak_device_mib\n";
    let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for m in history {
        csv += &format!("{},{},", m.epoch, m.train_loss);
        for p in &parts {
            csv += &format!("{},", opt(m.train_parts.get(*p).copied()));
        }
        for f in &factors {
            csv += &format!("{},", opt(m.train_factors.get(*f).copied()));
        }
        csv += &format!(
            "{},{},{},{},{},{},{},{}\n",
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
    write_atomic(&dir.join(files::METRICS_CSV), csv.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_epoch_is_the_first_of_tied_accuracies() {
        let epoch = |epoch, val_accuracy| EpochMetrics {
            epoch,
            train_loss: 1.0,
            train_parts: BTreeMap::new(),
            train_factors: BTreeMap::new(),
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

    #[test]
    fn metrics_of_older_distillation_runs_read_as_named_parts() {
        let old = r#"[{"epoch": 1, "train_loss": 0.4, "train_kd_loss": 0.1, "train_ce_loss": 0.3,
            "val_loss": 1.0, "val_accuracy": 0.5, "val_macro_f1": 0.4, "lr": 0.001,
            "seconds": 1.0, "images_per_second": 10.0, "skipped_batches": 0}]"#;
        let read: Vec<EpochMetrics> = serde_json::from_str(old).unwrap();
        let parts: Vec<(&str, f64)> = read[0]
            .train_parts
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(parts, [("ce", 0.3), ("kd", 0.1)]);
        let written = serde_json::to_value(&read).unwrap();
        assert_eq!(written[0]["train_parts"]["kd"], 0.1);
        assert!(written[0].get("train_kd_loss").is_none());
    }
}
