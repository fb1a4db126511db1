//! `kd train` and `kd distill`.

use anyhow::Result;
use clap::Args;

use super::flags::{DistillFlags, TrainFlags};
use crate::train::TrainOptions;

/// Options of `kd train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    train: TrainFlags,
}

/// Options of `kd distill`.
#[derive(Debug, Args)]
pub struct DistillArgs {
    #[command(flatten)]
    train: TrainFlags,
    #[command(flatten)]
    distill: DistillFlags,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let config = a.train.config(None)?;
    run_training(&config, &a.train)
}

pub fn distill(a: DistillArgs) -> Result<()> {
    let config = a.train.config(Some(&a.distill))?;
    run_training(&config, &a.train)
}

fn run_training(config: &crate::run::TrainConfig, flags: &TrainFlags) -> Result<()> {
    let options = TrainOptions {
        resume: flags.resume,
        quiet: flags.quiet,
        device: flags.compute.device,
    };
    let summary = crate::train::train(config, &flags.out, &options)?;
    println!(
        "done: best val accuracy {:.2}%; run folder {}",
        summary.best_accuracy * 100.0,
        summary.dir.display()
    );
    Ok(())
}
