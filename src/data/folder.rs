//! Scanning an ImageFolder: one sub-folder per class, classes in sorted order (torchvision's).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::io::resolved;

/// File extensions `kd` decodes (what the `image` crate is built with here).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "webp"];

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Path of the image file.
    pub path: PathBuf,
    /// Class index into [`ImageFolder::classes`].
    pub label: usize,
}

/// A scanned image folder.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// The folder that was scanned.
    pub root: PathBuf,
    /// Class names, sorted; a label is an index into this list.
    pub classes: Vec<String>,
    /// Every image, ordered by class then path.
    pub samples: Vec<Sample>,
    /// Files inside class folders that are not images (skipped).
    pub skipped: Vec<PathBuf>,
}

/// Whether a path has one of [`IMAGE_EXTENSIONS`].
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Classes only in `a` and only in `b` (for error messages about mismatched class sets).
pub fn class_difference<'a>(
    a: &'a [String],
    b: &'a [String],
) -> (Vec<&'a String>, Vec<&'a String>) {
    let only = |x: &'a [String], y: &'a [String]| x.iter().filter(|c| !y.contains(c)).collect();
    (only(a, b), only(b, a))
}

/// Sorted names of the sub-folders of `root` (the class names).
pub fn class_names(root: &Path) -> Result<Vec<String>> {
    if !root.exists() {
        bail!(
            "data folder {} does not exist: pass a folder with one sub-folder per class",
            root.display()
        );
    }
    if !root.is_dir() {
        bail!(
            "{} is not a folder: pass a folder with one sub-folder per class",
            root.display()
        );
    }
    let mut classes = Vec::new();
    let entries =
        fs::read_dir(root).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", root.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && !entry.file_name().to_string_lossy().starts_with('.') {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                bail!(
                    "class folder name {} is not valid UTF-8: rename the folder (class names go into classes.json)",
                    path.display()
                );
            };
            classes.push(name);
        }
    }
    classes.sort();
    if classes.is_empty() {
        bail!(
            "{} has no class sub-folders: put the images of each class in a sub-folder named after the class",
            root.display()
        );
    }
    let has = |name: &str| classes.iter().any(|c| c == name);
    if has("train") && has("val") {
        bail!(
            "{} is already split (train/, val/), not a folder of class folders: kd train and kd distill take it as it is; here pass {}",
            root.display(),
            root.join("train").display()
        );
    }
    if has("train") && (classes.len() == 1 || SPLIT_NAMES.iter().any(|n| has(n))) {
        bail!(
            "{} looks like a dataset root ({}/), not a folder of class folders: pass {} (split in memory, or with `kd split`), or give it a val/ folder to train on train/ and val/",
            root.display(),
            classes.join("/, "),
            root.join("train").display()
        );
    }
    Ok(classes)
}

/// Folder names that, next to `train`, mark a dataset root rather than a class.
const SPLIT_NAMES: &[&str] = &["valid", "validation", "test"];

/// Every image file under `dir` (sorted; hidden entries skipped, symlinks followed but no
/// folder entered twice, none above `dir`): the images `kd predict` is given a folder of.
/// Also returns the other (non-image) files found.
pub fn images_under(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let own = resolved(dir);
    let fence = Fence {
        root: own.clone(),
        own: own.clone(),
        others: Vec::new(),
    };
    let (mut files, mut skipped) = (Vec::new(), Vec::new());
    walk(
        dir,
        &mut files,
        &mut skipped,
        &mut HashSet::from([own]),
        &fence,
    )?;
    files.sort();
    Ok((files, skipped))
}

impl ImageFolder {
    /// Scans `root`. Fails on a missing folder, no classes or a class without images.
    pub fn scan(root: &Path) -> Result<Self> {
        Self::scan_with(root, false)
    }

    /// Scans the validation images of a split folder, where a class kept in train/ only
    /// (`kd split --keep-tiny-classes`) has an empty folder.
    pub fn scan_validation(root: &Path) -> Result<Self> {
        Self::scan_with(root, true)
    }

    fn scan_with(root: &Path, allow_empty: bool) -> Result<Self> {
        let classes = class_names(root)?;
        let mut samples = Vec::new();
        let mut skipped = Vec::new();
        let dataset = resolved(root);
        let targets = class_targets(root, &dataset, &classes)?;
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut files = Vec::new();
            let own = targets[label].clone();
            let fence = Fence {
                root: dataset.clone(),
                own: own.clone(),
                others: [&targets[..label], &targets[label + 1..]].concat(),
            };
            walk(
                &dir,
                &mut files,
                &mut skipped,
                &mut HashSet::from([own]),
                &fence,
            )?;
            if files.is_empty() && !allow_empty {
                bail!(
                    "class folder {} has no images ({}): add images or remove the folder",
                    dir.display(),
                    IMAGE_EXTENSIONS.join("/")
                );
            }
            files.sort();
            samples.extend(files.into_iter().map(|path| Sample { path, label }));
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            samples,
            skipped,
        })
    }
}

/// The canonical folder of each class, refusing class folders that are symlinks to the
/// dataset folder or one above it, or to the same folder as another class (or one holding
/// it): their images would be read under two labels.
fn class_targets(root: &Path, dataset: &Path, classes: &[String]) -> Result<Vec<PathBuf>> {
    let targets: Vec<PathBuf> = classes.iter().map(|c| resolved(&root.join(c))).collect();
    for (class, t) in classes.iter().zip(&targets) {
        if dataset.starts_with(t) {
            bail!(
                "class folder {} links to {}, which holds the whole dataset: make it a folder of that class's images",
                root.join(class).display(),
                t.display()
            );
        }
    }
    for (i, t) in targets.iter().enumerate() {
        let dir = root.join(&classes[i]);
        if let Some(j) = (0..targets.len())
            .find(|&j| j != i && (targets[j].starts_with(t) || t.starts_with(&targets[j])))
        {
            bail!(
                "class folders {} and {} are the same folder, or one holds the other (through a symlink): give each class a folder of its own images",
                dir.display(),
                root.join(&classes[j]).display()
            );
        }
    }
    Ok(targets)
}

/// The folders a walk for one class (or one `kd predict` folder) may enter.
struct Fence {
    /// The dataset folder (canonical).
    root: PathBuf,
    /// The class's own folder (canonical).
    own: PathBuf,
    /// The other classes' folders (canonical; they may lie outside the dataset).
    others: Vec<PathBuf>,
}

impl Fence {
    /// The class's own folders, and linked folders outside the dataset; never the dataset
    /// folder or one above it (a symlink loop, or every class at once), nor a folder of, in
    /// or holding another class.
    fn allows(&self, dir: &Path) -> bool {
        if self.root.starts_with(dir) {
            return false;
        }
        if dir.starts_with(&self.own) {
            return true;
        }
        !dir.starts_with(&self.root)
            && !self
                .others
                .iter()
                .any(|o| dir.starts_with(o) || o.starts_with(dir))
    }
}

/// Recursively collects image files below `dir`; follows symlinks where `fence` allows but
/// never enters a folder twice.
fn walk(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    skipped: &mut Vec<PathBuf>,
    seen: &mut HashSet<PathBuf>,
    fence: &Fence,
) -> Result<()> {
    let entries =
        fs::read_dir(dir).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            let target = resolved(&path);
            if fence.allows(&target) && seen.insert(target) {
                walk(&path, files, skipped, seen, fence)?;
            }
        } else if is_image_file(&path) {
            files.push(path);
        } else if path.is_file() {
            skipped.push(path);
        }
    }
    Ok(())
}
