//! A run folder: its config, classes and checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;

use crate::data::Transform;
use crate::io::read_json;
use crate::models::{Network, weights};
use crate::train::TrainConfig;

/// File names inside a run folder.
pub mod files {
    /// Effective configuration.
    pub const CONFIG: &str = "config.json";
    /// Class name to index.
    pub const CLASSES: &str = "classes.json";
    /// Checkpoint folder.
    pub const CHECKPOINTS: &str = "checkpoints";
    /// Resume state inside [`CHECKPOINTS`].
    pub const RESUME: &str = "last.kdc";
}

/// An opened run folder.
#[derive(Debug, Clone)]
pub struct Run {
    /// The folder.
    pub dir: PathBuf,
    /// Its effective configuration (normalization filled in).
    pub config: TrainConfig,
    /// Class names in index order.
    pub classes: Vec<String>,
}

/// Class names in index order from a `classes.json` map.
pub fn classes_from_map(map: &BTreeMap<String, usize>) -> Vec<String> {
    let mut v: Vec<(&String, &usize)> = map.iter().collect();
    v.sort_by_key(|(_, i)| **i);
    v.into_iter().map(|(c, _)| c.clone()).collect()
}

/// `classes.json` content for class names.
pub fn classes_map(classes: &[String]) -> BTreeMap<String, usize> {
    classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), i))
        .collect()
}

impl Run {
    /// Opens a finished or running run folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join(files::CONFIG);
        if !config_path.is_file() {
            bail!(
                "{} is not a kd run folder (no {}): pass the --out folder of a kd train or kd distill run",
                dir.display(),
                files::CONFIG
            );
        }
        let config: TrainConfig = read_json(&config_path)?;
        let map: BTreeMap<String, usize> = read_json(&dir.join(files::CLASSES))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            classes: classes_from_map(&map),
        })
    }

    /// Path of a named checkpoint (`best` or `final`).
    pub fn checkpoint_path(&self, name: &str) -> Result<PathBuf> {
        if name != "best" && name != "final" {
            bail!("checkpoint '{name}' is unknown: use best or final");
        }
        let path = self
            .dir
            .join(files::CHECKPOINTS)
            .join(format!("{name}.bpk"));
        if !path.is_file() {
            bail!(
                "checkpoint {} does not exist: the run has not finished an epoch{}",
                path.display(),
                if name == "final" {
                    " or was interrupted (use best, or --resume the run)"
                } else {
                    ""
                }
            );
        }
        Ok(path)
    }

    /// The epoch (1-based) that checkpoint `name` holds, from the run's metrics: the first
    /// epoch of best validation accuracy for `best`, the last epoch for `final`.
    pub fn checkpoint_epoch(&self, name: &str) -> Option<usize> {
        let history: Vec<crate::train::EpochMetrics> =
            crate::io::read_json(&self.dir.join("metrics.json")).ok()?;
        match name {
            "best" => crate::train::metrics::best_epoch(&history).map(|m| m.epoch),
            "final" => history.last().map(|m| m.epoch),
            _ => None,
        }
    }

    /// Builds the network and loads a checkpoint into it, on `device`.
    pub fn load_network(&self, checkpoint: &str, device: &Device) -> Result<Network> {
        let path = self.checkpoint_path(checkpoint)?;
        let mut net =
            self.config
                .model
                .build(self.classes.len(), self.config.image_size, device)?;
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        weights::load_bytes(&mut net, bytes, &path)?;
        Ok(net)
    }

    /// The evaluation transform (resize + normalize) of this run.
    pub fn eval_transform(&self) -> Transform {
        eval_transform(&self.config)
    }
}

/// Resize + normalize with a config's size and statistics.
pub fn eval_transform(config: &TrainConfig) -> Transform {
    Transform {
        augment: None,
        size: (config.image_size, config.image_size),
        mean: config.mean.unwrap_or([0.5; 3]),
        std: config.std.unwrap_or([0.5; 3]),
    }
}
