//! `kd export`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::run::{Checkpoint, Run};

/// Options of `kd export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Run folder.
    #[arg(long, value_parser = crate::io::parse_path)]
    run: PathBuf,
    /// Which checkpoint.
    #[arg(long, value_enum, default_value_t)]
    checkpoint: Checkpoint,
    /// Output .safetensors file (load in PyTorch with safetensors.torch.load_file).
    #[arg(long, value_parser = crate::io::parse_path)]
    out: PathBuf,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let run = Run::open(&a.run)?;
    crate::run::export::safetensors(&run, a.checkpoint, &a.out)?;
    println!(
        "wrote {} ({} classes: {}); in PyTorch: model.load_state_dict(safetensors.torch.load_file(...))",
        a.out.display(),
        run.classes.len(),
        run.classes.join(", ")
    );
    Ok(())
}
