//! Seeded, stratified train/validation split, in memory or on disk (`kd split`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::folder::{ImageFolder, Sample};
use crate::io::resolved;

/// The two halves of a split.
#[derive(Debug, Clone)]
pub struct Split {
    /// Training images.
    pub train: Vec<Sample>,
    /// Validation images.
    pub val: Vec<Sample>,
    /// The validation share it was drawn with.
    pub val_fraction: f64,
    /// The seed it was drawn with.
    pub seed: u64,
}

/// What a split folder was made from, written next to its `train/` and `val/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitRecord {
    /// The class folder it was split from.
    pub source: PathBuf,
    /// Validation share.
    pub val_fraction: f64,
    /// Seed.
    pub seed: u64,
    /// Training images written.
    pub train_images: usize,
    /// Validation images written.
    pub val_images: usize,
}

/// File name of the [`SplitRecord`] in a split folder.
pub const SPLIT_RECORD: &str = "split.json";

impl SplitRecord {
    /// The record of a split folder; `None` when it has none (made by hand, or by a kd
    /// from before records).
    pub fn read(dst: &Path) -> Option<Self> {
        crate::io::read_json(&dst.join(SPLIT_RECORD)).ok()
    }

    /// Settings in which this record differs from splitting `source` with `val_fraction`
    /// and `seed`, as "key: recorded vs wanted".
    pub fn differences(&self, source: &Path, val_fraction: f64, seed: u64) -> Vec<String> {
        let mut out = Vec::new();
        if resolved(&self.source) != resolved(source) {
            out.push(format!(
                "source: {} vs {}",
                self.source.display(),
                source.display()
            ));
        }
        if self.val_fraction != val_fraction {
            out.push(format!(
                "val_fraction: {} vs {val_fraction}",
                self.val_fraction
            ));
        }
        if self.seed != seed {
            out.push(format!("seed: {} vs {seed}", self.seed));
        }
        out
    }
}

/// Checks that a validation fraction lies strictly between 0 and 1.
pub fn check_val_fraction(val_fraction: f64) -> Result<()> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        bail!("--val-fraction {val_fraction} is invalid: use a number between 0 and 1, e.g. 0.3");
    }
    Ok(())
}

/// Refuses a class too small to split (one image: nothing for val/), naming it, unless
/// `keep_tiny` keeps such classes in train/ only.
pub fn check_class_sizes(folder: &ImageFolder, keep_tiny: bool) -> Result<()> {
    if keep_tiny {
        return Ok(());
    }
    for (label, class) in folder.classes.iter().enumerate() {
        let n = folder.samples.iter().filter(|s| s.label == label).count();
        if n < 2 {
            bail!(
                "class '{class}' has {n} image: a split needs 2 or more per class (one for val/); add images, remove {}, or pass --keep-tiny-classes to keep it in train/ only",
                folder.root.join(class).display()
            );
        }
    }
    Ok(())
}

/// Number of validation images for a class of `n` images: rounded share, at least one
/// image on each side when the class has two or more.
pub fn val_count(n: usize, val_fraction: f64) -> usize {
    if n < 2 {
        return 0;
    }
    ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1)
}

/// Splits every class separately (stratified), deterministically for a seed.
pub fn stratified_split(folder: &ImageFolder, val_fraction: f64, seed: u64) -> Result<Split> {
    check_val_fraction(val_fraction)?;
    let mut split = Split {
        train: Vec::new(),
        val: Vec::new(),
        val_fraction,
        seed,
    };
    for label in 0..folder.classes.len() {
        let mut class: Vec<&Sample> = folder.samples.iter().filter(|s| s.label == label).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (label as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        class.shuffle(&mut rng);
        let n_val = val_count(class.len(), val_fraction);
        let (val, train) = class.split_at(n_val);
        let mut val: Vec<Sample> = val.iter().map(|s| (*s).clone()).collect();
        let mut train: Vec<Sample> = train.iter().map(|s| (*s).clone()).collect();
        val.sort_by(|a, b| a.path.cmp(&b.path));
        train.sort_by(|a, b| a.path.cmp(&b.path));
        split.train.extend(train);
        split.val.extend(val);
    }
    Ok(split)
}

/// How `kd split` materialises files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Copy each image.
    Copy,
    /// Hard-link each image (same file system only).
    HardLink,
}

/// The first entry of `dst` that an earlier split would not have made (anything but its
/// `train/` and `val/` folders and its `split.json`), if any.
fn not_of_a_split(dst: &Path) -> Result<Option<String>> {
    for entry in fs::read_dir(dst).with_context(|| format!("cannot read {}", dst.display()))? {
        let entry = entry.with_context(|| format!("cannot read {}", dst.display()))?;
        let name = entry.file_name();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let made = if is_dir {
            name == "train" || name == "val"
        } else {
            name == SPLIT_RECORD
        };
        if !made {
            return Ok(Some(name.to_string_lossy().into_owned()));
        }
    }
    Ok(None)
}

/// Writes `dst/train/<class>/…`, `dst/val/<class>/…` and the [`SplitRecord`]
/// `dst/split.json`. Builds into a temporary sibling folder and renames it into place, so an
/// interrupted split leaves no partial `dst`.
pub fn write_split(
    folder: &ImageFolder,
    split: &Split,
    dst: &Path,
    mode: LinkMode,
    force: bool,
) -> Result<()> {
    let (src, out) = (resolved(&folder.root), resolved(dst));
    if out.starts_with(&src) {
        bail!(
            "destination {} is inside the source {}: its train/ and val/ would be read as classes; choose a folder outside it",
            dst.display(),
            folder.root.display()
        );
    }
    if src.starts_with(&out) {
        bail!(
            "the source {} is inside the destination {}, which the split replaces: choose another destination",
            folder.root.display(),
            dst.display()
        );
    }
    // One split into a destination at a time: the lock sits next to it (the destination
    // itself is replaced), and a split that finds it held stops at once.
    let _lock = lock_destination(dst)?;
    remove_dead_partials(dst);
    if dst.exists() {
        let non_empty = fs::read_dir(dst)
            .with_context(|| format!("cannot read {}", dst.display()))?
            .next()
            .is_some();
        if non_empty && !force {
            bail!(
                "destination {} is not empty: choose another folder or pass --force to replace it",
                dst.display()
            );
        }
        // --force replaces an earlier split, nothing else: only `train/` and `val/`.
        if non_empty && let Some(other) = not_of_a_split(dst)? {
            bail!(
                "destination {} is not an earlier split (it holds {}): --force replaces only a folder of train/, val/ and split.json; remove it yourself or choose another",
                dst.display(),
                other
            );
        }
        if resolved(Path::new(".")).starts_with(&out) {
            bail!(
                "the working folder is inside the destination {}, which the split replaces: run kd split from elsewhere",
                dst.display()
            );
        }
    }
    let parent = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(parent).with_context(|| {
        format!(
            "cannot create {}: choose a writable location",
            parent.display()
        )
    })?;
    let name = dst.file_name().context("destination has no folder name")?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        for (part, samples) in [("train", &split.train), ("val", &split.val)] {
            for class in &folder.classes {
                let dir = staging.join(part).join(class);
                fs::create_dir_all(&dir).with_context(|| {
                    format!(
                        "cannot create {}: choose a writable location",
                        dir.display()
                    )
                })?;
            }
            for s in samples.iter() {
                slow_split_hook();
                if crate::interrupt::requested() {
                    return Err(crate::interrupt::Stopped(format!(
                        "nothing of {} was written",
                        dst.display()
                    ))
                    .into());
                }
                let target = staging
                    .join(part)
                    .join(&folder.classes[s.label])
                    .join(relative_name(folder, s));
                if let Some(p) = target.parent() {
                    fs::create_dir_all(p)?;
                }
                match mode {
                    LinkMode::Copy => fs::copy(&s.path, &target).map(|_| ()),
                    LinkMode::HardLink => fs::hard_link(&s.path, &target),
                }
                .with_context(|| {
                    format!(
                        "cannot write {} (from {})",
                        target.display(),
                        s.path.display()
                    )
                })?;
            }
        }
        let record = SplitRecord {
            source: src.clone(),
            val_fraction: split.val_fraction,
            seed: split.seed,
            train_images: split.train.len(),
            val_images: split.val.len(),
        };
        crate::io::write_json(&staging.join(SPLIT_RECORD), &record)?;
        if dst.exists() {
            fs::remove_dir_all(dst).with_context(|| format!("cannot replace {}", dst.display()))?;
        }
        fs::rename(&staging, dst).with_context(|| format!("cannot create {}", dst.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// Test hook: `KD_FAULT_SLOW_SPLIT_MS=N` waits N ms before each file a split writes, so
/// that a test can interrupt or race it.
fn slow_split_hook() {
    if let Some(ms) = std::env::var("KD_FAULT_SLOW_SPLIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Locks the destination of a split (`.NAME.kd-lock` next to it), or says another process
/// holds it. The operating system releases the lock when the process ends.
fn lock_destination(dst: &Path) -> Result<fs::File> {
    let parent = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let name = dst.file_name().context("destination has no folder name")?;
    fs::create_dir_all(parent).with_context(|| {
        format!(
            "cannot create {}: choose a writable location",
            parent.display()
        )
    })?;
    let path = parent.join(format!(".{}.kd-lock", name.to_string_lossy()));
    match crate::io::try_lock_file(&path)? {
        Some(file) => Ok(file),
        None => bail!(
            "{} is being written by another kd split: wait for it to finish, or choose another destination",
            dst.display()
        ),
    }
}

/// Removes the staging folders (`.NAME.partial-PID`) of splits into `dst` whose process was
/// killed.
fn remove_dead_partials(dst: &Path) {
    let parent = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let Some(name) = dst.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let prefix = format!(".{name}.partial-");
    for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with(&prefix) && crate::io::left_by_dead_process(&file, ".partial-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Path of a sample relative to its class folder.
fn relative_name(folder: &ImageFolder, s: &Sample) -> PathBuf {
    let class_dir = folder.root.join(&folder.classes[s.label]);
    s.path
        .strip_prefix(&class_dir)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| PathBuf::from(s.path.file_name().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn val_count_keeps_both_sides_non_empty() {
        assert_eq!(val_count(10, 0.3), 3);
        assert_eq!(val_count(2, 0.01), 1);
        assert_eq!(val_count(2, 0.99), 1);
        assert_eq!(val_count(1, 0.5), 0);
    }

    #[test]
    fn bad_fractions_are_refused() {
        for f in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            assert!(check_val_fraction(f).is_err(), "{f}");
        }
    }
}
