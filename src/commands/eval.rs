//! `kd eval`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::ComputeArgs;
use crate::data::Loader;
use crate::eval::{EvalReport, eval_target, evaluate};
use crate::io::{ensure_dir, write_json};
use crate::ops::Ctx;
use crate::run::{Checkpoint, Run};

/// Options of `kd eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run folder.
    #[arg(long, value_parser = crate::io::parse_path)]
    run: PathBuf,
    /// Which checkpoint.
    #[arg(long, value_enum, default_value_t)]
    checkpoint: Checkpoint,
    /// Images to evaluate: DIR/val if it exists, else every image of DIR [default: the run's validation images].
    #[arg(long, value_parser = crate::io::parse_path)]
    data: Option<PathBuf>,
    /// Folder for eval JSON and confusion PNG [default: RUN/eval; files named
    /// eval-CHECKPOINT.json, or eval-CHECKPOINT-on-FOLDER.json with --data].
    #[arg(long, value_parser = crate::io::parse_path)]
    out: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let run = Run::open(&a.run)?;
    let (device, precision) = a.compute.open_for(&run)?;
    let target = eval_target(&run, a.checkpoint, a.data.as_deref(), a.out.as_deref())?;
    let net = run.load_network(a.checkpoint, &device)?;
    let loader = Loader::new(
        target.samples.clone(),
        run.eval_transform(),
        run.config.batch_size.max(32),
        false,
        0,
    );
    let eval = evaluate(&net, &loader, &run.classes, &device, &Ctx::new(precision))?;
    if let Some(dir) = target.json.parent() {
        ensure_dir(dir)?;
    }
    let report = EvalReport {
        run: &run.dir,
        checkpoint: a.checkpoint,
        epoch: run.checkpoint_epoch(a.checkpoint),
        data: &target.data,
        validation_split: target.validation_split,
        evaluation: &eval,
    };
    write_json(&target.json, &report)?;
    // Beyond a few hundred classes a picture of the matrix is too large to read (and to
    // hold in memory): the JSON has it.
    let picture = eval.classes.len() <= crate::report::CONFUSION_PNG_MAX_CLASSES;
    if picture {
        crate::report::confusion_png(&eval, &target.png)?;
    } else {
        eprintln!(
            "note: {} classes: the confusion matrix is written to the JSON only (a picture is drawn up to {} classes)",
            eval.classes.len(),
            crate::report::CONFUSION_PNG_MAX_CLASSES
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let epoch = report
            .epoch
            .map(|e| format!(" (epoch {e})"))
            .unwrap_or_default();
        println!(
            "run {}, checkpoint {}{epoch}, the {}images of {}\n",
            run.dir.display(),
            a.checkpoint,
            if target.validation_split {
                "validation "
            } else {
                ""
            },
            target.data.display()
        );
        print!("{}", eval.to_text());
        if picture {
            println!(
                "\nwrote {} and {}",
                target.json.display(),
                target.png.display()
            );
        } else {
            println!("\nwrote {}", target.json.display());
        }
    }
    Ok(())
}
