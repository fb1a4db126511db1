//! The images a run trains and validates on: `train/` and `val/` folders or an in-memory
//! split, class-balanced subsets, and the warning about skipped non-image files.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::{ImageFolder, Sample, stratified_split};

/// The images a run trains and validates on.
#[derive(Debug, Clone)]
pub struct RunData {
    /// Class names (sorted folder names).
    pub classes: Vec<String>,
    /// Training images.
    pub train: Vec<Sample>,
    /// Validation images.
    pub val: Vec<Sample>,
    /// Non-image files that were skipped.
    pub skipped: Vec<PathBuf>,
}

impl RunData {
    /// Reads `dir/train` + `dir/val` when both exist, else splits `dir` in memory.
    pub fn resolve(dir: &Path, val_fraction: f64, seed: u64) -> Result<Self> {
        resolve(dir, val_fraction, seed)
    }

    /// At most `train_limit` training and `val_limit` validation images, class-balanced
    /// subsets drawn with `seed`.
    pub fn limited(
        mut self,
        train_limit: Option<usize>,
        val_limit: Option<usize>,
        seed: u64,
    ) -> Self {
        let classes = self.classes.len();
        if let Some(n) = train_limit {
            self.train = balanced_subset(&self.train, classes, n, seed);
        }
        if let Some(n) = val_limit {
            self.val = balanced_subset(&self.val, classes, n, seed ^ 1);
        }
        self
    }
}

/// Whether `dir` holds `train/` and `val/` folders (a split folder) rather than classes.
pub fn is_split(dir: &Path) -> bool {
    dir.join("train").is_dir() && dir.join("val").is_dir()
}

fn resolve(dir: &Path, val_fraction: f64, seed: u64) -> Result<RunData> {
    let (train_dir, val_dir) = (dir.join("train"), dir.join("val"));
    let data = if is_split(dir) {
        let train = ImageFolder::scan(&train_dir)?;
        let val = ImageFolder::scan_validation(&val_dir)?;
        if train.classes != val.classes {
            let (only_train, only_val) =
                super::folder::class_difference(&train.classes, &val.classes);
            bail!(
                "{} and {} have different classes (only in train: {only_train:?}, only in val: {only_val:?}): give both the same class folders",
                train_dir.display(),
                val_dir.display()
            );
        }
        RunData {
            classes: train.classes,
            skipped: [train.skipped, val.skipped].concat(),
            train: train.samples,
            val: val.samples,
        }
    } else {
        let folder = ImageFolder::scan(dir)?;
        let split = stratified_split(&folder, val_fraction, seed)?;
        RunData {
            classes: folder.classes,
            skipped: folder.skipped,
            train: split.train,
            val: split.val,
        }
    };
    if data.classes.len() < 2 {
        bail!(
            "{} has only one class ({}): a classifier needs at least two class folders",
            dir.display(),
            data.classes[0]
        );
    }
    if data.val.is_empty() {
        bail!(
            "{} gives no validation images: add images or lower --val-fraction",
            dir.display()
        );
    }
    Ok(data)
}

/// Refuses skipped non-image files under `strict`, else warns about them (even when quiet);
/// `None` for commands without a strict setting.
pub fn report_skipped(skipped: &[PathBuf], strict: Option<bool>) -> Result<()> {
    let Some(first) = skipped.first() else {
        return Ok(());
    };
    if strict == Some(true) {
        bail!(
            "{} is not an image ({} such files; kd reads {}): remove them or drop --strict to skip them",
            first.display(),
            skipped.len(),
            super::folder::IMAGE_EXTENSIONS.join("/")
        );
    }
    eprintln!(
        "warning: skipped {} non-image files (e.g. {}){}",
        skipped.len(),
        first.display(),
        if strict.is_some() {
            "; pass --strict (strict = true in a kd run file) to fail instead"
        } else {
            ""
        }
    );
    Ok(())
}

/// A class-balanced subset of at most `limit` samples, deterministic for a seed: each class
/// gives its share (classes in a seeded order get one more when `limit` does not divide).
pub fn balanced_subset(samples: &[Sample], classes: usize, limit: usize, seed: u64) -> Vec<Sample> {
    if limit >= samples.len() {
        return samples.to_vec();
    }
    let mut groups: Vec<Vec<&Sample>> = vec![Vec::new(); classes];
    for s in samples {
        groups[s.label].push(s);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for g in &mut groups {
        g.shuffle(&mut rng);
    }
    // The classes take turns in a seeded order, so a last, partial round (a limit below
    // the class count, say) does not always favour the first classes.
    let mut order: Vec<&Vec<&Sample>> = groups.iter().collect();
    order.shuffle(&mut rng);
    let mut out = Vec::with_capacity(limit);
    let mut round = 0;
    while out.len() < limit {
        for g in &order {
            if let Some(s) = g.get(round).filter(|_| out.len() < limit) {
                out.push((*s).clone());
            }
        }
        round += 1;
    }
    out.sort_by(|a, b| (a.label, &a.path).cmp(&(b.label, &b.path)));
    out
}

/// Refuses an output folder (a run, an evaluation, a comparison) inside the folders images
/// are read from (`data`, or its `train/` and `val/`): what it writes would be read as a
/// class, or as images of one.
pub fn check_out_is_not_read(out: &Path, data: &Path) -> Result<()> {
    let read = if is_split(data) {
        vec![data.join("train"), data.join("val")]
    } else {
        vec![data.to_path_buf()]
    };
    let out_resolved = crate::io::resolved(out);
    if let Some(dir) = read
        .iter()
        .find(|d| out_resolved.starts_with(crate::io::resolved(d)))
    {
        bail!(
            "--out {} is inside {}, where images are read from: choose an --out outside it",
            out.display(),
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(classes: usize, per_class: usize) -> Vec<Sample> {
        (0..classes * per_class)
            .map(|i| Sample {
                path: PathBuf::from(format!("{}/{i}.png", i % classes)),
                label: i % classes,
            })
            .collect()
    }

    fn labels(subset: &[Sample]) -> Vec<usize> {
        subset.iter().map(|s| s.label).collect()
    }

    #[test]
    fn balanced_subset_shares_classes_and_leftovers_fairly() {
        let all = samples(10, 6);
        // 23 of 10 classes: 2 each, 3 classes a third; the same for the same seed.
        let subset = balanced_subset(&all, 10, 23, 3);
        let counts: Vec<usize> = (0..10)
            .map(|c| labels(&subset).iter().filter(|&&l| l == c).count())
            .collect();
        assert_eq!(subset.len(), 23);
        assert!(counts.iter().all(|&n| n == 2 || n == 3), "{counts:?}");
        assert_eq!(labels(&balanced_subset(&all, 10, 23, 3)), labels(&subset));
        // Below the class count, which classes are picked depends on the seed: it had
        // always been the first ones.
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..20 {
            let subset = labels(&balanced_subset(&all, 10, 4, seed));
            let distinct: std::collections::BTreeSet<usize> = subset.iter().copied().collect();
            assert_eq!(distinct.len(), 4, "{subset:?}");
            seen.extend(distinct);
        }
        assert_eq!(
            seen.len(),
            10,
            "every class gets picked by some seed: {seen:?}"
        );
    }
}
