//! The resume state (`last.kdc`): model, optimizer and loop state packed into one file, so
//! that it is replaced atomically as a whole. (Model weights alone are burnpack files,
//! `best.bpk` and `final.bpk`.)

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::metrics::EpochMetrics;
use crate::data::Sample;
use crate::io::write_atomic_parts;

const MAGIC: &[u8; 8] = b"KDRESUM1";

/// Loop state saved after each completed epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoopState {
    /// Epochs completed.
    pub epochs_done: usize,
    /// Metrics of those epochs.
    pub history: Vec<EpochMetrics>,
    /// Best validation accuracy so far.
    pub best_accuracy: f64,
    /// Seconds spent training so far.
    pub seconds: f64,
    /// The epoch in progress when training was interrupted (Ctrl-C), if any.
    #[serde(default)]
    pub partial: Option<EpochProgress>,
    /// The images the run trains and validates on (absent in older resume files).
    #[serde(default)]
    pub data: Option<DataFingerprint>,
}

/// Which images a run trains and validates on, so that `--resume` can refuse a folder whose
/// images changed (the same batches could not be replayed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    /// Training images.
    pub train_images: usize,
    /// Validation images.
    pub val_images: usize,
    /// FNV-1a hash of every image's path (relative to the data folder) and label, in order.
    pub hash: u64,
}

impl DataFingerprint {
    /// The fingerprint of a run's samples under its data folder `root`.
    pub fn of(root: &Path, train: &[Sample], val: &[Sample]) -> Self {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for (part, samples) in [(&b"train"[..], train), (&b"val"[..], val)] {
            feed(part);
            for s in samples {
                let path = s.path.strip_prefix(root).unwrap_or(&s.path);
                feed(path.to_string_lossy().as_bytes());
                feed(&(s.label as u64).to_le_bytes());
            }
        }
        Self {
            train_images: train.len(),
            val_images: val.len(),
            hash,
        }
    }
}

/// Running totals of an epoch, enough to continue it after an interruption.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "RecordedProgress")]
pub struct EpochProgress {
    /// 0-based epoch.
    pub epoch: usize,
    /// Batches processed (including skipped ones).
    pub batches: usize,
    /// Sum of loss times batch size.
    pub loss_sum: f64,
    /// Sum of each named part of the method's loss times batch size.
    pub part_sums: BTreeMap<String, f64>,
    /// Images trained on.
    pub seen: usize,
    /// Batches skipped for a non-finite loss.
    pub skipped: usize,
    /// Training seconds spent in this epoch before the interruption.
    pub seconds: f64,
    /// Peak device memory reserved so far in this epoch (GPU backends).
    #[serde(default)]
    pub device_memory: crate::device::PeakDeviceMemory,
}

/// [`EpochProgress`] as any kd wrote it: before methods had named parts, the two parts of a
/// distillation run were `kd_sum` and `ce_sum`.
#[derive(Deserialize)]
struct RecordedProgress {
    epoch: usize,
    batches: usize,
    loss_sum: f64,
    #[serde(default)]
    part_sums: BTreeMap<String, f64>,
    #[serde(default)]
    kd_sum: Option<f64>,
    #[serde(default)]
    ce_sum: Option<f64>,
    seen: usize,
    skipped: usize,
    seconds: f64,
    #[serde(default)]
    device_memory: crate::device::PeakDeviceMemory,
}

impl From<RecordedProgress> for EpochProgress {
    fn from(r: RecordedProgress) -> Self {
        let mut part_sums = r.part_sums;
        for (name, sum) in [("kd", r.kd_sum), ("ce", r.ce_sum)] {
            if let Some(s) = sum {
                part_sums.entry(name.into()).or_insert(s);
            }
        }
        Self {
            epoch: r.epoch,
            batches: r.batches,
            loss_sum: r.loss_sum,
            part_sums,
            seen: r.seen,
            skipped: r.skipped,
            seconds: r.seconds,
            device_memory: r.device_memory,
        }
    }
}

/// Everything needed to resume.
pub struct ResumeState {
    /// Model burnpack bytes.
    pub model: Vec<u8>,
    /// Optimizer burnpack bytes.
    pub optimizer: Vec<u8>,
    /// Loop state.
    pub state: LoopState,
    /// The learned feature projection and its optimizer (feature distillation), burnpack
    /// bytes.
    pub projection: Option<(Vec<u8>, Vec<u8>)>,
}

/// The resume file of a run with a feature projection: two more parts.
const MAGIC_PROJECTION: &[u8; 8] = b"KDRESUM2";

/// Writes the resume file atomically: the magic, then each part after its length, then their
/// checksum ([`crate::io::with_checksum`]). A run without a feature projection writes the
/// first format (three parts), as kd always has.
pub fn save_resume(
    path: &Path,
    model: &[u8],
    optimizer: &[u8],
    state: &LoopState,
    projection: Option<(&[u8], &[u8])>,
) -> Result<()> {
    let json = serde_json::to_vec(state)?;
    let (magic, parts): (&[u8], Vec<&[u8]>) = match projection {
        None => (MAGIC, vec![model, optimizer, &json]),
        Some((p, o)) => (MAGIC_PROJECTION, vec![model, optimizer, &json, p, o]),
    };
    let lengths: Vec<[u8; 8]> = parts
        .iter()
        .map(|part| (part.len() as u64).to_le_bytes())
        .collect();
    let mut all: Vec<&[u8]> = vec![magic];
    for (length, part) in lengths.iter().zip(&parts) {
        all.push(length);
        all.push(part);
    }
    let trailer = crate::io::with_checksum(&all);
    all.push(&trailer);
    write_atomic_parts(path, &all)
}

/// Reads a resume file, rejecting truncated or foreign files with a clear message.
pub fn load_resume(path: &Path) -> Result<ResumeState> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bytes = crate::io::verified(bytes, path)?;
    let damaged = || {
        anyhow::anyhow!(
            "resume file {} is truncated or not a kd checkpoint: delete it to restart the run",
            path.display()
        )
    };
    let count = match bytes.get(..8) {
        Some(m) if m == MAGIC => 3,
        Some(m) if m == MAGIC_PROJECTION => 5,
        _ => return Err(damaged()),
    };
    let mut parts = Vec::new();
    let mut pos = 8;
    for _ in 0..count {
        let len_bytes: [u8; 8] = bytes.get(pos..pos + 8).ok_or_else(damaged)?.try_into()?;
        let len = u64::from_le_bytes(len_bytes) as usize;
        pos += 8;
        let part = bytes
            .get(pos..pos.checked_add(len).ok_or_else(damaged)?)
            .ok_or_else(damaged)?;
        parts.push(part.to_vec());
        pos += len;
    }
    if pos != bytes.len() {
        bail!(damaged());
    }
    let mut parts = parts.into_iter();
    let mut next = || parts.next().expect("counted");
    let (model, optimizer) = (next(), next());
    let state: LoopState = serde_json::from_slice(&next()).map_err(|_| damaged())?;
    let projection = (count == 5).then(|| (next(), next()));
    Ok(ResumeState {
        model,
        optimizer,
        state,
        projection,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The progress of an epoch that an older kd interrupted still reads, its two sums as
    /// the named parts they were.
    #[test]
    fn interrupted_epochs_of_older_runs_read_as_named_parts() {
        let old = r#"{"epoch": 1, "batches": 3, "loss_sum": 6.0, "kd_sum": 1.5, "ce_sum": 4.5,
            "seen": 12, "skipped": 0, "seconds": 2.0, "device_memory": null}"#;
        let p: EpochProgress = serde_json::from_str(old).unwrap();
        assert_eq!(p.part_sums.get("kd"), Some(&1.5));
        assert_eq!(p.part_sums.get("ce"), Some(&4.5));
        assert_eq!((p.epoch, p.batches, p.seen), (1, 3, 12));
        let again: EpochProgress =
            serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(again, p);
    }
}
