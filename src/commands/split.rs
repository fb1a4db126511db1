//! `kd split`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::data::{ImageFolder, LinkMode, Sample, stratified_split, write_split};
use crate::run::TrainConfig;

/// Options of `kd split`.
#[derive(Debug, Args)]
pub struct SplitArgs {
    /// Folder with one sub-folder per class.
    #[arg(value_parser = crate::io::parse_path)]
    src: PathBuf,
    /// Output folder (gets train/ and val/).
    #[arg(value_parser = crate::io::parse_path)]
    dst: PathBuf,
    /// Share of each class that goes to val/.
    #[arg(long, default_value_t = TrainConfig::default().val_fraction)]
    val_fraction: f64,
    /// Seed of the split.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Hard-link images instead of copying them.
    #[arg(long)]
    link: bool,
    /// Replace a non-empty DST.
    #[arg(long)]
    force: bool,
    /// Fail on non-image files (default: skip them with a warning).
    #[arg(long)]
    strict: bool,
    /// Keep classes of one image (too few to split) in train/ only, their val/ folder empty;
    /// without it such a class is refused.
    #[arg(long)]
    keep_tiny_classes: bool,
}

pub fn run(a: SplitArgs) -> Result<()> {
    crate::data::split::check_val_fraction(a.val_fraction)?;
    let folder = ImageFolder::scan(&a.src)?;
    crate::data::report_skipped(&folder.skipped, Some(a.strict))?;
    crate::data::split::check_class_sizes(&folder, a.keep_tiny_classes)?;
    let split = stratified_split(&folder, a.val_fraction, a.seed)?;
    let mode = if a.link {
        LinkMode::HardLink
    } else {
        LinkMode::Copy
    };
    write_split(&folder, &split, &a.dst, mode, a.force)?;
    let count = |s: &[Sample], l: usize| s.iter().filter(|x| x.label == l).count();
    let w = folder
        .classes
        .iter()
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<w$}  {:>6}  {:>6}  {:>6}",
        "class", "train", "val", "total"
    );
    for (l, c) in folder.classes.iter().enumerate() {
        let (t, v) = (count(&split.train, l), count(&split.val, l));
        println!("{c:<w$}  {t:>6}  {v:>6}  {:>6}", t + v);
    }
    println!(
        "{:<w$}  {:>6}  {:>6}  {:>6}",
        "all",
        split.train.len(),
        split.val.len(),
        split.train.len() + split.val.len()
    );
    println!("wrote {}", a.dst.display());
    Ok(())
}
