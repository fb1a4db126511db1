//! The full effective configuration of a run (`config.json`): enough to repeat it. Its
//! defaults are the tutorial's recipe and are written once, in [`TrainConfig::default`];
//! command-line flags and the tables of a `kd run` file are patches over it
//! ([`super::patch`]).

use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::files::Checkpoint;
use crate::data::{AugmentConfig, CacheMode, RunData};
use crate::losses::{Method, deserialize_method};
use crate::models::ModelSpec;
use crate::ops::Precision;

/// What to do when a batch's loss is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NanPolicy {
    /// Stop training with an error; the last good checkpoint stays.
    #[default]
    Stop,
    /// Skip the batch (no update) and carry on; an epoch with every batch skipped stops.
    SkipBatch,
}

/// Teacher of a distillation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// Run folder of the trained teacher.
    pub run: PathBuf,
    /// Which of its checkpoints teaches.
    #[serde(default)]
    pub checkpoint: Checkpoint,
    /// The distillation method and its settings.
    #[serde(default, deserialize_with = "deserialize_method")]
    pub kd: Method,
    /// Compute the teacher's outputs once per training image and reuse them every epoch
    /// (only without random augmentation).
    #[serde(default)]
    pub cache_logits: bool,
    /// Weight of timm's feature term added to a logit method (0: none).
    #[serde(default)]
    pub feature_weight: f64,
    /// The CRC-32 of the teacher's checkpoint file this run learns from: filled in when the
    /// run starts, checked when it resumes (a teacher retrained in place is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_crc32: Option<u32>,
}

impl TeacherConfig {
    /// The distillation objective: the method, with the feature term if weighted.
    pub fn distiller(&self) -> Box<dyn crate::losses::Distiller> {
        self.kd.build(self.feature_weight)
    }
}

/// Configuration of `kd train` / `kd distill`. Defaults are the tutorial's recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Folder with `train/` and `val/`, or a class folder to split in memory.
    pub data: PathBuf,
    /// Architecture.
    pub model: ModelSpec,
    /// Square input side in pixels.
    pub image_size: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Number of epochs.
    pub epochs: usize,
    /// Adam learning rate (base of the cosine schedule).
    pub lr: f64,
    /// Adam epsilon (PyTorch's default 1e-8; Burn's own default is 1e-5).
    pub adam_epsilon: f64,
    /// Cosine schedule half period, in epochs.
    pub t_max: usize,
    /// Cosine schedule minimum rate.
    pub eta_min: f64,
    /// Seed of initialisation, shuffling and augmentation, and of the data (the in-memory
    /// split and the `train_limit`/`val_limit` subsets) unless `split_seed` is set.
    pub seed: u64,
    /// Seed of the data when it differs from `seed` (runs that must share one validation
    /// set, such as a teacher and its students, with different initialisations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_seed: Option<u64>,
    /// Validation share for an in-memory split.
    pub val_fraction: f64,
    /// Training augmentation.
    pub augment: AugmentConfig,
    /// Normalization mean; computed on the training images when absent.
    pub mean: Option<[f32; 3]>,
    /// Normalization std; computed on the training images when absent.
    pub std: Option<[f32; 3]>,
    /// Use at most this many training images (class-balanced subset).
    pub train_limit: Option<usize>,
    /// Use at most this many validation images (class-balanced subset).
    pub val_limit: Option<usize>,
    /// PyTorch state dict to start from.
    pub init_from: Option<PathBuf>,
    /// NaN/Inf loss handling.
    pub nan_policy: NanPolicy,
    /// Teacher, for distillation runs.
    pub teacher: Option<TeacherConfig>,
    /// Fail on non-image files in the class folders instead of skipping them.
    pub strict: bool,
    /// Precision of convolutions and linear layers (f32, or bf16/f16 autocast).
    pub precision: Precision,
    /// Keep decoded (or decoded and resized) training images in memory after the first epoch.
    pub cache_images: CacheMode,
    /// Memory budget in MiB of each image cache (training, validation).
    pub cache_mib: usize,
}

impl Default for TrainConfig {
    /// The tutorial's recipe, without data or model.
    fn default() -> Self {
        Self {
            data: PathBuf::new(),
            model: ModelSpec::default(),
            image_size: 224,
            batch_size: 16,
            epochs: 50,
            lr: 1e-4,
            adam_epsilon: 1e-8,
            t_max: 20,
            eta_min: 1e-9,
            seed: 42,
            split_seed: None,
            val_fraction: 0.3,
            augment: AugmentConfig::default(),
            mean: None,
            std: None,
            train_limit: None,
            val_limit: None,
            init_from: None,
            nan_policy: NanPolicy::Stop,
            teacher: None,
            strict: false,
            precision: Precision::F32,
            cache_images: CacheMode::Off,
            cache_mib: 4096,
        }
    }
}

impl TrainConfig {
    /// The tutorial's recipe for `model` on `data`.
    pub fn recipe(data: PathBuf, model: ModelSpec) -> Self {
        Self {
            data,
            model,
            ..Self::default()
        }
    }

    /// Checks every value before any heavy work.
    pub fn validate(&self) -> Result<()> {
        if self.data.as_os_str().is_empty() {
            bail!("--data is required: pass the image folder to train on");
        }
        if self.batch_size == 0 {
            bail!("--batch-size 0 is invalid: use at least 1 (the recipe uses 16)");
        }
        if self.epochs == 0 {
            bail!("--epochs 0 is invalid: use at least 1");
        }
        if self.t_max == 0 {
            bail!("--t-max 0 is invalid: use at least 1 epoch (the recipe uses 20)");
        }
        for (flag, limit) in [
            ("--train-limit", self.train_limit),
            ("--val-limit", self.val_limit),
        ] {
            if limit == Some(0) {
                bail!("{flag} 0 is invalid: use at least 1 image, or leave it out to use them all");
            }
        }
        if !(self.adam_epsilon > 0.0 && self.adam_epsilon.is_finite()) {
            bail!(
                "--adam-epsilon {} is invalid: use a small positive number such as 1e-8",
                self.adam_epsilon
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!(
                "--lr {} is invalid: use a positive number such as 1e-4",
                self.lr
            );
        }
        if !(self.eta_min >= 0.0 && self.eta_min.is_finite()) {
            bail!(
                "eta_min {} is invalid: use a non-negative number such as 1e-9",
                self.eta_min
            );
        }
        crate::data::split::check_val_fraction(self.val_fraction)?;
        self.augment.validate()?;
        self.model.validate(self.image_size)?;
        for (name, v) in [("std", self.std), ("mean", self.mean)] {
            if let Some(v) = v
                && (v.iter().any(|x| !x.is_finite())
                    || (name == "std" && v.iter().any(|&x| x <= 0.0)))
            {
                let what = if name == "std" {
                    "finite positive values"
                } else {
                    "finite values"
                };
                bail!("{name} {v:?} is invalid: use {what}");
            }
        }
        if let Some(t) = &self.teacher {
            t.kd.validate()?;
            crate::losses::feature::WithFeatures::check(t.feature_weight)?;
            if t.feature_weight > 0.0 && t.kd.name() == "feature" {
                bail!(
                    "feature_weight adds the feature term to a logit method; method feature has it already (set its distill_weight)"
                );
            }
            if t.cache_logits && self.augment.is_random() {
                bail!(
                    "--cache-teacher needs a training pipeline without random augmentation (each epoch would \
                     show the teacher other images): pass --no-augment or drop --cache-teacher"
                );
            }
        }
        Ok(())
    }

    /// Seed of the in-memory split and the data subsets: `split_seed`, else `seed`.
    pub fn data_seed(&self) -> u64 {
        self.split_seed.unwrap_or(self.seed)
    }

    /// The images this run trains and validates on: `data/train` and `data/val`, or an
    /// in-memory split, then the `train_limit` / `val_limit` subsets.
    pub fn images(&self) -> Result<RunData> {
        RunData::resolve(&self.data, self.val_fraction, self.data_seed())
            .map(|data| data.limited(self.train_limit, self.val_limit, self.data_seed()))
    }

    /// Keys (as JSON paths) whose values differ between two configs, leaving out settings
    /// that cannot change results: the cache budget, `decoded` vs no cache (same pixels),
    /// a `split_seed` equal to `seed`, and kd's record of the teacher checkpoint's CRC.
    pub fn differing_keys(&self, other: &Self) -> Vec<String> {
        let comparable = |c: &Self| {
            let mut c = c.clone();
            c.cache_mib = Self::default().cache_mib;
            if c.split_seed == Some(c.seed) {
                c.split_seed = None;
            }
            if c.cache_images == CacheMode::Decoded {
                c.cache_images = CacheMode::Off;
            }
            // kd's record of the teacher's checkpoint, not a setting (checked on resume).
            if let Some(t) = &mut c.teacher {
                t.checkpoint_crc32 = None;
            }
            serde_json::to_value(c).unwrap_or_default()
        };
        let (a, b) = (comparable(self), comparable(other));
        let mut out = Vec::new();
        diff_values("", &a, &b, &mut out);
        out
    }
}

fn diff_values(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                let null = serde_json::Value::Null;
                diff_values(
                    &path,
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{prefix}: {a} vs {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `config.json` written by kd before methods had their own settings still reads, and
    /// compares equal to the same settings written now (so such runs resume).
    #[test]
    fn configs_of_older_runs_read_and_compare_equal() {
        let old = r#"{"data": "d", "model": {"name": "resnet18", "width": 2, "stem": "small"},
            "image_size": 16, "batch_size": 4, "epochs": 2, "lr": 0.001, "t_max": 20,
            "eta_min": 1e-9, "seed": 42, "val_fraction": 0.25,
            "augment": {"rotation_degrees": 0.0, "blur_kernel": 0, "blur_sigma": [0.1, 3.0],
                "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
                "hflip": false, "random_resized_crop": false, "crop_scale": [0.08, 1.0]},
            "mean": null, "std": null, "train_limit": null, "val_limit": null,
            "init_from": null, "nan_policy": "stop",
            "teacher": {"run": "t", "checkpoint": "best",
                "kd": {"temperature": 7.0, "alpha": 0.7, "loss": "seed"},
                "cache_logits": false}}"#;
        let config: TrainConfig = serde_json::from_str(old).unwrap();
        let teacher = config.teacher.as_ref().unwrap();
        assert_eq!(teacher.kd.name(), "tutorial");
        assert_eq!(config.adam_epsilon, 1e-8, "a key older kds did not write");
        let written: TrainConfig =
            serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert!(config.differing_keys(&written).is_empty());
        assert_eq!(written, config);
    }
}
