//! `kd run`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::ComputeArgs;
use crate::experiment::{load_experiment, run_experiment};

/// Options of `kd run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Experiment file (see examples/).
    #[arg(value_parser = crate::io::parse_path)]
    config: PathBuf,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(a: RunArgs) -> Result<()> {
    let mut exp = load_experiment(&a.config)?;
    exp.set_precision(a.compute.precision);
    run_experiment(&exp, a.quiet, a.compute.device).map(|_| ())
}
