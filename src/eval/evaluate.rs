//! Evaluating a network over a loader, and `kd eval`'s job: a run's checkpoint on its
//! validation images or on another folder, its report written next to the run.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use serde::Serialize;

use super::scores::{ConfusionMatrix, Evaluation};
use crate::data::tensors::{labels_tensor, rows, take_images_tensor};
use crate::data::{ImageFolder, Loader, Sample};
use crate::losses::cross_entropy;
use crate::models::Network;
use crate::ops::Ctx;
use crate::run::{Checkpoint, Run, files};

/// Evaluates `net` (in inference mode, on a plain device) over a loader.
pub fn evaluate(
    net: &Network,
    loader: &Loader,
    classes: &[String],
    device: &Device,
    cx: &Ctx,
) -> Result<Evaluation> {
    let mut confusion = ConfusionMatrix::new(classes.len());
    let mut loss_sum = 0.0f64;
    for batch in loader.epoch(0, 0) {
        let mut batch = batch?;
        let logits = net.forward(take_images_tensor(&mut batch, device), cx);
        let loss: f32 = cross_entropy(logits.clone(), labels_tensor(&batch, device)).into_scalar();
        loss_sum += f64::from(loss) * batch.len() as f64;
        for (row, &label) in rows(logits)?.iter().zip(&batch.labels) {
            confusion.add(label as usize, argmax(row));
        }
    }
    let n = confusion.total().max(1) as f64;
    Ok(confusion.evaluation(classes, loss_sum / n))
}

/// Index of the largest value (first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// What `kd eval` writes and prints: an evaluation and what it evaluated.
#[derive(Debug, Serialize)]
pub struct EvalReport<'a> {
    /// Run folder.
    pub run: &'a Path,
    /// The checkpoint evaluated.
    pub checkpoint: Checkpoint,
    /// The epoch that checkpoint holds, when the run's metrics say.
    pub epoch: Option<usize>,
    /// The images' folder.
    pub data: &'a Path,
    /// Whether the images were the run's validation split of `data` (else all of `data`).
    pub validation_split: bool,
    /// The scores.
    #[serde(flatten)]
    pub evaluation: &'a Evaluation,
}

/// The images `kd eval` scores and where its results go.
#[derive(Debug)]
pub struct EvalTarget {
    /// The images.
    pub samples: Vec<Sample>,
    /// Their folder, as recorded in the report.
    pub data: PathBuf,
    /// Whether they are the run's own validation split.
    pub validation_split: bool,
    /// The JSON report.
    pub json: PathBuf,
    /// The confusion-matrix chart.
    pub png: PathBuf,
}

/// The images to evaluate `checkpoint` of `run` on: its validation split, or with `data` the
/// images of `data/val` (or of `data` itself). Results go to `out` (default `RUN/eval`) as
/// `eval-CHECKPOINT.json`, or `eval-CHECKPOINT-on-FOLDER.json` for other data, so that they do
/// not replace the run's own evaluation; a file of another folder with the same name is not
/// replaced either.
pub fn eval_target(
    run: &Run,
    checkpoint: Checkpoint,
    data: Option<&Path>,
    out: Option<&Path>,
) -> Result<EvalTarget> {
    let (samples, folder, suffix) = match data {
        None => {
            let images = run.config.images().with_context(|| {
                let relative = if run.config.data.is_relative() {
                    format!(
                        ", or run kd eval from the folder it was trained in (its data path {} is relative)",
                        run.config.data.display()
                    )
                } else {
                    String::new()
                };
                format!(
                    "cannot read the validation images of run {}: pass --data{relative}",
                    run.dir.display()
                )
            })?;
            check_classes(run, &images.classes, &run.config.data)?;
            (images.val, run.config.data.clone(), String::new())
        }
        Some(given) => {
            let dir = if given.join("val").is_dir() {
                given.join("val")
            } else {
                given.to_path_buf()
            };
            let folder = ImageFolder::scan(&dir)?;
            crate::data::report_skipped(&folder.skipped, None)?;
            check_classes(run, &folder.classes, &dir)?;
            // Named after the folder, so it does not replace the run's own evaluation.
            let name = crate::io::resolved(given)
                .file_name()
                .map(|n| {
                    n.to_string_lossy()
                        .replace(|c: char| !c.is_alphanumeric() && c != '-' && c != '.', "_")
                })
                .unwrap_or_else(|| "data".into());
            (
                folder.samples,
                crate::io::resolved(&dir),
                format!("-on-{name}"),
            )
        }
    };
    if let Some(out) = out {
        crate::data::dataset::check_out_is_not_read(out, &folder)?;
    }
    let out = out.map_or_else(|| run.dir.join(files::EVAL), Path::to_path_buf);
    let target = EvalTarget {
        samples,
        validation_split: data.is_none(),
        json: out.join(format!("eval-{checkpoint}{suffix}.json")),
        png: out.join(format!("confusion-{checkpoint}{suffix}.png")),
        data: folder,
    };
    if !target.validation_split {
        refuse_other_data_in(&target.json, &target.data)?;
    }
    Ok(target)
}

/// Refuses to replace an evaluation file that holds the scores of another folder (two
/// folders with the same name, `a/test` and `b/test`).
fn refuse_other_data_in(json_path: &Path, data: &Path) -> Result<()> {
    let Ok(previous) = crate::io::read_json::<serde_json::Value>(json_path) else {
        return Ok(());
    };
    // Relative paths (written by an older kd) cannot be resolved from here: replaced.
    let Some(before) = previous["data"]
        .as_str()
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    else {
        return Ok(());
    };
    if crate::io::resolved(&before) != crate::io::resolved(data) {
        bail!(
            "{} holds the evaluation of {}, another folder named like {}: pass --out DIR to keep both",
            json_path.display(),
            before.display(),
            data.display()
        );
    }
    Ok(())
}

/// Refuses images of other classes than the run's.
fn check_classes(run: &Run, classes: &[String], dir: &Path) -> Result<()> {
    if run.classes != classes {
        let (missing, extra) = crate::data::folder::class_difference(classes, &run.classes);
        bail!(
            "{} has other classes than run {} (data only: {missing:?}, run only: {extra:?}): evaluate on data with the run's classes",
            dir.display(),
            run.dir.display()
        );
    }
    Ok(())
}
