//! `kd run experiment.toml` and `kd demo`: the whole study (optional split, teacher, plain
//! student, distilled students, comparison) from one file. Each stage's config is the recipe
//! patched by `[recipe]`, then by its own table, as flags patch it on the command line
//! ([`crate::run::patch`]). A study can list several methods (`[[methods]]`) and seeds
//! (`seeds`): the teacher trains once, the plain student and each method once per seed, and
//! the report ranks the methods with the spread over seeds. Finished stages are skipped when
//! rerun; an interrupted stage resumes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::data::split::{SPLIT_RECORD, SplitRecord};
use crate::data::{ImageFolder, LinkMode, stratified_split, write_split};
use crate::device::DeviceSpec;
use crate::losses::Method;
use crate::ops::Precision;
use crate::report::{Comparison, SpeedOptions, compare, results_table};
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
    /// Each student (plain and distilled) trains once per seed.
    #[serde(default)]
    seeds: Option<Vec<u64>>,
    /// The distillation methods to compare, each a `[distill]`-like table (and a `name`).
    #[serde(default)]
    methods: Vec<Map<String, Value>>,
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

/// A parsed experiment: the teacher's config, and the students' with their folders.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// Output folder.
    pub out: PathBuf,
    /// Data section.
    pub data: DataSection,
    /// Teacher training (folder `teacher`).
    pub teacher: TrainConfig,
    /// The plain students, then the distilled ones (teacher filled in), each with its folder
    /// name: `student` and `kd_student` in a study of one method and one seed, else
    /// `student-seedN` and `METHOD-seedN` (or the method's `name`).
    pub students: Vec<Stage>,
}

/// A student's training and its folder inside the output folder.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Folder name.
    pub name: String,
    /// Its config.
    pub config: TrainConfig,
}

/// The teacher's folder inside the output folder.
pub const TEACHER: &str = "teacher";

/// The folder of a study's report, next to its runs.
pub const REPORT: &str = "report";

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
    let paths = [
        ("out", Some(&file.out)),
        ("[data] path", Some(&file.data.path)),
        ("[data] split_to", file.data.split_to.as_ref()),
    ];
    if let Some((key, _)) = paths
        .iter()
        .find(|(_, p)| p.is_some_and(|p| p.as_os_str().to_string_lossy().trim().is_empty()))
    {
        bail!("{key} is empty: give a folder (an empty path would write into the working folder)");
    }
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
    // `section` names the table a stage's error is reported in ([student], a method's entry).
    let stage = |table: &Map<String, Value>, section: &str| -> Result<TrainConfig> {
        if !table.contains_key("model") {
            bail!("{section} needs model = \"...\" (see `kd models`)");
        }
        let c =
            patch::apply(&base, &patch::nest(table)).with_context(|| format!("in {section}"))?;
        c.validate().with_context(|| format!("in {section}"))?;
        Ok(c)
    };
    let teacher = stage(&file.teacher, "[teacher]")?;
    // The methods: each [[methods]] entry, else [distill] alone (the KD student).
    let methods = if file.methods.is_empty() {
        vec![("kd_student".to_string(), Map::new())]
    } else {
        if let Some(key) = file.distill.keys().find(|k| is_method_key(k)) {
            bail!(
                "[distill] sets `{key}`, a method setting: with [[methods]], give each method's settings in its entry"
            );
        }
        method_entries(&file.methods)?
    };
    let seeds: Vec<Option<u64>> = match &file.seeds {
        None => vec![None],
        Some(seeds) => {
            if seeds.is_empty() {
                bail!("seeds = [] lists no seed: give one or more, e.g. seeds = [1, 2, 3]");
            }
            if let Some(s) = seeds
                .iter()
                .find(|s| seeds.iter().filter(|t| t == s).count() > 1)
            {
                bail!("seeds lists {s} twice: give each seed once");
            }
            // Each student's seed comes from the list, so a table's own would be overruled.
            let tables = [
                ("[student]".to_string(), &file.student),
                ("[distill]".to_string(), &file.distill),
            ];
            let entries = methods
                .iter()
                .map(|(name, e)| (format!("[[methods]] entry '{name}'"), e));
            if let Some((section, _)) = tables
                .into_iter()
                .chain(entries)
                .find(|(_, table)| table.contains_key("seed"))
            {
                bail!(
                    "{section} sets seed, but seeds = [...] gives each student its seeds: remove one of them"
                );
            }
            seeds.iter().copied().map(Some).collect()
        }
    };
    let folder = |name: &str, seed: Option<u64>| match seed {
        Some(s) if file.seeds.is_some() => format!("{name}-seed{s}"),
        _ => name.to_string(),
    };
    let with_seed = |mut table: Map<String, Value>, seed: Option<u64>| {
        if let Some(s) = seed {
            table.insert("seed".into(), s.into());
        }
        table
    };
    let mut students = Vec::new();
    for &seed in &seeds {
        let config = stage(&with_seed(file.student.clone(), seed), "[student]")?;
        students.push(Stage {
            name: folder("student", seed),
            config,
        });
    }
    for (name, entry) in &methods {
        for &seed in &seeds {
            // A KD student: [student], [distill] and the method's entry on top, taught by the
            // teacher stage.
            let mut table = file.student.clone();
            table.extend(file.distill.clone());
            table.extend(entry.clone());
            table.insert(
                "teacher".into(),
                Value::String(file.out.join(TEACHER).to_string_lossy().into_owned()),
            );
            let section = if file.methods.is_empty() {
                "[distill]".to_string()
            } else {
                format!("[[methods]] entry '{name}'")
            };
            let config = stage(&with_seed(table, seed), &section)?;
            students.push(Stage {
                name: folder(name, seed),
                config,
            });
        }
    }
    // Two entries that train the same thing (`kd` and `hinton`, say) would only repeat it.
    for (i, a) in students.iter().enumerate() {
        if let Some(b) = students[..i].iter().find(|b| b.config == a.config) {
            bail!(
                "'{}' and '{}' train the same student with the same settings: remove one, or change its settings",
                b.name,
                a.name
            );
        }
    }
    Ok(Experiment {
        out: file.out,
        data: file.data,
        teacher,
        students,
    })
}

/// Whether `key` belongs to a method (its name, a setting, the feature term's weight).
fn is_method_key(key: &str) -> bool {
    ["method", "loss", "feature_weight"].contains(&key)
        || Method::all_keys().iter().any(|k| k == key)
}

/// The `[[methods]]` entries: each one's folder name (its `name`, else its method's) and
/// its table without the name, checked like `[distill]`.
fn method_entries(entries: &[Map<String, Value>]) -> Result<Vec<(String, Map<String, Value>)>> {
    let mut out: Vec<(String, Map<String, Value>)> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let mut entry = entry.clone();
        let section = format!("[[methods]] entry {}", i + 1);
        let name = match entry.remove("name") {
            Some(Value::String(n)) => n,
            Some(other) => bail!("{section}: name {other} is not a text"),
            None => match entry.get("method").or_else(|| entry.get("loss")) {
                Some(Value::String(m)) => m.clone(),
                _ => bail!(
                    "{section} needs method = \"...\" (one of {})",
                    crate::losses::names()
                ),
            },
        };
        // A folder of its own in the study: not the study itself (`.`), its parent, a hidden
        // folder, the report's, or (on case-blind file systems too) the teacher's or a
        // student's.
        let lower = name.to_ascii_lowercase();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
            || name.starts_with('.')
            || lower == TEACHER
            || lower == REPORT
            || lower.starts_with("student")
        {
            bail!(
                "{section}: name '{name}' cannot name a folder next to the teacher, students and report: use letters, digits, - _ . + (not first)"
            );
        }
        if out.iter().any(|(n, _)| *n == name) {
            bail!(
                "{section}: two methods are named '{name}': give one of them another name = \"...\""
            );
        }
        patch::check_keys(&entry, Table::Distill, &section)?;
        out.push((name, entry));
    }
    Ok(out)
}

impl Experiment {
    /// The bundled demo on the digits in `data`, written to `out`, every stage seeded with
    /// `seed`.
    pub fn demo(data: &Path, out: &Path, seed: u64) -> Result<Self> {
        let mut exp = parse_experiment(DEMO_TOML)?;
        exp.out = out.to_path_buf();
        exp.data.path = data.to_path_buf();
        exp.data.seed = seed;
        for c in exp.configs_mut() {
            c.data = data.to_path_buf();
            c.seed = seed;
            c.split_seed = Some(seed);
            if let Some(t) = c.teacher.as_mut() {
                t.run = out.join(TEACHER);
            }
        }
        Ok(exp)
    }

    /// Overrides every stage's precision (`--precision` of `kd run` / `kd demo`).
    pub fn set_precision(&mut self, precision: Option<Precision>) {
        if let Some(p) = precision {
            for c in self.configs_mut() {
                c.precision = p;
            }
        }
    }

    /// The config of the student in folder `name`.
    pub fn student(&self, name: &str) -> Option<&TrainConfig> {
        self.students
            .iter()
            .find(|s| s.name == name)
            .map(|s| &s.config)
    }

    /// Every stage's config, the teacher's first.
    fn configs_mut(&mut self) -> impl Iterator<Item = &mut TrainConfig> {
        std::iter::once(&mut self.teacher).chain(self.students.iter_mut().map(|s| &mut s.config))
    }

    /// Every stage: its folder name and config, the teacher's first.
    pub fn stages(&self) -> impl Iterator<Item = (&str, &TrainConfig)> {
        std::iter::once((TEACHER, &self.teacher))
            .chain(self.students.iter().map(|s| (s.name.as_str(), &s.config)))
    }
}

/// What happened to a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    /// Already finished with the same config.
    Skipped,
    /// Continued from its last completed epoch (or extended to more epochs).
    Resumed,
    /// Trained from scratch.
    Trained,
}

/// Runs one training stage, skipping or resuming as the folder says; a finished stage asked
/// for more epochs (and nothing else changed) is extended.
pub fn run_stage(
    config: &TrainConfig,
    dir: &Path,
    quiet: bool,
    device: DeviceSpec,
) -> Result<StageOutcome> {
    let mut extend = false;
    if resume::finished(dir) {
        let done = Run::open(dir)?;
        let mut wanted = config.clone();
        wanted.mean = wanted.mean.or(done.config.mean);
        wanted.std = wanted.std.or(done.config.std);
        wanted.epochs = done.config.epochs; // more epochs extend it
        let diff = wanted.differing_keys(&done.config);
        if !diff.is_empty() {
            bail!(
                "{} was trained with another config ({}): delete that folder to retrain it, or choose another output folder (`out` in the TOML, `--out` of kd demo)",
                dir.display(),
                diff.join("; ")
            );
        }
        if config.epochs < done.config.epochs {
            bail!(
                "{} was trained for {} epochs and the file asks for {}: ask for {} or more to keep it (more extend it), or delete that folder to retrain it",
                dir.display(),
                done.config.epochs,
                config.epochs,
                done.config.epochs
            );
        }
        if config.epochs == done.config.epochs {
            return Ok(StageOutcome::Skipped);
        }
        extend = true;
    }
    let resumable = extend || resume::resume_path(dir).is_file();
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

/// Runs the whole study on `device`; returns the comparison.
pub fn run_experiment(exp: &Experiment, quiet: bool, device: DeviceSpec) -> Result<Comparison> {
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
            crate::data::split::check_class_sizes(&folder, false)?;
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
    for (stage, config) in exp.stages() {
        let dir = exp.out.join(stage);
        let method = config
            .teacher
            .as_ref()
            .map(|t| format!(", {}", t.kd.name()))
            .unwrap_or_default();
        let seed = if exp.students.len() > 2 {
            format!(", seed {}", config.seed)
        } else {
            String::new()
        };
        println!(
            "== {stage}: {}{method}{seed} -> {}",
            config.model.name,
            dir.display()
        );
        let outcome = run_stage(config, &dir, quiet, device)?;
        if outcome == StageOutcome::Skipped {
            println!("{stage}: finished earlier, skipped");
        }
    }
    let runs: Vec<PathBuf> = exp.stages().map(|(s, _)| exp.out.join(s)).collect();
    let report = exp.out.join(REPORT);
    // Inference speed on the study's device, in the precision each run trained in.
    let speed = SpeedOptions {
        device,
        precision: None,
    };
    let comparison = compare(&runs, &report, speed)?;
    println!("\n{}", results_table(&comparison));
    println!(
        "report: {} (results.md, results.json, accuracy.png, loss.png, train_loss.png, loss_parts.png)",
        report.display()
    );
    Ok(comparison)
}
