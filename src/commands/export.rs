//! `kd export`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use crate::run::{Checkpoint, Run};

/// What `kd export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The weights under PyTorch's state-dict names (load with safetensors.torch.load_file).
    Safetensors,
    /// The network as an ONNX graph (ONNX Runtime and other deployment runtimes).
    Onnx,
}

/// Options of `kd export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Run folder.
    #[arg(long, value_parser = crate::io::parse_path)]
    run: PathBuf,
    /// Which checkpoint.
    #[arg(long, value_enum, default_value_t)]
    checkpoint: Checkpoint,
    /// Output file: .safetensors (PyTorch weights) or .onnx (the graph); the extension picks
    /// the format unless --format is given.
    #[arg(long, value_parser = crate::io::parse_path)]
    out: PathBuf,
    /// Output format [default: from --out's extension].
    #[arg(long, value_enum)]
    format: Option<Format>,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    let format = match (a.format, ext) {
        (Some(f), _) => f,
        (None, "onnx") => Format::Onnx,
        (None, "safetensors") => Format::Safetensors,
        (None, _) => bail!(
            "--out {} has neither .safetensors nor .onnx: name the file so, or pass --format",
            a.out.display()
        ),
    };
    let run = Run::open(&a.run)?;
    let classes = format!("{} classes: {}", run.classes.len(), run.classes.join(", "));
    match format {
        Format::Safetensors => {
            crate::run::export::safetensors(&run, a.checkpoint, &a.out)?;
            println!(
                "wrote {} ({classes}); in PyTorch: model.load_state_dict(safetensors.torch.load_file(...))",
                a.out.display()
            );
        }
        Format::Onnx => {
            crate::run::onnx::export(&run, a.checkpoint, &a.out)?;
            println!(
                "wrote {} ({classes}); input 'images' [batch, 3, {s}, {s}] normalized, output 'logits'; checked against kd in tract",
                a.out.display(),
                s = run.config.image_size
            );
        }
    }
    Ok(())
}
