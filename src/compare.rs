//! `kd compare`: accuracy and loss curves of several runs and a results table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use crate::io::{ensure_dir, read_json, write_atomic, write_json};
use crate::models::{Network, param_count};
use crate::report::{Series, curves_png};
use crate::run::Run;
use crate::train::{EpochMetrics, default_device};

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

/// Median images/s of batch-32 inference at `s` x `s` on `device`.
fn inference_speed(net: &Network, s: usize, device: &Device) -> f64 {
    let mut times = Vec::new();
    for i in 0..4 {
        let x = Tensor::<4>::random([32, 3, s, s], Distribution::Normal(0.0, 1.0), device);
        let t0 = Instant::now();
        let _ = net.forward(x).into_data();
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    32.0 / times[times.len() / 2]
}

/// Compares runs: writes `accuracy.png`, `loss.png` (validation), `train_loss.png`,
/// `results.md` and `results.json` into `out`.
pub fn compare(runs: &[PathBuf], out: &Path) -> Result<Vec<RunRow>> {
    if runs.is_empty() {
        bail!("no runs given: pass one or more run folders");
    }
    let opened: Vec<Run> = runs.iter().map(|r| Run::open(r)).collect::<Result<_>>()?;
    let mut rows = Vec::new();
    let (mut acc_series, mut val_loss_series, mut train_loss_series) =
        (Vec::new(), Vec::new(), Vec::new());
    for run in &opened {
        let history: Vec<EpochMetrics> = read_json(&run.dir.join("metrics.json"))?;
        if history.is_empty() {
            bail!("run {} has no finished epoch yet", run.dir.display());
        }
        let label = label(run, &opened);
        let best = history
            .iter()
            .max_by(|a, b| a.val_accuracy.total_cmp(&b.val_accuracy))
            .expect("non-empty");
        let device = default_device();
        // Inference speed in the precision the run was trained in, on the CPU.
        let net = run.load_network("best", &device)?;
        let previous = crate::device::precision();
        crate::device::set_precision(run.config.precision);
        let speed = inference_speed(&net, run.config.image_size, &device);
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
            inference_images_per_second: speed,
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
