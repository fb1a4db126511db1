//! A run folder: its effective config, classes, metrics, checkpoints, resume state and lock.
//! Training writes it ([`crate::train`]); every other command reads it through [`Run`].

pub mod checkpoint;
pub mod config;
pub mod export;
pub mod files;
pub mod lock;
pub mod metrics;
pub mod onnx;
pub mod patch;
pub mod resume;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;

pub use config::{NanPolicy, TeacherConfig, TrainConfig};
pub use files::Checkpoint;
pub use lock::RunLock;
pub use metrics::EpochMetrics;

use crate::data::Transform;
use crate::io::read_json;
use crate::models::{Network, weights};

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

    /// Path of a checkpoint, which must exist.
    pub fn checkpoint_path(&self, checkpoint: Checkpoint) -> Result<PathBuf> {
        let path = self
            .dir
            .join(files::CHECKPOINTS)
            .join(checkpoint.file_name());
        if !path.is_file() {
            bail!(
                "checkpoint {} does not exist: the run has not finished an epoch{}",
                path.display(),
                if checkpoint == Checkpoint::Final {
                    " or was interrupted (use best, or --resume the run)"
                } else {
                    ""
                }
            );
        }
        Ok(path)
    }

    /// The run's per-epoch metrics.
    pub fn metrics(&self) -> Result<Vec<EpochMetrics>> {
        metrics::read_metrics(&self.dir)
    }

    /// The epoch (1-based) that `checkpoint` holds, from the run's metrics: the first epoch of
    /// best validation accuracy for `best`, the last epoch for `final`.
    pub fn checkpoint_epoch(&self, checkpoint: Checkpoint) -> Option<usize> {
        let history = self.metrics().ok()?;
        match checkpoint {
            Checkpoint::Best => metrics::best_epoch(&history).map(|m| m.epoch),
            Checkpoint::Final => history.last().map(|m| m.epoch),
        }
    }

    /// Builds the network and loads a checkpoint into it, on `device`.
    pub fn load_network(&self, checkpoint: Checkpoint, device: &Device) -> Result<Network> {
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
