//! `kd compare`: accuracy and loss curves of several runs and a results table.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use crate::bench::{inference_times, median};
use crate::device::{DeviceSpec, PeakDeviceMemory, Precision};
use crate::io::{ensure_dir, read_json, write_atomic, write_json};
use crate::models::{Network, param_count};
use crate::report::{Series, curves_png};
use crate::run::Run;
use crate::train::EpochMetrics;
use crate::train::metrics::best_epoch;

/// One row of the results table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRow {
    /// Label in charts and table ("teacher", "student without KD", "student with KD").
    pub label: String,
    /// Run folder.
    pub run: PathBuf,
    /// Architecture name.
    pub network: String,
    /// Trainable parameters.
    pub parameters: usize,
    /// Size of the best checkpoint, MB.
    pub checkpoint_mb: f64,
    /// Completed epochs.
    pub epochs: usize,
    /// Best validation accuracy.
    pub best_accuracy: f64,
    /// Last epoch's validation accuracy.
    pub final_accuracy: f64,
    /// Macro F1 at the best epoch.
    pub macro_f1: f64,
    /// Training wall time, seconds.
    pub training_seconds: f64,
    /// Inference images/s of the best checkpoint (batch 32, this machine).
    pub inference_images_per_second: f64,
    /// Device the inference speed was measured on (e.g. "flex (CPU)", "cuda:0").
    #[serde(default)]
    pub inference_device: String,
    /// Precision the inference speed was measured in.
    #[serde(default)]
    pub inference_precision: Precision,
}

/// Where `kd compare` measures inference speed.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpeedOptions {
    /// Device of the measurement.
    pub device: DeviceSpec,
    /// Precision of the measurement; `None` measures each run in the precision it was trained in.
    pub precision: Option<Precision>,
}

/// Label for a run: its role in a distillation study.
fn label(run: &Run, all: &[Run]) -> String {
    let role = if run.config.teacher.is_some() {
        "student with KD"
    } else if all.iter().any(|r| {
        r.config
            .teacher
            .as_ref()
            .is_some_and(|t| same_dir(&t.run, &run.dir))
    }) {
        "teacher"
    } else {
        "student without KD"
    };
    format!("{role} ({})", run.config.model.name)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Median images/s of batch-32 inference at `s` x `s` on `device`. A GPU gets more warm-up
/// steps: its first calls of each shape compile and autotune kernels.
fn inference_speed(net: &Network, s: usize, device: &Device, on_cpu: bool) -> f64 {
    let (warmup, timed) = if on_cpu { (1, 3) } else { (3, 5) };
    let x = Tensor::<4>::random([32, 3, s, s], Distribution::Normal(0.0, 1.0), device);
    let times = inference_times(net, x, warmup, timed, &mut PeakDeviceMemory::default());
    32.0 / median(times)
}

/// Compares runs: writes `accuracy.png`, `loss.png` (validation), `train_loss.png`,
/// `results.md` and `results.json` into `out`; inference speed is measured as `speed` says.
pub fn compare(runs: &[PathBuf], out: &Path, speed: SpeedOptions) -> Result<Vec<RunRow>> {
    if runs.is_empty() {
        bail!("no runs given: pass one or more run folders");
    }
    let opened: Vec<Run> = runs.iter().map(|r| Run::open(r)).collect::<Result<_>>()?;
    let mut rows = Vec::new();
    let (mut acc_series, mut val_loss_series, mut train_loss_series) =
        (Vec::new(), Vec::new(), Vec::new());
    for run in &opened {
        let history: Vec<EpochMetrics> = read_json(&run.dir.join("metrics.json"))?;
        let Some(best) = best_epoch(&history) else {
            bail!("run {} has no finished epoch yet", run.dir.display());
        };
        let label = label(run, &opened);
        let precision = speed.precision.unwrap_or(run.config.precision);
        let device = crate::device::open(speed.device, precision)?;
        let net = run.load_network("best", &device)?;
        let previous = crate::device::precision();
        crate::device::set_precision(precision);
        let images_per_second = inference_speed(
            &net,
            run.config.image_size,
            &device,
            speed.device == DeviceSpec::Cpu,
        );
        crate::device::set_precision(previous);
        let ckpt = run.checkpoint_path("best")?;
        rows.push(RunRow {
            label: label.clone(),
            run: run.dir.clone(),
            network: run.config.model.name.clone(),
            parameters: param_count(&net),
            checkpoint_mb: std::fs::metadata(&ckpt)?.len() as f64 / 1e6,
            epochs: history.len(),
            best_accuracy: best.val_accuracy,
            final_accuracy: history.last().expect("non-empty").val_accuracy,
            macro_f1: best.val_macro_f1,
            training_seconds: history.iter().map(|m| m.seconds).sum(),
            inference_images_per_second: images_per_second,
            inference_device: crate::device::describe(speed.device),
            inference_precision: precision,
        });
        let series = |f: fn(&EpochMetrics) -> f64| Series {
            label: label.clone(),
            points: history.iter().map(|m| (m.epoch as f64, f(m))).collect(),
        };
        acc_series.push(series(|m| m.val_accuracy * 100.0));
        val_loss_series.push(series(|m| m.val_loss));
        train_loss_series.push(series(|m| m.train_loss));
    }
    ensure_dir(out)?;
    curves_png(
        &out.join("accuracy.png"),
        "validation accuracy",
        "accuracy (%)",
        &acc_series,
    )?;
    curves_png(
        &out.join("loss.png"),
        "validation loss (cross-entropy)",
        "loss",
        &val_loss_series,
    )?;
    // Not comparable across runs: a KD run's objective includes the soft-target term.
    curves_png(
        &out.join("train_loss.png"),
        "training loss (each run's objective)",
        "loss",
        &train_loss_series,
    )?;
    write_json(&out.join("results.json"), &rows)?;
    write_atomic(&out.join("results.md"), results_table(&rows).as_bytes())?;
    Ok(rows)
}

/// The results as a markdown table.
pub fn results_table(rows: &[RunRow]) -> String {
    let mut s = String::from(
        "| run | network | parameters | checkpoint (MB) | epochs | best val acc | final val acc | macro F1 | training time | inference img/s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.1} | {} | {:.2}% | {:.2}% | {:.4} | {} | {:.0} |\n",
            r.label,
            r.network,
            r.parameters,
            r.checkpoint_mb,
            r.epochs,
            r.best_accuracy * 100.0,
            r.final_accuracy * 100.0,
            r.macro_f1,
            format_duration(r.training_seconds),
            r.inference_images_per_second
        );
    }
    if let Some(first) = rows.first() {
        let device = &first.inference_device;
        let precision = if rows
            .iter()
            .all(|r| r.inference_precision == first.inference_precision)
        {
            first.inference_precision.to_string()
        } else {
            "each run's training precision".into()
        };
        s += &format!(
            "\nInference: batch 32 at each run's image size, best checkpoint, on {device}, {precision}.\n"
        );
    }
    s
}

fn format_duration(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}
