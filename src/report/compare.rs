//! `kd compare`: accuracy and loss curves of several runs and a results table.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::charts::{Series, curves_png};
use super::methods::{self, MethodRow};
use crate::bench::{inference_times, median};
use crate::device::{DeviceSpec, PeakDeviceMemory};
use crate::io::{ensure_dir, write_atomic, write_json};
use crate::models::{Network, param_count};
use crate::ops::{Ctx, Precision};
use crate::run::metrics::best_epoch;
use crate::run::{Checkpoint, EpochMetrics, Run};

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

/// A run's label without its folder: its role, network and (for KD runs other than
/// Hinton's defaults) method.
fn base_label(run: &Run, all: &[Run]) -> String {
    let method = run
        .config
        .teacher
        .as_ref()
        .and_then(methods::method_label)
        .map(|m| format!(", {m}"))
        .unwrap_or_default();
    format!("{} ({}{method})", role(run, all), run.config.model.name)
}

/// Labels for the runs: each one's role in a distillation study, its network and method;
/// runs whose labels would be the same also get their folder's name (or, if that is shared
/// too, their path).
fn labels(all: &[Run]) -> Vec<String> {
    let roles: Vec<&str> = all.iter().map(|run| role(run, all)).collect();
    let plain: Vec<String> = all.iter().map(|run| base_label(run, all)).collect();
    let count = |l: &String| plain.iter().filter(|m| *m == l).count();
    let name = |run: &Run| {
        let shared = all
            .iter()
            .filter(|r| r.dir.file_name() == run.dir.file_name())
            .count();
        match run.dir.file_name() {
            Some(n) if shared == 1 => n.to_string_lossy().into_owned(),
            _ => run.dir.display().to_string(),
        }
    };
    all.iter()
        .zip(roles)
        .zip(&plain)
        .map(|((run, _), label)| match count(label) {
            1 => label.clone(),
            _ => format!("{}, {})", label.trim_end_matches(')'), name(run)),
        })
        .collect()
}

/// A run's role: "student with KD" if it has a teacher, "teacher" if one of `all` names
/// it as its teacher, else "student without KD" next to a KD run, or just "without KD"
/// (a comparison without distillation has no students).
fn role(run: &Run, all: &[Run]) -> &'static str {
    if run.config.teacher.is_some() {
        "student with KD"
    } else if all.iter().any(|r| {
        r.config
            .teacher
            .as_ref()
            .is_some_and(|t| is_teacher_path(&t.run, &r.dir, &run.dir))
    }) {
        "teacher"
    } else if all.iter().any(|r| r.config.teacher.is_some()) {
        "student without KD"
    } else {
        "without KD"
    }
}

/// Whether the teacher path recorded by the KD run in `kd_dir` names `dir`. The path is
/// recorded as typed, relative to where `kd distill` ran. When it does not resolve from here
/// it is tried next to the KD run (`cd runs && kd distill --teacher t --out kd`); failing
/// that, a relative path of two or more folders without `..` (`runs/teacher`) still matches
/// a `dir` ending in the same folders (a bare folder name would match too many).
fn is_teacher_path(teacher: &Path, kd_dir: &Path, dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return teacher == dir;
    };
    if let Ok(teacher) = teacher.canonicalize() {
        return teacher == dir;
    }
    let beside = kd_dir.parent().map(|p| p.join(teacher));
    if let Some(Ok(teacher)) = beside.map(|p| p.canonicalize()) {
        return teacher == dir;
    }
    let mut tail = PathBuf::new();
    for part in teacher.components() {
        match part {
            std::path::Component::Normal(p) => tail.push(p),
            std::path::Component::CurDir => {}
            _ => return false,
        }
    }
    tail.components().count() >= 2 && dir.ends_with(&tail)
}

/// Median images/s of batch-32 inference at `s` x `s` on `device`. A GPU gets more warm-up
/// steps: its first calls of each shape compile and autotune kernels.
fn inference_speed(net: &Network, s: usize, device: &Device, cx: &Ctx, on_cpu: bool) -> f64 {
    let (warmup, timed) = if on_cpu { (1, 3) } else { (3, 5) };
    let x = Tensor::<4>::random([32, 3, s, s], Distribution::Normal(0.0, 1.0), device);
    let times = inference_times(net, x, cx, warmup, timed, &mut PeakDeviceMemory::default());
    32.0 / median(times)
}

/// What `kd compare` found: a row per run, and when some runs differ only in their seed, a
/// row per method over its seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// Over seeds, best first (empty when every run is its own experiment).
    pub methods: Vec<MethodRow>,
    /// Every run.
    pub runs: Vec<RunRow>,
}

/// Compares runs: writes `accuracy.png`, `loss.png` (validation), `train_loss.png`,
/// `loss_parts.png` (with distillation runs), `results.md` and `results.json` into `out`;
/// inference speed is measured as `speed` says.
/// Runs that differ only in their seed are drawn as one line (their mean) with the min–max
/// band and ranked in a methods table.
pub fn compare(runs: &[PathBuf], out: &Path, speed: SpeedOptions) -> Result<Comparison> {
    if runs.is_empty() {
        bail!("no runs given: pass one or more run folders");
    }
    let opened: Vec<Run> = runs.iter().map(|r| Run::open(r)).collect::<Result<_>>()?;
    for (i, run) in opened.iter().enumerate() {
        let same = |other: &Run| crate::io::resolved(&other.dir) == crate::io::resolved(&run.dir);
        if let Some(earlier) = opened[..i].iter().find(|r| same(r)) {
            bail!(
                "run {} is given twice (also as {}): pass each run once",
                run.dir.display(),
                earlier.dir.display()
            );
        }
    }
    for run in &opened {
        if run.config.data.is_dir() {
            crate::data::dataset::check_out_is_not_read(out, &run.config.data)?;
        }
    }
    // Accuracies over other classes are not comparable.
    if let Some(other) = opened[1..].iter().find(|r| r.classes != opened[0].classes) {
        let first = &opened[0];
        let (new, gone) = crate::data::folder::class_difference(&other.classes, &first.classes);
        bail!(
            "runs {} and {} were trained on different classes ({} has {new:?} that {} lacks, and lacks {gone:?}): compare runs of the same classes",
            first.dir.display(),
            other.dir.display(),
            other.dir.display(),
            first.dir.display()
        );
    }
    let labels = labels(&opened);
    let mut rows = Vec::new();
    let (mut acc_series, mut val_loss_series, mut train_loss_series) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut histories = Vec::new();
    for (run, label) in opened.iter().zip(labels) {
        let history = run.metrics()?;
        let Some(best) = best_epoch(&history) else {
            bail!("run {} has no finished epoch yet", run.dir.display());
        };
        let precision = speed.precision.unwrap_or(run.config.precision);
        let device = crate::device::open(speed.device, precision)?;
        let net = run.load_network(Checkpoint::Best, &device)?;
        let images_per_second = inference_speed(
            &net,
            run.config.image_size,
            &device,
            &Ctx::new(precision),
            speed.device == DeviceSpec::Cpu,
        );
        let ckpt = run.checkpoint_path(Checkpoint::Best)?;
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
            points: history.iter().map(|m| (m.epoch as u32, f(m))).collect(),
            band: None,
        };
        acc_series.push(series(|m| m.val_accuracy * 100.0));
        val_loss_series.push(series(|m| m.val_loss));
        train_loss_series.push(series(|m| m.train_loss));
        histories.push(history);
    }
    let groups = methods::groups(&opened);
    let over_seeds = groups.iter().any(|g| g.len() > 1);
    let mut method_rows = Vec::new();
    // The parts of each distillation run's loss (each group's mean over seeds).
    let mut parts: Vec<Series> = Vec::new();
    if !over_seeds {
        for (row, history) in rows.iter().zip(&histories) {
            parts.extend(methods::parts_series(&row.label, &[history.as_slice()]));
        }
    }
    if over_seeds {
        let group_labels: Vec<String> = groups
            .iter()
            .map(|g| base_label(&opened[g[0]], &opened))
            .collect();
        for (g, label) in groups.iter().zip(&group_labels) {
            let of_group: Vec<&[EpochMetrics]> =
                g.iter().map(|&i| histories[i].as_slice()).collect();
            parts.extend(methods::parts_series(label, &of_group));
        }
        let plain: Vec<bool> = groups
            .iter()
            .map(|g| role(&opened[g[0]], &opened) == "student without KD")
            .collect();
        let best: Vec<f64> = rows.iter().map(|r: &RunRow| r.best_accuracy).collect();
        method_rows = methods::method_rows(&opened, &groups, &group_labels, &best, &plain);
        let mean = |f: fn(&EpochMetrics) -> f64| -> Vec<Series> {
            groups
                .iter()
                .zip(&group_labels)
                .map(|(g, label)| {
                    let of_group: Vec<&[EpochMetrics]> =
                        g.iter().map(|&i| histories[i].as_slice()).collect();
                    methods::mean_series(label, &of_group, f)
                })
                .collect()
        };
        acc_series = mean(|m| m.val_accuracy * 100.0);
        val_loss_series = mean(|m| m.val_loss);
        train_loss_series = mean(|m| m.train_loss);
    }
    ensure_dir(out)?;
    curves_png(
        &out.join("accuracy.png"),
        "validation accuracy",
        "accuracy (%)",
        &acc_series,
        false,
    )?;
    curves_png(
        &out.join("loss.png"),
        "validation loss (cross-entropy)",
        "loss",
        &val_loss_series,
        true,
    )?;
    // Not comparable across runs: a KD run's objective includes the soft-target term.
    curves_png(
        &out.join("train_loss.png"),
        "training loss (each run's objective)",
        "loss",
        &train_loss_series,
        true,
    )?;
    if !parts.is_empty() {
        curves_png(
            &out.join("loss_parts.png"),
            "the parts of each distillation method's training loss",
            "loss part",
            &parts,
            true,
        )?;
    } else if out.join("loss_parts.png").is_file() {
        // An earlier comparison's, which this one would seem to have written.
        std::fs::remove_file(out.join("loss_parts.png")).with_context(|| {
            format!(
                "cannot remove the stale {}",
                out.join("loss_parts.png").display()
            )
        })?;
    }
    let comparison = Comparison {
        methods: method_rows,
        runs: rows,
    };
    if over_seeds {
        write_json(&out.join("results.json"), &comparison)?;
    } else {
        write_json(&out.join("results.json"), &comparison.runs)?;
    }
    write_atomic(
        &out.join("results.md"),
        results_table(&comparison).as_bytes(),
    )?;
    Ok(comparison)
}

/// The results as markdown: the methods over seeds (if any), then every run.
pub fn results_table(comparison: &Comparison) -> String {
    let mut s = String::new();
    if !comparison.methods.is_empty() {
        s += &methods::methods_table(&comparison.methods);
        s += "\n";
    }
    s + &runs_table(&comparison.runs)
}

/// The runs as a markdown table.
fn runs_table(rows: &[RunRow]) -> String {
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
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_teacher_path_recorded_elsewhere_still_names_its_run() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("study-7f3a/teacher");
        std::fs::create_dir_all(&dir).unwrap();
        // As typed where `kd distill` ran (tmp), so it does not resolve from the test's folder.
        for (recorded, names_it) in [
            ("study-7f3a/teacher", true),
            ("./study-7f3a/teacher", true),
            ("teacher", false),
            ("other/teacher", false),
            ("../study-7f3a/teacher", false),
            ("study-7f3a", false),
        ] {
            assert_eq!(
                is_teacher_path(Path::new(recorded), &tmp.path().join("elsewhere/kd"), &dir),
                names_it,
                "{recorded}"
            );
        }
        // A path that resolves decides by itself.
        let kd = tmp.path().join("study-7f3a/kd");
        assert!(is_teacher_path(&dir, &kd, &dir));
        assert!(!is_teacher_path(tmp.path(), &kd, &dir));
        // Typed from inside the study folder: found next to the KD run.
        assert!(is_teacher_path(Path::new("teacher"), &kd, &dir));
    }
}
