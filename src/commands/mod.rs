//! The command line: one file per subcommand, each parsing its flags, calling the module
//! that does the work and printing the outcome.

mod bench;
mod compare;
mod demo;
mod eval;
mod export;
mod flags;
mod models;
mod predict;
mod run;
mod split;
mod stats;
mod train;

use anyhow::Result;
use burn::tensor::Device;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::device::DeviceSpec;
use crate::ops::Precision;
use crate::run::Run;

/// Knowledge distillation for image classifiers.
#[derive(Debug, Parser)]
#[command(name = "kd", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant (kd distill's) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Split a class folder into DST/train and DST/val (stratified, seeded).
    Split(split::SplitArgs),
    /// Per-channel mean and std of the images in a folder.
    Stats(stats::StatsArgs),
    /// Train a classifier (teacher or student) on an image folder.
    #[command(after_long_help = flags::recipe_help())]
    Train(train::TrainArgs),
    /// Train a student with a trained teacher's outputs (Hinton's loss by default).
    #[command(after_long_help = flags::recipe_help())]
    Distill(train::DistillArgs),
    /// Accuracy, per-class scores and confusion matrix of a trained run.
    Eval(eval::EvalArgs),
    /// Top-k classes of images with a trained run.
    Predict(predict::PredictArgs),
    /// Architectures kd knows, with parameter counts.
    Models(models::ModelsArgs),
    /// Write a run's weights as PyTorch-named safetensors (torchvision / reference CoAtNet keys).
    Export(export::ExportArgs),
    /// Accuracy/loss curves and a results table of several runs.
    Compare(compare::CompareArgs),
    /// Run a whole study (split, teacher, student, KD student, comparison) from a TOML file.
    Run(run::RunArgs),
    /// The study on the bundled MNIST digits, small enough for a laptop CPU.
    Demo(demo::DemoArgs),
    /// Measure training/inference and data-pipeline throughput.
    Bench(bench::BenchArgs),
}

impl Cli {
    /// Runs the parsed command.
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Split(a) => split::run(a),
            Command::Stats(a) => stats::run(a),
            Command::Train(a) => train::train(a),
            Command::Distill(a) => train::distill(a),
            Command::Eval(a) => eval::run(a),
            Command::Predict(a) => predict::run(a),
            Command::Models(a) => models::run(a),
            Command::Export(a) => export::run(a),
            Command::Compare(a) => compare::run(a),
            Command::Run(a) => run::run(a),
            Command::Demo(a) => demo::run(a),
            Command::Bench(a) => bench::run(a),
        }
    }
}

/// `--device` and `--precision`, shared by the commands that compute.
#[derive(Debug, Clone, Args, Default, Serialize)]
pub struct ComputeArgs {
    /// cpu, or cuda[:N] for NVIDIA GPU N (a build with --features cuda); cubecl-cpu runs the
    /// GPU code path on the CPU (a build with --features cubecl-cpu, for checking that path).
    #[arg(long, default_value = "cpu", value_parser = <DeviceSpec as std::str::FromStr>::from_str)]
    #[serde(skip)]
    pub device: DeviceSpec,
    /// Precision of convolutions and linear layers [default: f32, or the run's for eval/predict/compare].
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
}

impl ComputeArgs {
    /// The device and precision of an eval/predict call: `--precision`, else the run's own.
    fn open_for(&self, run: &Run) -> Result<(Device, Precision)> {
        let precision = self.precision.unwrap_or(run.config.precision);
        Ok((crate::device::open(self.device, precision)?, precision))
    }
}
