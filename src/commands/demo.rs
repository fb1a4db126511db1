//! `kd demo`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use super::ComputeArgs;
use crate::experiment::{Experiment, run_experiment};
use crate::run::TrainConfig;

/// Options of `kd demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The bundled digits [default: data/mnist5k].
    #[arg(long, value_parser = crate::io::parse_path)]
    data: Option<PathBuf>,
    /// Output folder.
    #[arg(long, default_value = "runs/demo", value_parser = crate::io::parse_path)]
    out: PathBuf,
    /// Seed of split, initialisation and augmentation.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(a: DemoArgs) -> Result<()> {
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
    let mut exp = Experiment::demo(&data, &a.out, a.seed)?;
    let student = &exp.students[0].config;
    println!(
        "kd demo: teacher {}, student {} and distilled student on {} ({}x{} px); output {}",
        exp.teacher.model.name,
        student.model.name,
        data.display(),
        student.image_size,
        student.image_size,
        a.out.display()
    );
    exp.set_precision(a.compute.precision);
    run_experiment(&exp, a.quiet, a.compute.device)?;
    Ok(())
}
