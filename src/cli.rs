//! Command-line interface of `kd`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::data::{
    AugmentConfig, ImageFolder, LinkMode, Loader, channel_stats, stratified_split, write_split,
};
use crate::device::ComputeArgs;
use crate::eval::{EvalReport, evaluate, predict};
use crate::io::{ensure_dir, write_json};
use crate::losses::{KdConfig, KdLossKind};
use crate::models::{KNOWN_MODELS, ModelSpec, Stem};
use crate::run::Run;
use crate::train::{NanPolicy, TeacherConfig, TrainConfig, TrainOptions, default_device, train};
use crate::{bench, report};
use burn::tensor::Device;

/// Knowledge distillation for image classifiers.
#[derive(Debug, Parser)]
#[command(name = "kd", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Split a class folder into DST/train and DST/val (stratified, seeded).
    Split(SplitArgs),
    /// Per-channel mean and std of the images in a folder.
    Stats(StatsArgs),
    /// Train a classifier (teacher or student) on an image folder.
    Train(TrainArgs),
    /// Train a student with a trained teacher's soft targets (Hinton's loss).
    Distill(DistillArgs),
    /// Accuracy, per-class scores and confusion matrix of a trained run.
    Eval(EvalArgs),
    /// Top-k classes of images with a trained run.
    Predict(PredictArgs),
    /// Architectures kd knows, with parameter counts.
    Models(ModelsArgs),
    /// Write a run's weights as PyTorch-named safetensors (torchvision / reference CoAtNet keys).
    Export(ExportArgs),
    /// Accuracy/loss curves and a results table of several runs.
    Compare(CompareArgs),
    /// Run a whole study (split, teacher, student, KD student, comparison) from a TOML file.
    Run(RunArgs),
    /// The study on the bundled MNIST digits, small enough for a laptop CPU.
    Demo(DemoArgs),
    /// Measure training/inference and data-pipeline throughput.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Args)]
struct SplitArgs {
    /// Folder with one sub-folder per class.
    src: PathBuf,
    /// Output folder (gets train/ and val/).
    dst: PathBuf,
    /// Share of each class that goes to val/.
    #[arg(long, default_value_t = 0.3)]
    val_fraction: f64,
    /// Seed of the split.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Hard-link images instead of copying them.
    #[arg(long)]
    link: bool,
    /// Replace a non-empty DST.
    #[arg(long)]
    force: bool,
    /// Fail on non-image files (default: skip them with a warning).
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// Folder with one sub-folder per class (or with train/ and val/: train/ is used).
    dir: PathBuf,
    /// Resize each image to SIZE x SIZE first (what a model sees).
    #[arg(long)]
    size: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Options shared by `train` and `distill`. Unset options keep the tutorial's recipe
/// (or, with --resume, the run's recorded value).
#[derive(Debug, Args)]
struct TrainArgs {
    /// Folder with train/ and val/, or a class folder to split in memory.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Architecture (see `kd models`).
    #[arg(long, visible_alias = "student")]
    model: Option<String>,
    /// Run folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Epochs [default: 50].
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per batch [default: 16].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Adam learning rate [default: 1e-4].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Adam epsilon [default: 1e-8, PyTorch's].
    #[arg(long, allow_negative_numbers = true)]
    adam_epsilon: Option<f64>,
    /// Cosine schedule T_max in epochs [default: 20].
    #[arg(long)]
    t_max: Option<usize>,
    /// Cosine schedule minimum rate [default: 1e-9].
    #[arg(long)]
    eta_min: Option<f64>,
    /// Square input size in pixels [default: 224].
    #[arg(long)]
    image_size: Option<usize>,
    /// Seed of initialisation, shuffling and augmentation, and of the split and subsets
    /// unless --split-seed is given [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// Seed of the in-memory split and the --train-limit/--val-limit subsets, to vary
    /// --seed while keeping the data (a teacher's split, say) [default: --seed].
    #[arg(long)]
    split_seed: Option<u64>,
    /// Validation share when DATA has no train/ and val/ [default: 0.3].
    #[arg(long, allow_negative_numbers = true)]
    val_fraction: Option<f64>,
    /// Base width of the model (first stage; tiny models for tests).
    #[arg(long)]
    width: Option<usize>,
    /// ResNet stem: imagenet (7x7/2 + max pool, images from 32) or small (3x3/1, from 8)
    /// [default: imagenet].
    #[arg(long, value_enum)]
    stem: Option<Stem>,
    /// Normalization mean "r,g,b" [default: computed on the training images].
    #[arg(long, value_parser = parse_triple)]
    mean: Option<[f32; 3]>,
    /// Normalization std "r,g,b" [default: computed on the training images].
    #[arg(long, value_parser = parse_triple)]
    std: Option<[f32; 3]>,
    /// Turn all random augmentation off.
    #[arg(long)]
    no_augment: bool,
    /// RandomRotation degrees [default: 10].
    #[arg(long)]
    rotation: Option<f32>,
    /// GaussianBlur kernel size, odd, 0 = off [default: 5].
    #[arg(long)]
    blur_kernel: Option<usize>,
    /// GaussianBlur sigma range "min,max", drawn per image [default: 0.1,3].
    #[arg(long, value_parser = parse_pair)]
    blur_sigma: Option<[f32; 2]>,
    /// ColorJitter brightness [default: 0.5].
    #[arg(long)]
    brightness: Option<f32>,
    /// ColorJitter contrast [default: 0.5].
    #[arg(long)]
    contrast: Option<f32>,
    /// ColorJitter saturation [default: 0.5].
    #[arg(long)]
    saturation: Option<f32>,
    /// ColorJitter hue [default: 0].
    #[arg(long)]
    hue: Option<f32>,
    /// RandomHorizontalFlip (p = 0.5).
    #[arg(long)]
    hflip: bool,
    /// RandomResizedCrop instead of Resize.
    #[arg(long)]
    random_resized_crop: bool,
    /// RandomResizedCrop area scale range "min,max" [default: 0.08,1].
    #[arg(long, value_parser = parse_pair)]
    crop_scale: Option<[f32; 2]>,
    /// Train on a class-balanced subset of at most N images.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Validate on a class-balanced subset of at most N images.
    #[arg(long)]
    val_limit: Option<usize>,
    /// Start from a PyTorch state dict (.safetensors or .pth; torchvision or reference CoAtNet names).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// On a NaN/Inf loss: stop (keep the last good checkpoint) or skip the batch (an epoch
    /// with every batch skipped still stops) [default: stop].
    #[arg(long, value_enum)]
    nan_policy: Option<NanArg>,
    /// Fail on non-image files in the class folders (default: skip them with a warning).
    #[arg(long)]
    strict: bool,
    /// Keep images in memory after the first epoch: decoded (exact) or resized (augment
    /// after resize) [default: off].
    #[arg(long, value_enum)]
    cache_images: Option<crate::data::CacheMode>,
    /// Memory budget of each image cache in MiB [default: 4096].
    #[arg(long)]
    cache_mib: Option<usize>,
    /// Continue the run in --out from its last completed epoch.
    #[arg(long)]
    resume: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

#[derive(Debug, Args)]
struct DistillArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// Run folder of the trained teacher.
    #[arg(long)]
    teacher: PathBuf,
    /// Teacher checkpoint: best or final.
    #[arg(long, default_value = "best")]
    teacher_checkpoint: String,
    /// Softmax temperature T.
    #[arg(long, default_value_t = 7.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Weight of the soft-target term.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    alpha: f64,
    /// Compute the teacher's logits once and reuse them each epoch (needs --no-augment).
    #[arg(long)]
    cache_teacher: bool,
    /// hinton (KL averaged per sample) or seed (the tutorial's exact formula).
    #[arg(long, value_enum, default_value = "hinton")]
    kd_loss: KdLossArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum NanArg {
    Stop,
    SkipBatch,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KdLossArg {
    Hinton,
    Seed,
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Run folder.
    #[arg(long)]
    run: PathBuf,
    /// best or final.
    #[arg(long, default_value = "best")]
    checkpoint: String,
    /// Images to evaluate: DIR/val if it exists, else every image of DIR [default: the run's validation images].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Folder for eval JSON and confusion PNG [default: RUN/eval; files named
    /// eval-CHECKPOINT.json, or eval-CHECKPOINT-on-FOLDER.json with --data].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

#[derive(Debug, Args)]
struct PredictArgs {
    /// Run folder.
    #[arg(long)]
    run: PathBuf,
    /// Image files or folders.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// best or final.
    #[arg(long, default_value = "best")]
    checkpoint: String,
    /// Number of classes to show per image.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Also write each image's top class to this CSV file: file,class,probability (file
    /// relative to the folder given, or the file's name).
    #[arg(long)]
    csv: Option<PathBuf>,
    #[command(flatten)]
    compute: ComputeArgs,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Run folders.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Folder for accuracy.png, loss.png, train_loss.png, results.md and results.json.
    #[arg(long)]
    out: PathBuf,
    /// Device and precision of the inference-speed column [default: cpu, each run's precision].
    #[command(flatten)]
    compute: ComputeArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Experiment file (see examples/).
    config: PathBuf,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// The bundled digits [default: data/mnist5k].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output folder.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Seed of split, initialisation and augmentation.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Run folder.
    #[arg(long)]
    run: PathBuf,
    /// best or final.
    #[arg(long, default_value = "best")]
    checkpoint: String,
    /// Output .safetensors file (load in PyTorch with safetensors.torch.load_file).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct ModelsArgs {
    /// Class count for the parameter counts.
    #[arg(long, default_value_t = 1000)]
    classes: usize,
    /// Image size for the parameter counts (CoAtNet's attention tables grow with it).
    #[arg(long, default_value_t = 224)]
    image_size: usize,
}

fn parse_triple(s: &str) -> Result<[f32; 3], String> {
    parse_floats(s, "three comma-separated numbers, e.g. 0.44,0.47,0.43")
}

fn parse_pair(s: &str) -> Result<[f32; 2], String> {
    parse_floats(s, "two comma-separated numbers, min,max, e.g. 0.1,3")
}

fn parse_floats<const N: usize>(s: &str, expected: &str) -> Result<[f32; N], String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>().map_err(|e| format!("'{x}': {e}")))
        .collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("expected {expected}"))
}

impl Cli {
    /// Runs the parsed command.
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Split(a) => cmd_split(a),
            Command::Stats(a) => cmd_stats(a),
            Command::Train(a) => {
                let (config, options, out) = train_config(&a, None)?;
                run_training(&config, &out, &options)
            }
            Command::Distill(a) => {
                let kd = KdConfig {
                    temperature: a.temperature,
                    alpha: a.alpha,
                    loss: match a.kd_loss {
                        KdLossArg::Hinton => KdLossKind::Hinton,
                        KdLossArg::Seed => KdLossKind::Seed,
                    },
                };
                let teacher = TeacherConfig {
                    run: a.teacher.clone(),
                    checkpoint: a.teacher_checkpoint.clone(),
                    kd,
                    cache_logits: a.cache_teacher,
                };
                let (config, options, out) = train_config(&a.train, Some(teacher))?;
                run_training(&config, &out, &options)
            }
            Command::Eval(a) => cmd_eval(a),
            Command::Predict(a) => cmd_predict(a),
            Command::Models(a) => cmd_models(a),
            Command::Export(a) => {
                if a.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                    bail!("--out {} must end in .safetensors", a.out.display());
                }
                let run = Run::open(&a.run)?;
                let net = run.load_network(&a.checkpoint, &default_device())?;
                let bytes = crate::models::weights::to_pytorch_safetensors(&net)?;
                // What a deployment needs besides the weights (the class order, the input
                // size and normalization), readable with safetensors' `metadata()`.
                let c = &run.config;
                let metadata = std::collections::BTreeMap::from([
                    ("format".to_string(), "pt".to_string()),
                    ("kd.classes".into(), serde_json::to_string(&run.classes)?),
                    ("kd.model".into(), serde_json::to_string(&c.model)?),
                    ("kd.image_size".into(), c.image_size.to_string()),
                    ("kd.mean".into(), serde_json::to_string(&c.mean)?),
                    ("kd.std".into(), serde_json::to_string(&c.std)?),
                    ("kd.checkpoint".into(), a.checkpoint.clone()),
                ]);
                let bytes = crate::models::weights::with_metadata(&bytes, &metadata)?;
                if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
                    crate::io::ensure_dir(parent)?;
                }
                crate::io::write_atomic(&a.out, &bytes)?;
                println!(
                    "wrote {} ({} classes: {}); in PyTorch: model.load_state_dict(safetensors.torch.load_file(...))",
                    a.out.display(),
                    run.classes.len(),
                    run.classes.join(", ")
                );
                Ok(())
            }
            Command::Compare(a) => {
                let speed = crate::compare::SpeedOptions {
                    device: a.compute.device,
                    precision: a.compute.precision,
                };
                let rows = crate::compare::compare(&a.runs, &a.out, speed)?;
                print!("{}", crate::compare::results_table(&rows));
                println!(
                    "wrote {} (results.md, results.json, accuracy.png, loss.png, train_loss.png)",
                    a.out.display()
                );
                Ok(())
            }
            Command::Run(a) => {
                let mut exp = crate::study::load_experiment(&a.config)?;
                exp.set_precision(a.compute.precision);
                crate::study::run_experiment(&exp, a.quiet, a.compute.device).map(|_| ())
            }
            Command::Demo(a) => cmd_demo(a),
            Command::Bench(a) => bench::run(&a),
        }
    }
}

fn cmd_split(a: SplitArgs) -> Result<()> {
    crate::data::split::check_val_fraction(a.val_fraction)?;
    let folder = ImageFolder::scan(&a.src)?;
    crate::train::dataset::report_skipped(&folder.skipped, Some(a.strict))?;
    let split = stratified_split(&folder, a.val_fraction, a.seed)?;
    let mode = if a.link {
        LinkMode::HardLink
    } else {
        LinkMode::Copy
    };
    write_split(&folder, &split, &a.dst, mode, a.force)?;
    let count = |s: &[crate::data::Sample], l: usize| s.iter().filter(|x| x.label == l).count();
    let w = folder
        .classes
        .iter()
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<w$}  {:>6}  {:>6}  {:>6}",
        "class", "train", "val", "total"
    );
    for (l, c) in folder.classes.iter().enumerate() {
        let (t, v) = (count(&split.train, l), count(&split.val, l));
        println!("{c:<w$}  {t:>6}  {v:>6}  {:>6}", t + v);
    }
    println!(
        "{:<w$}  {:>6}  {:>6}  {:>6}",
        "all",
        split.train.len(),
        split.val.len(),
        split.train.len() + split.val.len()
    );
    println!("wrote {}", a.dst.display());
    Ok(())
}

fn cmd_stats(a: StatsArgs) -> Result<()> {
    let dir = if a.dir.join("train").is_dir() {
        a.dir.join("train")
    } else {
        a.dir.clone()
    };
    if let Some(size) = a.size {
        crate::data::check_image_size(size)?;
    }
    let folder = ImageFolder::scan(&dir)?;
    crate::train::dataset::report_skipped(&folder.skipped, None)?;
    let stats = channel_stats(&folder.samples, a.size)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        println!("images {}", stats.images);
        println!(
            "mean   {:.4}, {:.4}, {:.4}",
            stats.mean[0], stats.mean[1], stats.mean[2]
        );
        println!(
            "std    {:.4}, {:.4}, {:.4}",
            stats.std[0], stats.std[1], stats.std[2]
        );
        println!(
            "use with: --mean {:.4},{:.4},{:.4} --std {:.4},{:.4},{:.4}",
            stats.mean[0], stats.mean[1], stats.mean[2], stats.std[0], stats.std[1], stats.std[2]
        );
    }
    Ok(())
}

/// Builds the effective config: the recipe (or the recorded config on --resume) with the
/// given options applied on top.
fn train_config(
    a: &TrainArgs,
    teacher: Option<TeacherConfig>,
) -> Result<(TrainConfig, TrainOptions, PathBuf)> {
    let mut c = if a.resume && a.out.join(crate::run::files::CONFIG).is_file() {
        Run::open(&a.out)?.config
    } else {
        let data = a
            .data
            .clone()
            .context("--data is required: pass the image folder to train on")?;
        let model = a
            .model
            .clone()
            .context("--model is required: pick one from `kd models`")?;
        TrainConfig::recipe(data, ModelSpec::named(&model))
    };
    if let Some(d) = &a.data {
        c.data = d.clone();
    }
    if let Some(m) = &a.model {
        c.model.name = m.clone();
    }
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = a.$field { c.$field = v.into(); } )* };
    }
    set!(
        epochs,
        batch_size,
        lr,
        adam_epsilon,
        t_max,
        eta_min,
        image_size,
        seed,
        split_seed,
        val_fraction
    );
    if a.width.is_some() {
        c.model.width = a.width;
    }
    if a.stem.is_some() {
        c.model.stem = a.stem;
    }
    if a.mean.is_some() {
        c.mean = a.mean;
    }
    if a.std.is_some() {
        c.std = a.std;
    }
    if a.no_augment {
        c.augment = AugmentConfig::none();
    }
    let aug = &mut c.augment;
    if let Some(v) = a.rotation {
        aug.rotation_degrees = v;
    }
    if let Some(v) = a.blur_kernel {
        aug.blur_kernel = v;
    }
    if let Some(v) = a.blur_sigma {
        aug.blur_sigma = v;
    }
    if let Some(v) = a.brightness {
        aug.brightness = v;
    }
    if let Some(v) = a.contrast {
        aug.contrast = v;
    }
    if let Some(v) = a.saturation {
        aug.saturation = v;
    }
    if let Some(v) = a.hue {
        aug.hue = v;
    }
    aug.hflip |= a.hflip;
    aug.random_resized_crop |= a.random_resized_crop;
    if let Some(v) = a.crop_scale {
        aug.crop_scale = v;
    }
    if a.train_limit.is_some() {
        c.train_limit = a.train_limit;
    }
    if a.val_limit.is_some() {
        c.val_limit = a.val_limit;
    }
    if a.init_from.is_some() {
        c.init_from = a.init_from.clone();
    }
    if let Some(n) = a.nan_policy {
        c.nan_policy = match n {
            NanArg::Stop => NanPolicy::Stop,
            NanArg::SkipBatch => NanPolicy::SkipBatch,
        };
    }
    if teacher.is_some() {
        c.teacher = teacher;
    }
    c.strict |= a.strict;
    if let Some(p) = a.compute.precision {
        c.precision = p;
    }
    if let Some(m) = a.cache_images {
        c.cache_images = m;
    }
    if let Some(m) = a.cache_mib {
        c.cache_mib = m;
    }
    let options = TrainOptions {
        resume: a.resume,
        quiet: a.quiet,
        device: a.compute.device,
    };
    Ok((c, options, a.out.clone()))
}

fn run_training(config: &TrainConfig, out: &Path, options: &TrainOptions) -> Result<()> {
    let summary = train(config, out, options)?;
    println!(
        "done: best val accuracy {:.2}%; run folder {}",
        summary.best_accuracy * 100.0,
        summary.dir.display()
    );
    Ok(())
}

/// The device and precision of an eval/predict call: `--precision`, else the run's own.
fn open_for_run(compute: &ComputeArgs, run: &Run) -> Result<Device> {
    let precision = compute.precision.unwrap_or(run.config.precision);
    let device = crate::device::open(compute.device, precision)?;
    crate::device::set_precision(precision);
    Ok(device)
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let run = Run::open(&a.run)?;
    let device = open_for_run(&a.compute, &run)?;
    let (samples, data, suffix) = match &a.data {
        None => {
            let data = crate::train::dataset::for_config(&run.config).with_context(|| {
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
                    a.run.display()
                )
            })?;
            check_classes(&run, &data.classes, &run.config.data)?;
            (data.val, run.config.data.clone(), String::new())
        }
        Some(given) => {
            let dir = if given.join("val").is_dir() {
                given.join("val")
            } else {
                given.clone()
            };
            let folder = ImageFolder::scan(&dir)?;
            crate::train::dataset::report_skipped(&folder.skipped, None)?;
            check_classes(&run, &folder.classes, &dir)?;
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
    let out = a.out.clone().unwrap_or_else(|| run.dir.join("eval"));
    let json_path = out.join(format!("eval-{}{suffix}.json", a.checkpoint));
    let png_path = out.join(format!("confusion-{}{suffix}.png", a.checkpoint));
    if a.data.is_some() {
        refuse_other_data_in(&json_path, &data)?;
    }
    let net = run.load_network(&a.checkpoint, &device)?;
    let loader = Loader::new(
        samples,
        run.eval_transform(),
        run.config.batch_size.max(32),
        false,
        0,
    );
    let eval = evaluate(&net, &loader, &run.classes, &device)?;
    ensure_dir(&out)?;
    let evaluated = EvalReport {
        run: &run.dir,
        checkpoint: &a.checkpoint,
        epoch: run.checkpoint_epoch(&a.checkpoint),
        data: &data,
        validation_split: a.data.is_none(),
        evaluation: &eval,
    };
    write_json(&json_path, &evaluated)?;
    report::confusion_png(&eval, &png_path)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&evaluated)?);
    } else {
        let epoch = evaluated
            .epoch
            .map(|e| format!(" (epoch {e})"))
            .unwrap_or_default();
        println!(
            "run {}, checkpoint {}{epoch}, the {}images of {}\n",
            run.dir.display(),
            a.checkpoint,
            if a.data.is_none() { "validation " } else { "" },
            data.display()
        );
        print!("{}", eval.to_text());
        println!("\nwrote {} and {}", json_path.display(), png_path.display());
    }
    Ok(())
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

fn cmd_predict(a: PredictArgs) -> Result<()> {
    if a.top_k == 0 {
        bail!("--top-k 0 is invalid: show at least 1 class per image");
    }
    let run = Run::open(&a.run)?;
    let mut samples = Vec::new();
    // Each image with its name in the CSV: relative to the folder given, or its file name.
    let mut found: Vec<(PathBuf, String)> = Vec::new();
    for p in &a.paths {
        if p.is_dir() {
            let (files, mut skipped) = crate::data::folder::images_under(p)?;
            // A split folder's own record is not a stray file.
            skipped.retain(|f| f.file_name() != Some(crate::data::split::SPLIT_RECORD.as_ref()));
            crate::train::dataset::report_skipped(&skipped, None)?;
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
        } else {
            bail!(
                "{} does not exist: pass image files or folders",
                p.display()
            );
        }
    }
    // Each image once (given twice, or also inside a folder given); each CSV name once.
    let mut seen = std::collections::HashSet::new();
    let mut named: std::collections::HashMap<String, PathBuf> = Default::default();
    let mut names = std::collections::HashMap::new();
    for (path, name) in found {
        if !seen.insert(crate::io::resolved(&path)) {
            continue;
        }
        if a.csv.is_some()
            && let Some(other) = named.insert(name.clone(), path.clone())
        {
            bail!(
                "--csv: {} and {} would both be named '{name}': predict them separately, or pass the folder that holds both",
                other.display(),
                path.display()
            );
        }
        names.insert(path.display().to_string(), name);
        samples.push(crate::data::Sample { path, label: 0 });
    }
    let device = open_for_run(&a.compute, &run)?;
    let net = run.load_network(&a.checkpoint, &device)?;
    let loader = Loader::new(samples, run.eval_transform(), 32, false, 0);
    let preds = predict(&net, &loader, &run.classes, a.top_k, &device)?;
    if let Some(csv_path) = &a.csv {
        let mut csv = String::from("file,class,probability\n");
        for p in &preds {
            let name = names.get(&p.path).unwrap_or(&p.path);
            let top = &p.top[0];
            csv += &format!(
                "{},{},{}\n",
                csv_field(name),
                csv_field(&top.class),
                top.probability
            );
        }
        if let Some(parent) = csv_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            ensure_dir(parent)?;
        }
        crate::io::write_atomic(csv_path, csv.as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&preds)?);
    } else {
        for p in &preds {
            let top: Vec<String> = p
                .top
                .iter()
                .map(|s| format!("{} {:.1}%", s.class, s.probability * 100.0))
                .collect();
            println!("{}\t{}", p.path, top.join("  "));
        }
    }
    Ok(())
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

fn cmd_models(a: ModelsArgs) -> Result<()> {
    if a.classes < 2 {
        bail!("--classes {} is invalid: use at least 2", a.classes);
    }
    crate::data::check_image_size(a.image_size)?;
    let device = default_device();
    println!(
        "{:<12} {:>14}  kind  ({} classes, {}x{} images)",
        "model", "parameters", a.classes, a.image_size, a.image_size
    );
    for name in KNOWN_MODELS {
        let spec = ModelSpec::named(name);
        let (kind, count) = if spec.is_coatnet() {
            // Its relative-position tables need a multiple of 32 and follow the size.
            let count = match spec.validate(a.image_size) {
                Ok(()) => {
                    let net = spec.build(a.classes, a.image_size, &device)?;
                    crate::models::param_count(&net).to_string()
                }
                Err(_) => "-".into(),
            };
            ("teacher (CoAtNet; image size a multiple of 32)", count)
        } else {
            // The same at every size (global pooling before the head).
            let net = spec.build(a.classes, a.image_size.max(32), &device)?;
            let count = crate::models::param_count(&net).to_string();
            ("student/teacher (torchvision ResNet)", count)
        };
        println!("{name:<12} {count:>14}  {kind}");
    }
    Ok(())
}

/// The bundled demo experiment.
pub const DEMO_TOML: &str = include_str!("../examples/mnist-demo.toml");

fn cmd_demo(a: DemoArgs) -> Result<()> {
    let data = match a.data {
        Some(d) => d,
        None => {
            let local = PathBuf::from("data/mnist5k");
            if local.is_dir() {
                local
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist5k")
            }
        }
    };
    if !data.is_dir() {
        bail!(
            "demo data {} not found: run kd demo from the repository root or pass --data",
            data.display()
        );
    }
    let mut exp = crate::study::parse_experiment(DEMO_TOML)?;
    exp.out = a.out.clone();
    exp.data.path = data.clone();
    exp.data.seed = a.seed;
    for c in [&mut exp.teacher, &mut exp.student, &mut exp.kd_student] {
        c.data = data.clone();
        c.seed = a.seed;
        c.split_seed = Some(a.seed);
    }
    if let Some(t) = exp.kd_student.teacher.as_mut() {
        t.run = a.out.join("teacher");
    }
    println!(
        "kd demo: teacher {}, student {} and distilled student on {} ({}x{} px); output {}",
        exp.teacher.model.name,
        exp.student.model.name,
        data.display(),
        exp.student.image_size,
        exp.student.image_size,
        a.out.display()
    );
    exp.set_precision(a.compute.precision);
    crate::study::run_experiment(&exp, a.quiet, a.compute.device)?;
    Ok(())
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
