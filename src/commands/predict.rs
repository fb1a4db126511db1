//! `kd predict`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::ComputeArgs;
use crate::data::Loader;
use crate::eval::{Images, predict};
use crate::infer::Inference;
use crate::run::{Checkpoint, Run, files};

/// Options of `kd predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Run folder.
    #[arg(long, value_parser = crate::io::parse_path)]
    run: PathBuf,
    /// Image files or folders.
    #[arg(required = true, value_parser = crate::io::parse_path)]
    paths: Vec<PathBuf>,
    /// Which checkpoint.
    #[arg(long, value_enum, default_value_t)]
    checkpoint: Checkpoint,
    /// Number of classes to show per image.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Images per batch (decoded in parallel ahead of the model; memory stays bounded by
    /// the batch, whatever the number of images).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// No throughput line at the end.
    #[arg(long)]
    quiet: bool,
    /// Also write each image's top class to this CSV file: file,class,probability (file
    /// relative to the folder given, or the file's name).
    #[arg(long, value_parser = crate::io::parse_path)]
    csv: Option<PathBuf>,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(a: PredictArgs) -> Result<()> {
    if a.top_k == 0 {
        bail!("--top-k 0 is invalid: show at least 1 class per image");
    }
    if a.batch_size == 0 {
        bail!("--batch-size 0 is invalid: use at least 1");
    }
    let started = std::time::Instant::now();
    let run = Run::open(&a.run)?;
    let images = Images::collect(&a.paths, a.csv.is_some())?;
    if let Some(csv) = &a.csv {
        // What it reads: the images, the folders given, the run's own files.
        let mut inputs = a.paths.clone();
        inputs.extend([files::CONFIG, files::CLASSES].map(|f| run.dir.join(f)));
        inputs.push(
            run.dir
                .join(files::CHECKPOINTS)
                .join(a.checkpoint.file_name()),
        );
        images.check_csv_path(csv, &inputs)?;
        // Nor any file the run already holds (checkpoints, resume state, metrics, reports).
        if csv.is_file() && crate::io::resolved(csv).starts_with(crate::io::resolved(&run.dir)) {
            bail!(
                "--csv {} is a file of the run {}: give a file outside it or a new name",
                csv.display(),
                run.dir.display()
            );
        }
    }
    let (device, precision) = a.compute.open_for(&run)?;
    let net = run.load_network(a.checkpoint, &device)?;
    let loader = Loader::new(
        images.samples.clone(),
        run.eval_transform(),
        a.batch_size,
        false,
        0,
    );
    let mut model = Inference::new(net, run.config.image_size, &device, precision);
    let preds = predict(&mut model, &loader, &run.classes, a.top_k, &device)?;
    if let Some(csv) = &a.csv {
        images.write_csv(&preds, csv)?;
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
    if !a.quiet {
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "predicted {} images in {seconds:.2} s: {:.1} images/s (decoding, resizing and loading the model included), batch {}, {}",
            preds.len(),
            preds.len() as f64 / seconds.max(1e-9),
            a.batch_size,
            if model.uses_plan() {
                "kd's inference plan"
            } else {
                "the network's forward"
            }
        );
    }
    Ok(())
}
