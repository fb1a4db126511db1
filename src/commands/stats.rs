//! `kd stats`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::data::{ImageFolder, channel_stats};

/// Options of `kd stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Folder with one sub-folder per class (or with train/ and val/: train/ is used).
    #[arg(value_parser = crate::io::parse_path)]
    dir: PathBuf,
    /// Resize each image to SIZE x SIZE first (what a model sees).
    #[arg(long)]
    size: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: StatsArgs) -> Result<()> {
    let dir = if a.dir.join("train").is_dir() {
        a.dir.join("train")
    } else {
        a.dir.clone()
    };
    if let Some(size) = a.size {
        crate::data::check_image_size(size)?;
    }
    let folder = ImageFolder::scan(&dir)?;
    crate::data::report_skipped(&folder.skipped, None)?;
    let stats = channel_stats(&folder.samples, a.size)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        let [r, g, b] = stats.mean;
        let [sr, sg, sb] = stats.std;
        println!("images {}", stats.images);
        println!("mean   {r:.4}, {g:.4}, {b:.4}");
        println!("std    {sr:.4}, {sg:.4}, {sb:.4}");
        println!("use with: --mean {r:.4},{g:.4},{b:.4} --std {sr:.4},{sg:.4},{sb:.4}");
    }
    Ok(())
}
