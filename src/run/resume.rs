//! What a run folder allows next: whether it is finished, resumable, or holds a run that
//! saved nothing (and is started again), and the checks `--resume` makes before continuing.

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::checkpoint::{DataFingerprint, ResumeState, load_resume};
use super::files::{self, Checkpoint};
use super::{Run, TrainConfig};

/// Whether `dir` holds a finished run (its final checkpoint is written last).
pub fn finished(dir: &Path) -> bool {
    dir.join(files::CHECKPOINTS)
        .join(Checkpoint::Final.file_name())
        .is_file()
}

/// The resume file of the run in `dir`.
pub fn resume_path(dir: &Path) -> std::path::PathBuf {
    dir.join(files::CHECKPOINTS).join(files::RESUME)
}

/// Whether `dir` holds a run that stopped before it could be continued: no resume state and
/// no final checkpoint, and at most its first epoch's metrics (an error or `kill -9` during
/// the first epoch, or while its files were written, a full disk among them; Ctrl-C saves a
/// resumable state). Nothing in it is worth keeping, so a new run (with or without
/// `--resume`) starts there afresh.
pub fn saved_no_epoch(dir: &Path) -> bool {
    let ckpt = dir.join(files::CHECKPOINTS);
    let metrics = dir.join(files::METRICS);
    Run::open(dir).is_ok()
        && [Checkpoint::Final.file_name(), files::RESUME]
            .iter()
            .all(|f| !ckpt.join(f).exists())
        && (!metrics.exists() || super::metrics::read_metrics(dir).is_ok_and(|m| m.len() <= 1))
}

/// Empties a run folder that holds nothing worth keeping (its lock stays, held by the caller).
pub fn clear(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else if entry.file_name() == files::LOCK {
            Ok(())
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("cannot clear {}", path.display()))?;
    }
    Ok(())
}

/// Checks that `dir` holds a resumable run made with the same config, classes and images;
/// fills in the recorded normalization; returns the resume state.
pub fn check_resume(
    config: &mut TrainConfig,
    dir: &Path,
    classes: &[String],
    fingerprint: &DataFingerprint,
) -> Result<ResumeState> {
    let previous = Run::open(dir).with_context(|| format!("cannot resume {}", dir.display()))?;
    if previous.classes != classes {
        let (now, before) = crate::data::folder::class_difference(classes, &previous.classes);
        bail!(
            "cannot resume {}: {} now has other classes (new: {now:?}, gone: {before:?}); restore the class folders or train a new run in another --out",
            dir.display(),
            config.data.display()
        );
    }
    if config.mean.is_none() {
        config.mean = previous.config.mean;
    }
    if config.std.is_none() {
        config.std = previous.config.std;
    }
    // The teacher checkpoint's checksum is kd's record, not a setting: checked by
    // `train::prepare` once the teacher is open.
    if let (Some(t), Some(before)) = (&mut config.teacher, &previous.config.teacher)
        && t.checkpoint_crc32.is_none()
    {
        t.checkpoint_crc32 = before.checkpoint_crc32;
    }
    let mut wanted = config.clone();
    wanted.epochs = previous.config.epochs; // extending a run is allowed
    let diff = wanted.differing_keys(&previous.config);
    if !diff.is_empty() {
        bail!(
            "cannot resume {}: its config differs in {}; rerun with the same settings or use a new --out",
            dir.display(),
            diff.join("; ")
        );
    }
    let resume_path = resume_path(dir);
    if !resume_path.is_file() {
        bail!(
            "cannot resume {}: its resume state {} is missing: train it again in a new --out, or delete the folder",
            dir.display(),
            resume_path.display()
        );
    }
    let resumed = load_resume(&resume_path)?;
    // Fewer epochs than it has done cannot be undone; as many ends the run where it is
    // (its final checkpoint is written then), unless it stopped inside the next epoch.
    let done = resumed.state.epochs_done;
    let partial = resumed
        .state
        .partial
        .as_ref()
        .is_some_and(|p| p.epoch == done);
    if config.epochs < done || (config.epochs == done && partial) {
        bail!(
            "cannot resume {} with {} epochs: it has finished {done}{}; ask for {} or more \
             (--epochs, or `epochs` in a kd run file)",
            dir.display(),
            config.epochs,
            if partial { " and started the next" } else { "" },
            if partial { done + 1 } else { done }
        );
    }
    if let Some(saved) = &resumed.state.data
        && saved != fingerprint
    {
        bail!(
            "cannot resume {}: the images under {} changed since it started ({} training and {} validation images then, {} and {} now, or other files): restore them, or train a new run in another --out",
            dir.display(),
            config.data.display(),
            saved.train_images,
            saved.val_images,
            fingerprint.train_images,
            fingerprint.val_images
        );
    }
    Ok(resumed)
}
