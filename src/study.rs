//! `kd run experiment.toml` and `kd demo`: the whole study (optional split, teacher,
//! plain student, distilled student, comparison) from one file. Finished stages are
//! skipped when rerun; an interrupted stage resumes.

use crate::device::DeviceSpec;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::compare::{RunRow, SpeedOptions, compare, results_table};
use crate::data::split::{SPLIT_RECORD, SplitRecord};
use crate::data::{ImageFolder, LinkMode, stratified_split, write_split};
use crate::models::ModelSpec;
use crate::run::{Run, files};
use crate::train::{TrainConfig, TrainOptions, train};

/// The experiment file's top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentFile {
    /// Output folder of the study.
    out: PathBuf,
    data: DataSection,
    #[serde(default)]
    recipe: toml::Table,
    teacher: toml::Table,
    student: toml::Table,
    #[serde(default)]
    distill: toml::Table,
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
    /// Validation share (split and in-memory split).
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Seed of the split (`split_to` or in memory) and of the data subsets of every stage;
    /// also every stage's `seed` unless the stage sets its own.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_val_fraction() -> f64 {
    0.3
}
fn default_seed() -> u64 {
    42
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

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Turns `model = "x"`, `width`, `stem` of a stage table into a `model` object.
fn stage_value(table: &toml::Table, stage: &str) -> Result<(ModelSpec, Value)> {
    let mut v = serde_json::to_value(table)?;
    let obj = v.as_object_mut().expect("table");
    let name = obj
        .remove("model")
        .and_then(|m| m.as_str().map(str::to_string))
        .with_context(|| format!("[{stage}] needs model = \"...\" (see `kd models`)"))?;
    let spec = ModelSpec {
        name,
        width: obj
            .remove("width")
            .map(serde_json::from_value::<usize>)
            .transpose()
            .with_context(|| format!("[{stage}] width must be a positive whole number"))?,
        stem: obj
            .remove("stem")
            .map(serde_json::from_value)
            .transpose()
            .context("stem must be \"imagenet\" or \"small\"")?,
    };
    Ok((spec, v))
}

/// Keys of a stage table besides the training keys.
const MODEL_KEYS: [&str; 3] = ["model", "width", "stem"];
/// Keys of `[distill]` besides a stage's (`loss` is `kd distill --kd-loss`).
const DISTILL_KEYS: [&str; 4] = ["temperature", "alpha", "loss", "cache_teacher"];

/// Refuses a key that `[section]` does not take, listing those it does: the training keys
/// (but `data` and `teacher`, which come from `[data]` and `[distill]`) and `extra`.
fn check_keys(table: &toml::Table, section: &str, extra: &[&str]) -> Result<()> {
    let recipe = TrainConfig::recipe(PathBuf::new(), ModelSpec::named("resnet18"));
    let Value::Object(fields) = serde_json::to_value(recipe)? else {
        unreachable!("a config serialises to an object")
    };
    let mut known: Vec<&str> = fields
        .keys()
        .map(String::as_str)
        .chain(["split_seed"]) // left out of the JSON when unset
        .filter(|k| !["data", "model", "teacher"].contains(k))
        .collect();
    known.extend(extra);
    match table
        .keys()
        .find(|k| !known.contains(&k.as_str()))
        .map(String::as_str)
    {
        Some("data") => bail!("[{section}] cannot set `data`: the images come from [data] path"),
        Some("teacher") => {
            bail!(
                "[{section}] cannot set `teacher`: the KD student learns from the study's teacher stage"
            )
        }
        Some(key) => bail!(
            "[{section}] has an unknown key `{key}`: use one of {}",
            known.join(", ")
        ),
        None => Ok(()),
    }
}

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
    let data_dir = file
        .data
        .split_to
        .clone()
        .unwrap_or_else(|| file.data.path.clone());
    check_keys(&file.recipe, "recipe", &[])?;
    check_keys(&file.teacher, "teacher", &MODEL_KEYS)?;
    check_keys(&file.student, "student", &MODEL_KEYS)?;
    check_keys(
        &file.distill,
        "distill",
        &[&MODEL_KEYS[..], &DISTILL_KEYS].concat(),
    )?;
    let recipe = serde_json::to_value(&file.recipe)?;
    let build = |table: &toml::Table, stage: &str, extra: Option<Value>| -> Result<TrainConfig> {
        let (spec, over) = stage_value(table, stage)?;
        let mut v = serde_json::to_value(TrainConfig::recipe(data_dir.clone(), spec))?;
        merge(
            &mut v,
            &serde_json::json!({
                "val_fraction": file.data.val_fraction,
                "seed": file.data.seed,
                "split_seed": file.data.seed,
            }),
        );
        merge(&mut v, &recipe);
        merge(&mut v, &over);
        if let Some(e) = extra {
            merge(&mut v, &e);
        }
        let c: TrainConfig =
            serde_json::from_value(v).with_context(|| format!("in [{stage}] or [recipe]"))?;
        c.validate().with_context(|| format!("in [{stage}]"))?;
        Ok(c)
    };
    let teacher = build(&file.teacher, "teacher", None)?;
    let student = build(&file.student, "student", None)?;
    let mut distill = serde_json::to_value(&file.distill)?;
    let d = distill.as_object_mut().expect("table");
    let kd = serde_json::json!({
        "temperature": d.remove("temperature").unwrap_or(7.0.into()),
        "alpha": d.remove("alpha").unwrap_or(0.7.into()),
        "loss": d.remove("loss").unwrap_or("hinton".into()),
    });
    let cache = d.remove("cache_teacher").unwrap_or(false.into());
    let teacher_cfg = serde_json::json!({"teacher": {
        "run": file.out.join("teacher"), "checkpoint": "best", "kd": kd, "cache_logits": cache,
    }});
    let mut kd_table = file.student.clone();
    if let toml::Value::Table(overrides) = toml::Value::try_from(&distill)? {
        kd_table.extend(overrides);
    }
    let kd_student = build(&kd_table, "distill", Some(teacher_cfg))?;
    Ok(Experiment {
        out: file.out,
        data: file.data,
        teacher,
        student,
        kd_student,
    })
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

fn finished(dir: &Path) -> bool {
    dir.join(files::CHECKPOINTS).join("final.bpk").is_file()
}

/// Runs one training stage, skipping or resuming as the folder says.
pub fn run_stage(
    config: &TrainConfig,
    dir: &Path,
    quiet: bool,
    device: DeviceSpec,
) -> Result<StageOutcome> {
    if finished(dir) {
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
    let resumable = dir.join(files::CHECKPOINTS).join(files::RESUME).is_file();
    if dir.join(files::CONFIG).is_file() && !resumable {
        // Interrupted before its first epoch finished: nothing worth keeping. Cleared under
        // the folder's lock, so that a stage another process is training is left alone.
        let _lock = crate::train::lock_run_folder(dir)?;
        for entry in std::fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else if entry.file_name() == ".kd-lock" {
                Ok(())
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("cannot clear {}", path.display()))?;
        }
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

impl Experiment {
    /// Overrides every stage's precision (`--precision` of `kd run` / `kd demo`).
    pub fn set_precision(&mut self, precision: Option<crate::device::Precision>) {
        if let Some(p) = precision {
            for c in [&mut self.teacher, &mut self.student, &mut self.kd_student] {
                c.precision = p;
            }
        }
    }
}

/// Runs the whole study on `device`; returns the comparison rows.
pub fn run_experiment(exp: &Experiment, quiet: bool, device: DeviceSpec) -> Result<Vec<RunRow>> {
    if let Some(dst) = &exp.data.split_to {
        let (source, fraction, seed) = (&exp.data.path, exp.data.val_fraction, exp.data.seed);
        if dst.join("train").is_dir() && dst.join("val").is_dir() {
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
            crate::train::dataset::report_skipped(&folder.skipped, Some(exp.teacher.strict))?;
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
