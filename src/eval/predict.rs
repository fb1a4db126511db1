//! Prediction: the top classes of images with a trained network, the images `kd predict` is
//! given (files and folders, each once), and its CSV.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use burn::tensor::Device;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};

use crate::data::tensors::{rows, take_images_tensor};
use crate::data::{Loader, Sample};
use crate::infer::Inference;
use crate::io::ensure_dir;

/// One class and its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Class name.
    pub class: String,
    /// Softmax probability.
    pub probability: f32,
}

/// Top-k prediction of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Image path.
    pub path: String,
    /// Most probable classes, best first.
    pub top: Vec<Scored>,
}

/// Top-k predictions for every sample of a (non-shuffled) loader.
pub fn predict(
    model: &mut Inference,
    loader: &Loader,
    classes: &[String],
    k: usize,
    device: &Device,
) -> Result<Vec<Prediction>> {
    let mut out = Vec::with_capacity(loader.len());
    for batch in loader.epoch(0, 0) {
        let mut batch = batch?;
        let probs = softmax(model.logits(take_images_tensor(&mut batch, device))?, 1);
        for (row, &i) in rows(probs)?.iter().zip(&batch.indices) {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            out.push(Prediction {
                path: loader.samples()[i].path.display().to_string(),
                top: order
                    .into_iter()
                    .take(k.max(1))
                    .map(|c| Scored {
                        class: classes[c].clone(),
                        probability: row[c],
                    })
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// The images to predict, each once (given twice, or also inside a folder given), and the
/// name of each in a CSV: relative to the folder given, or its file name.
#[derive(Debug, Default)]
pub struct Images {
    /// The images, as samples of no class.
    pub samples: Vec<Sample>,
    /// CSV name by path (as [`Prediction::path`] spells it).
    pub names: HashMap<String, String>,
}

impl Images {
    /// Collects image files and the images under folders. With `unique_names` (a CSV), two
    /// images that would share a name are refused.
    pub fn collect(paths: &[PathBuf], unique_names: bool) -> Result<Self> {
        let mut found: Vec<(PathBuf, String)> = Vec::new();
        for p in paths {
            if p.is_dir() {
                let (files, mut skipped) = crate::data::folder::images_under(p)?;
                // A split folder's own record is not a stray file.
                skipped
                    .retain(|f| f.file_name() != Some(crate::data::split::SPLIT_RECORD.as_ref()));
                crate::data::report_skipped(&skipped, None)?;
                if files.is_empty() {
                    bail!(
                        "{} contains no images ({})",
                        p.display(),
                        crate::data::folder::IMAGE_EXTENSIONS.join("/")
                    );
                }
                for path in files {
                    let name = path.strip_prefix(p).unwrap_or(&path).display().to_string();
                    found.push((path, name));
                }
            } else if p.is_file() {
                let name = p.file_name().map_or_else(
                    || p.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                found.push((p.clone(), name));
            } else if p.exists() {
                bail!(
                    "{} is not a regular file (a device, FIFO or socket): pass image files or folders",
                    p.display()
                );
            } else {
                bail!(
                    "{} does not exist: pass image files or folders",
                    p.display()
                );
            }
        }
        let mut images = Self::default();
        let mut seen = HashSet::new();
        let mut named: HashMap<String, PathBuf> = HashMap::new();
        for (path, name) in found {
            if !seen.insert(crate::io::resolved(&path)) {
                continue;
            }
            if unique_names && let Some(other) = named.insert(name.clone(), path.clone()) {
                bail!(
                    "--csv: {} and {} would both be named '{name}': predict them separately, or pass the folder that holds both",
                    other.display(),
                    path.display()
                );
            }
            images.names.insert(path.display().to_string(), name);
            images.samples.push(Sample { path, label: 0 });
        }
        Ok(images)
    }

    /// Refuses a CSV path that would overwrite an input: one of the images, a folder given,
    /// or a path with an image's extension (a shell glob such as `imgs/*.png` after
    /// `--csv` makes its first match the CSV).
    pub fn check_csv_path(&self, csv: &Path, inputs: &[PathBuf]) -> Result<()> {
        let ext = csv
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        if let Some(ext) = ext
            && crate::data::folder::IMAGE_EXTENSIONS.contains(&ext.as_str())
        {
            bail!(
                "--csv {} is an image path (a shell glob after --csv?): give a .csv file, e.g. --csv predictions.csv",
                csv.display()
            );
        }
        let target = crate::io::resolved(csv);
        let reads = self.samples.iter().map(|s| &s.path).chain(inputs);
        if let Some(input) = reads.into_iter().find(|p| crate::io::resolved(p) == target) {
            bail!(
                "--csv {} is an input ({}): give another file for the predictions",
                csv.display(),
                input.display()
            );
        }
        if csv.is_dir() {
            bail!(
                "--csv {} is a folder: give a file, e.g. {}",
                csv.display(),
                csv.join("predictions.csv").display()
            );
        }
        Ok(())
    }

    /// Writes each image's top class as `file,class,probability` (RFC 4180 quoting).
    pub fn write_csv(&self, predictions: &[Prediction], path: &Path) -> Result<()> {
        let mut csv = String::from("file,class,probability\n");
        for p in predictions {
            let name = self.names.get(&p.path).unwrap_or(&p.path);
            let top = &p.top[0];
            csv += &format!(
                "{},{},{}\n",
                csv_field(name),
                csv_field(&top.class),
                top.probability
            );
        }
        if let Some(parent) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            ensure_dir(parent)?;
        }
        crate::io::write_atomic(path, csv.as_bytes())
    }
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("Black-grass"), "Black-grass");
        assert_eq!(csv_field("a,b.png"), "\"a,b.png\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }
}
