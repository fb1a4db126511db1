//! `kd compare`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::ComputeArgs;
use crate::report::{SpeedOptions, compare, results_table};

/// Options of `kd compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Run folders.
    #[arg(required = true, value_parser = crate::io::parse_path)]
    runs: Vec<PathBuf>,
    /// Folder for accuracy.png, loss.png, train_loss.png, loss_parts.png, results.md and
    /// results.json.
    #[arg(long, value_parser = crate::io::parse_path)]
    out: PathBuf,
    /// Device and precision of the inference-speed column [default: cpu, each run's precision].
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(a: CompareArgs) -> Result<()> {
    let speed = SpeedOptions {
        device: a.compute.device,
        precision: a.compute.precision,
    };
    let comparison = compare(&a.runs, &a.out, speed)?;
    print!("{}", results_table(&comparison));
    let parts = if a.out.join("loss_parts.png").is_file() {
        ", loss_parts.png"
    } else {
        ""
    };
    println!(
        "wrote {} (results.md, results.json, accuracy.png, loss.png, train_loss.png{parts})",
        a.out.display()
    );
    Ok(())
}
