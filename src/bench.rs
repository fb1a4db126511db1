//! `kd bench`: training / inference throughput of a model, and decode + augment
//! throughput of the data pipeline, with peak memory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::data::{AugmentConfig, CacheMode, ImageFolder, Loader, Transform};
use crate::device::{DeviceSpec, PeakDeviceMemory};
use crate::losses::{self, Method, cross_entropy};
use crate::models::memory::{Role, check_step};
use crate::models::{ModelSpec, Network, Outputs, Stem};
use crate::ops::{Ctx, Precision};
use crate::train::projection::Projection;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    /// Forward, backward and Adam step.
    Train,
    /// Forward only, inference mode.
    Eval,
    /// A distillation step: the teacher's inference forward plus the student's training step.
    Distill,
}

/// Which forward `--mode eval` times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// kd's inference plan (BatchNorm folded, fused NHWC kernels) where it applies (f32 on
    /// the CPU, a network it covers), else the network's forward.
    #[default]
    Auto,
    /// The network's forward, as training evaluates it.
    Forward,
}

/// What `kd bench` measures, and how.
#[derive(Debug, Args)]
pub struct BenchOptions {
    /// Architecture.
    #[arg(long, default_value = "resnet18")]
    pub model: String,
    /// Batch size.
    #[arg(long, visible_alias = "batch-size", default_value_t = 16)]
    pub batch: usize,
    /// Square image size.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// What to time.
    #[arg(long, value_enum, default_value = "train")]
    pub mode: BenchMode,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Classes of the model head.
    #[arg(long, default_value_t = 12)]
    pub classes: usize,
    /// Base width override.
    #[arg(long)]
    pub width: Option<usize>,
    /// ResNet stem [default: imagenet].
    #[arg(long, value_enum)]
    pub stem: Option<Stem>,
    /// Teacher architecture for --mode distill [default: coatnet_0].
    #[arg(long)]
    pub teacher: Option<String>,
    /// Teacher base width override for --mode distill.
    #[arg(long)]
    pub teacher_width: Option<usize>,
    /// Distillation method of --mode distill, with its default settings (see `kd distill
    /// --help`) [default: hinton].
    #[arg(long)]
    pub method: Option<String>,
    /// Weight of timm's feature term added to the method in --mode distill [default: 0,
    /// none].
    #[arg(long)]
    pub feature_weight: Option<f64>,
    /// Instead of a model, measure decode + augment images/s of this image folder.
    #[arg(long, value_parser = crate::io::parse_path)]
    pub data: Option<PathBuf>,
    /// With --data: time an epoch served from the image cache (after one pass fills it).
    #[arg(long, value_enum, default_value = "off")]
    pub cache_images: CacheMode,
    /// cpu, or cuda[:N] for NVIDIA GPU N (a build with --features cuda); cubecl-cpu runs the
    /// GPU code path on the CPU (a build with --features cubecl-cpu).
    #[arg(long, default_value = "cpu", value_parser = <DeviceSpec as std::str::FromStr>::from_str)]
    pub device: DeviceSpec,
    /// Precision of convolutions and linear layers.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Forward that --mode eval times.
    #[arg(long, value_enum, default_value_t)]
    pub engine: Engine,
    /// With --mode eval on kd's inference plan: also the time of each step per batch
    /// (where the time goes).
    #[arg(long)]
    pub profile: bool,
}

/// One benchmark result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// What was measured.
    pub what: String,
    /// Backend.
    pub device: String,
    /// Precision of convolutions and linear layers.
    pub precision: String,
    /// Batch size.
    pub batch: usize,
    /// Image side.
    pub image_size: usize,
    /// Median images per second over the timed steps.
    pub images_per_second: f64,
    /// Median seconds per step.
    pub seconds_per_step: f64,
    /// Peak resident memory of the process, MiB (Linux).
    pub peak_rss_mib: Option<f64>,
    /// Peak memory the device's allocator reserved, MiB (GPU backends; none on flex).
    pub peak_device_mib: Option<f64>,
    /// Threads in rayon's pool.
    pub threads: usize,
    /// With --profile: each step of kd's inference plan, its mean time per batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<crate::infer::Profile>,
}

/// Peak resident set size of this process in MiB (`VmHWM`), where the OS reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Seconds of each of `steps` timed inference forwards of `x` (after `warmup` untimed ones,
/// which on a GPU compile and autotune kernels), sampling device memory after each.
pub fn inference_times(
    net: &Network,
    x: Tensor<4>,
    cx: &Ctx,
    warmup: usize,
    steps: usize,
    memory: &mut PeakDeviceMemory,
) -> Vec<f64> {
    let device = x.device();
    let mut times = Vec::new();
    for step in 0..warmup + steps {
        let t0 = Instant::now();
        let _ = net.forward(x.clone(), cx).into_data();
        if step >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
        memory.sample(&device);
    }
    times
}

/// Seconds of each of `steps` timed runs of `plan` on `x` (after `warmup` untimed ones).
pub fn plan_times(
    plan: &mut crate::infer::Plan,
    x: Tensor<4>,
    warmup: usize,
    steps: usize,
    profile: bool,
) -> Result<Vec<f64>> {
    let batch = x.dims()[0];
    let images = crate::models::onnx::floats(x)?;
    let mut times = Vec::new();
    for step in 0..warmup + steps {
        if profile && step == warmup {
            plan.profile_steps();
        }
        let t0 = Instant::now();
        std::hint::black_box(plan.run(&images, batch));
        if step >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The teacher of --mode distill.
fn teacher_name(a: &BenchOptions) -> &str {
    a.teacher.as_deref().unwrap_or("coatnet_0")
}

/// The method of --mode distill.
fn method_name(a: &BenchOptions) -> &str {
    a.method.as_deref().unwrap_or(Method::default().name())
}

/// Runs the benchmark.
pub fn run(a: &BenchOptions) -> Result<BenchResult> {
    if a.batch == 0 || a.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    if a.profile && (a.mode != BenchMode::Eval || a.data.is_some()) {
        bail!("--profile times the steps of kd's inference plan: it goes with --mode eval");
    }
    const MAX_STEPS: usize = 1_000_000;
    if a.steps > MAX_STEPS || a.warmup > MAX_STEPS {
        bail!("--steps and --warmup must be at most {MAX_STEPS}");
    }
    if a.classes < 2 {
        bail!("--classes {} is invalid: use at least 2", a.classes);
    }
    if a.mode != BenchMode::Distill {
        let given = [
            ("--teacher", a.teacher.is_some()),
            ("--teacher-width", a.teacher_width.is_some()),
            ("--method", a.method.is_some()),
            ("--feature-weight", a.feature_weight.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, given)| *given) {
            bail!("{flag} applies to distillation steps: add --mode distill");
        }
    }
    match &a.data {
        Some(dir) => bench_pipeline(a, dir),
        None => bench_model(a),
    }
}

fn bench_model(a: &BenchOptions) -> Result<BenchResult> {
    let precision = a.precision;
    let device = crate::device::open(a.device, precision)?;
    let cx = Ctx::new(precision);
    let spec = ModelSpec {
        name: a.model.clone(),
        width: a.width,
        stem: a.stem,
    };
    let (b, s) = (a.batch, a.image_size);
    let labels: Vec<i64> = (0..b).map(|i| (i % a.classes) as i64).collect();
    let mut times = Vec::new();
    let mut memory = PeakDeviceMemory::default();
    let mut plan = None;
    let teacher_spec = ModelSpec {
        name: teacher_name(a).to_string(),
        width: a.teacher_width,
        stem: None,
    };
    let mut roles = vec![Role {
        spec: &spec,
        train: a.mode != BenchMode::Eval,
    }];
    if a.mode == BenchMode::Distill {
        roles.push(Role {
            spec: &teacher_spec,
            train: false,
        });
    }
    check_step(&roles, (a.classes, s, b), precision, &device)?;
    match a.mode {
        BenchMode::Train | BenchMode::Distill => {
            let ad = device.clone().autodiff();
            let mut model = spec.build(a.classes, s, &ad)?;
            let teacher = match a.mode {
                BenchMode::Distill => Some(teacher_spec.build(a.classes, s, &device)?.valid()),
                _ => None,
            };
            let distiller = match a.mode {
                BenchMode::Distill => {
                    let method =
                        Method::from_table(&serde_json::json!({ "method": method_name(a) }))?;
                    let feature_weight = a.feature_weight.unwrap_or(0.0);
                    crate::losses::feature::WithFeatures::check(feature_weight)?;
                    Some(method.build(feature_weight))
                }
                _ => None,
            };
            let features = distiller.as_ref().is_some_and(|d| d.needs_features());
            let mut projection = match &teacher {
                Some(t) if features && t.num_features() != model.num_features() => Some(
                    Projection::new(model.num_features(), t.num_features(), 1e-8, &ad),
                ),
                _ => None,
            };
            // PyTorch's Adam defaults, as in bench/pytorch_reference.py.
            let mut optim = crate::ops::FusedAdam::new(1e-8).init();
            // As in bench/pytorch_reference.py, the batch is made on the device once: a step
            // measures compute, not the host-to-device copy (`--data` measures the pipeline).
            let data: Vec<f32> = (0..b * 3 * s * s)
                .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
                .collect();
            let x = Tensor::<4>::from_data(TensorData::new(data, [b, 3, s, s]), &device);
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [b]), &ad);
            for step in 0..a.warmup + a.steps {
                let t0 = Instant::now();
                // As a training step: the teacher's outputs (features only for a method that
                // reads them) join the student's graph as constants, on the device.
                let outputs = |net: &Network, x: Tensor<4>| {
                    if features {
                        net.outputs(x, &cx)
                    } else {
                        Outputs {
                            logits: net.forward(x, &cx),
                            features: None,
                        }
                    }
                };
                let student = outputs(&model, x.clone().autodiff());
                let loss = match (&teacher, &distiller) {
                    (Some(t), Some(d)) => {
                        let t_out = outputs(t, x.clone());
                        let teacher = Outputs {
                            logits: t_out.logits.autodiff(),
                            features: t_out.features.map(Tensor::autodiff),
                        };
                        d.loss(&losses::Step {
                            student: &student,
                            teacher: &teacher,
                            targets: &y,
                            epoch: 1,
                            projection: projection.as_ref().map(|p| &p.layer),
                        })
                        .total
                    }
                    _ => cross_entropy(student.logits, y.clone()),
                };
                let mut grads = loss.backward();
                let model_grads = GradientsParams::from_module(&mut grads, &model);
                model = optim.step(1e-4, model, model_grads);
                if let Some(p) = projection.as_mut() {
                    p.step(1e-4, &mut grads);
                }
                device.sync().ok();
                if step >= a.warmup {
                    times.push(t0.elapsed().as_secs_f64());
                }
                memory.sample(&device);
            }
        }
        BenchMode::Eval => {
            let model = spec.build(a.classes, s, &device)?.valid();
            let x = Tensor::<4>::random([b, 3, s, s], Distribution::Normal(0.0, 1.0), &device);
            plan = match a.engine {
                Engine::Auto if crate::infer::applies(&device, precision) => {
                    crate::infer::Plan::new(&model, s).ok()
                }
                _ => None,
            };
            if a.profile && plan.is_none() {
                bail!(
                    "--profile times the steps of kd's inference plan, which does not run \
                     here: it takes --engine auto on the CPU in f32 and a CNN (not CoAtNet)"
                );
            }
            times = match plan.as_mut() {
                Some(plan) => plan_times(plan, x, a.warmup, a.steps, a.profile)?,
                None => inference_times(&model, x, &cx, a.warmup, a.steps, &mut memory),
            };
        }
    }
    let sps = median(times);
    Ok(BenchResult {
        what: match a.mode {
            BenchMode::Train => format!("{} train step", a.model),
            BenchMode::Eval if plan.is_some() => format!("{} inference (kd's plan)", a.model),
            BenchMode::Eval => format!("{} inference (forward)", a.model),
            BenchMode::Distill => format!(
                "{} -> {} distillation step ({}{})",
                teacher_name(a),
                a.model,
                method_name(a),
                if a.feature_weight.unwrap_or(0.0) > 0.0 {
                    " + features"
                } else {
                    ""
                }
            ),
        },
        device: crate::device::describe(a.device),
        precision: precision.to_string(),
        batch: b,
        image_size: s,
        images_per_second: b as f64 / sps,
        seconds_per_step: sps,
        peak_rss_mib: peak_rss_mib(),
        peak_device_mib: memory.mib(),
        threads: rayon::current_num_threads(),
        profile: plan.as_ref().and_then(crate::infer::Plan::profile),
    })
}

fn bench_pipeline(a: &BenchOptions, dir: &std::path::Path) -> Result<BenchResult> {
    crate::data::check_image_size(a.image_size)?;
    let folder = ImageFolder::scan(dir)?;
    let transform = Transform {
        augment: Some(AugmentConfig::default()),
        size: (a.image_size, a.image_size),
        mean: [0.5; 3],
        std: [0.25; 3],
    };
    let loader = Loader::new(folder.samples, transform, a.batch, true, 0)
        .with_cache(a.cache_images, 1 << 20);
    if a.cache_images != CacheMode::Off {
        // Fill the cache with one untimed pass, as the first epoch of training would.
        for chunk in loader.epoch_order(0).chunks(a.batch) {
            loader.load_batch(chunk, 0)?;
        }
    }
    let order = loader.epoch_order(1);
    let mut times = Vec::new();
    let batches: Vec<&[usize]> = order.chunks(a.batch).take(a.warmup + a.steps).collect();
    if batches.len() <= a.warmup {
        bail!(
            "{} has too few images for {} batches of {}",
            dir.display(),
            a.warmup + a.steps,
            a.batch
        );
    }
    for (i, chunk) in batches.iter().enumerate() {
        let t0 = Instant::now();
        let batch = loader.load_batch(chunk, 1)?;
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64() / batch.len() as f64 * a.batch as f64);
        }
    }
    let sps = median(times);
    Ok(BenchResult {
        what: match a.cache_images {
            CacheMode::Off => "decode + augment (tutorial pipeline)".into(),
            CacheMode::Decoded => "augment from the decoded-image cache".into(),
            CacheMode::Resized => "augment from the resized-image cache".into(),
        },
        device: "CPU threads".into(),
        precision: "-".into(),
        batch: a.batch,
        image_size: a.image_size,
        images_per_second: a.batch as f64 / sps,
        seconds_per_step: sps,
        peak_rss_mib: peak_rss_mib(),
        peak_device_mib: None,
        threads: rayon::current_num_threads(),
        profile: None,
    })
}
