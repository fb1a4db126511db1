//! `kd run experiment.toml` and `kd demo`: the whole study (optional split, teacher,
//! plain student, distilled student, comparison) from one file. Each stage's config is the
//! recipe patched by `[recipe]`, then by its own table, as flags patch it on the command line
//! ([`crate::run::patch`]). Finished stages are skipped when rerun; an interrupted stage
//! resumes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::data::split::{SPLIT_RECORD, SplitRecord};
use crate::data::{ImageFolder, LinkMode, stratified_split, write_split};
use crate::device::DeviceSpec;
use crate::ops::Precision;
use crate::report::{RunRow, SpeedOptions, compare, results_table};
use crate::run::patch::{self, Table};
use crate::run::{Run, RunLock, TrainConfig, resume};
use crate::train::{TrainOptions, train};

/// The bundled demo experiment (what `kd demo` runs).
pub const DEMO_TOML: &str = include_str!("../examples/mnist-demo.toml");

/// The experiment file's top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentFile {
    /// Output folder of the study.
    out: PathBuf,
    data: DataSection,
    #[serde(default)]
    recipe: Map<String, Value>,
    teacher: Map<String, Value>,
    student: Map<String, Value>,
    #[serde(default)]
    distill: Map<String, Value>,
}

/// Where the images come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A folder with train/ and val/, or a class folder.
    pub path: PathBuf,
    /// If set, `kd split` the class folder `path` into this folder first.
    #[serde(default)]
    pub split_to: Option<PathBuf>,
    /// Validation share (split and in-memory split) [default: the recipe's].
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Seed of the split (`split_to` or in memory) and of the data subsets of every stage;
    /// also every stage's `seed` unless the stage sets its own [default: the recipe's].
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_val_fraction() -> f64 {
    TrainConfig::default().val_fraction
}

fn default_seed() -> u64 {
    TrainConfig::default().seed
}

/// A parsed experiment: the three training configs and where they go.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// Output folder.
    pub out: PathBuf,
    /// Data section.
    pub data: DataSection,
    /// Teacher training.
    pub teacher: TrainConfig,
    /// Plain student training.
    pub student: TrainConfig,
    /// Distilled student training (teacher filled in).
    pub kd_student: TrainConfig,
}

/// Stage folders inside the output folder.
pub const STAGES: [&str; 3] = ["teacher", "student", "kd_student"];

/// Reads and validates an experiment file.
pub fn load_experiment(path: &Path) -> Result<Experiment> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read experiment file {}", path.display()))?;
    parse_experiment(&text).with_context(|| format!("experiment file {}", path.display()))
}

/// Parses experiment TOML text.
pub fn parse_experiment(text: &str) -> Result<Experiment> {
    let file: ExperimentFile = toml::from_str(text).map_err(|e| {
        // One line: the position and the message, without toml's quoted excerpt.
        let line = e
            .span()
            .map(|s| format!("line {}: ", text[..s.start].matches('\n').count() + 1))
            .unwrap_or_default();
        anyhow::anyhow!("{line}{}", e.message().trim_end())
    })?;
    patch::check_keys(&file.recipe, Table::Recipe, "[recipe]")?;
    patch::check_keys(&file.teacher, Table::Stage, "[teacher]")?;
    patch::check_keys(&file.student, Table::Stage, "[student]")?;
    patch::check_keys(&file.distill, Table::Distill, "[distill]")?;
    // What every stage shares before the tables: the data, its split and seed.
    let base = TrainConfig {
        data: file
            .data
            .split_to
            .clone()
            .unwrap_or_else(|| file.data.path.clone()),
        val_fraction: file.data.val_fraction,
        seed: file.data.seed,
        split_seed: Some(file.data.seed),
        ..TrainConfig::default()
    };
    let base = patch::apply(&base, &patch::nest(&file.recipe)).context("in [recipe]")?;
    let stage = |table: &Map<String, Value>, section: &str| -> Result<TrainConfig> {
        if !table.contains_key("model") {
            bail!("[{section}] needs model = \"...\" (see `kd models`)");
        }
        let c = patch::apply(&base, &patch::nest(table))
            .with_context(|| format!("in [{section}] or [recipe]"))?;
        c.validate().with_context(|| format!("in [{section}]"))?;
        Ok(c)
    };
    let teacher = stage(&file.teacher, "teacher")?;
    let student = stage(&file.student, "student")?;
    // The KD student: [student] with [distill] on top, taught by the teacher stage.
    let mut kd_table = file.student.clone();
    kd_table.extend(file.distill.clone());
    kd_table.insert(
        "teacher".into(),
        Value::String(file.out.join("teacher").to_string_lossy().into_owned()),
    );
    let kd_student = stage(&kd_table, "distill")?;
    Ok(Experiment {
        out: file.out,
        data: file.data,
        teacher,
        student,
        kd_student,
    })
}

impl Experiment {
    /// The bundled demo on the digits in `data`, written to `out`, every stage seeded with
    /// `seed`.
    pub fn demo(data: &Path, out: &Path, seed: u64) -> Result<Self> {
        let mut exp = parse_experiment(DEMO_TOML)?;
        exp.out = out.to_path_buf();
        exp.data.path = data.to_path_buf();
        exp.data.seed = seed;
        for c in [&mut exp.teacher, &mut exp.student, &mut exp.kd_student] {
            c.data = data.to_path_buf();
            c.seed = seed;
            c.split_seed = Some(seed);
        }
        if let Some(t) = exp.kd_student.teacher.as_mut() {
            t.run = out.join("teacher");
        }
        Ok(exp)
    }

    /// Overrides every stage's precision (`--precision` of `kd run` / `kd demo`).
    pub fn set_precision(&mut self, precision: Option<Precision>) {
        if let Some(p) = precision {
            for c in [&mut self.teacher, &mut self.student, &mut self.kd_student] {
                c.precision = p;
            }
        }
    }
}

/// What happened to a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    /// Already finished with the same config.
    Skipped,
    /// Continued from its last completed epoch.
    Resumed,
    /// Trained from scratch.
    Trained,
}

/// Runs one training stage, skipping or resuming as the folder says.
pub fn run_stage(
    config: &TrainConfig,
    dir: &Path,
    quiet: bool,
    device: DeviceSpec,
) -> Result<StageOutcome> {
    if resume::finished(dir) {
        let done = Run::open(dir)?;
        let mut wanted = config.clone();
        wanted.mean = wanted.mean.or(done.config.mean);
        wanted.std = wanted.std.or(done.config.std);
        let diff = wanted.differing_keys(&done.config);
        if !diff.is_empty() {
            bail!(
                "{} was trained with another config ({}): delete that folder to retrain it, or choose another output folder (`out` in the TOML, `--out` of kd demo)",
                dir.display(),
                diff.join("; ")
            );
        }
        return Ok(StageOutcome::Skipped);
    }
    let resumable = resume::resume_path(dir).is_file();
    if dir.join(crate::run::files::CONFIG).is_file() && !resumable {
        // Interrupted before its first epoch finished: nothing worth keeping. Cleared under
        // the folder's lock, so that a stage another process is training is left alone.
        let _lock = RunLock::acquire(dir)?;
        resume::clear(dir)?;
    }
    let options = TrainOptions {
        resume: resumable,
        quiet,
        device,
    };
    train(config, dir, &options)?;
    Ok(if resumable {
        StageOutcome::Resumed
    } else {
        StageOutcome::Trained
    })
}

/// Runs the whole study on `device`; returns the comparison rows.
pub fn run_experiment(exp: &Experiment, quiet: bool, device: DeviceSpec) -> Result<Vec<RunRow>> {
    if let Some(dst) = &exp.data.split_to {
        let (source, fraction, seed) = (&exp.data.path, exp.data.val_fraction, exp.data.seed);
        if crate::data::dataset::is_split(dst) {
            match SplitRecord::read(dst) {
                Some(record) => {
                    let diff = record.differences(source, fraction, seed);
                    if !diff.is_empty() {
                        bail!(
                            "split_to {} was split with other settings ({}): delete it to split again, or choose another split_to",
                            dst.display(),
                            diff.join("; ")
                        );
                    }
                    println!("split: {} exists, skipped", dst.display());
                }
                None => println!(
                    "split: {} exists without a {SPLIT_RECORD} (not made by this kd), used as it is",
                    dst.display()
                ),
            }
        } else {
            let folder = ImageFolder::scan(&exp.data.path)?;
            crate::data::report_skipped(&folder.skipped, Some(exp.teacher.strict))?;
            let split = stratified_split(&folder, exp.data.val_fraction, exp.data.seed)?;
            write_split(&folder, &split, dst, LinkMode::Copy, false)?;
            println!(
                "split: {} train / {} val images into {}",
                split.train.len(),
                split.val.len(),
                dst.display()
            );
        }
    }
    let configs = [&exp.teacher, &exp.student, &exp.kd_student];
    for (stage, config) in STAGES.iter().zip(configs) {
        let dir = exp.out.join(stage);
        println!("== {stage}: {} -> {}", config.model.name, dir.display());
        let outcome = run_stage(config, &dir, quiet, device)?;
        if outcome == StageOutcome::Skipped {
            println!("{stage}: finished earlier, skipped");
        }
    }
    let runs: Vec<PathBuf> = STAGES.iter().map(|s| exp.out.join(s)).collect();
    let report = exp.out.join("report");
    // Inference speed on the study's device, in the precision each run trained in.
    let speed = SpeedOptions {
        device,
        precision: None,
    };
    let rows = compare(&runs, &report, speed)?;
    println!("\n{}", results_table(&rows));
    println!(
        "report: {} (results.md, results.json, accuracy.png, loss.png, train_loss.png)",
        report.display()
    );
    Ok(rows)
}
