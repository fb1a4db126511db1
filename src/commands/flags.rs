//! The flags of `kd train` and `kd distill`: a patch over the run's config, flat keys named
//! like the config's (see [`crate::run::patch`]), so that a flag left out keeps the recipe's
//! value (or, with `--resume`, the run's).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use serde_json::{Map, Value};

use super::ComputeArgs;
use crate::data::{AugmentConfig, CacheMode};
use crate::losses::Method;
use crate::models::Stem;
use crate::run::patch;
use crate::run::{Checkpoint, NanPolicy, Run, TrainConfig, files};

/// Options shared by `train` and `distill`. Unset options keep the tutorial's recipe (listed
/// after the options by `--help`) or, with --resume, the run's recorded value.
#[derive(Debug, Args, Serialize)]
pub struct TrainFlags {
    /// Folder with train/ and val/, or a class folder to split in memory.
    #[arg(long, value_parser = crate::io::parse_path)]
    data: Option<PathBuf>,
    /// Architecture (see `kd models`).
    #[arg(long, visible_alias = "student")]
    model: Option<String>,
    /// Run folder to write.
    #[arg(long, value_parser = crate::io::parse_path)]
    #[serde(skip)]
    pub out: PathBuf,
    /// Epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Adam learning rate.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    lr: Option<f64>,
    /// Adam epsilon (PyTorch's default).
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    adam_epsilon: Option<f64>,
    /// Cosine schedule T_max in epochs.
    #[arg(long)]
    t_max: Option<usize>,
    /// Cosine schedule minimum rate.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    eta_min: Option<f64>,
    /// Square input size in pixels.
    #[arg(long)]
    image_size: Option<usize>,
    /// Seed of initialisation, shuffling and augmentation, and of the split and subsets
    /// unless --split-seed is given.
    #[arg(long)]
    seed: Option<u64>,
    /// Seed of the in-memory split and the --train-limit/--val-limit subsets, to vary
    /// --seed while keeping the data (a teacher's split, say) [default: --seed].
    #[arg(long)]
    split_seed: Option<u64>,
    /// Validation share when DATA has no train/ and val/.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    val_fraction: Option<f64>,
    /// Base width of the model (first stage; tiny models for tests).
    #[arg(long)]
    width: Option<usize>,
    /// ResNet stem: imagenet (7x7/2 + max pool, images from 32) or small (3x3/1, from 8)
    /// [default: imagenet].
    #[arg(long, value_enum)]
    stem: Option<Stem>,
    /// Normalization mean "r,g,b" [default: computed on the training images].
    #[arg(long, value_parser = parse_triple)]
    mean: Option<[f32; 3]>,
    /// Normalization std "r,g,b" [default: computed on the training images].
    #[arg(long, value_parser = parse_triple)]
    std: Option<[f32; 3]>,
    /// Turn all random augmentation off.
    #[arg(long)]
    #[serde(skip)]
    no_augment: bool,
    #[command(flatten)]
    augment: AugmentFlags,
    /// Train on a class-balanced subset of at most N images.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Validate on a class-balanced subset of at most N images.
    #[arg(long)]
    val_limit: Option<usize>,
    /// Start from a PyTorch state dict (.safetensors or .pth; torchvision or reference CoAtNet names).
    #[arg(long, value_parser = crate::io::parse_path)]
    init_from: Option<PathBuf>,
    /// On a NaN/Inf loss: stop (keep the last good checkpoint) or skip the batch (an epoch
    /// with every batch skipped still stops).
    #[arg(long, value_enum)]
    nan_policy: Option<NanPolicy>,
    /// Fail on non-image files in the class folders (default: skip them with a warning);
    /// =false turns a recorded one off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    strict: Option<bool>,
    /// Keep images in memory after the first epoch: decoded (exact) or resized (augment
    /// after resize).
    #[arg(long, value_enum)]
    cache_images: Option<CacheMode>,
    /// Memory budget of each image cache in MiB.
    #[arg(long)]
    cache_mib: Option<usize>,
    /// Continue the run in --out from its last completed epoch.
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
    /// No progress output.
    #[arg(long)]
    #[serde(skip)]
    pub quiet: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub compute: ComputeArgs,
}

/// The augmentation flags: the config's `augment` table.
#[derive(Debug, Args, Serialize)]
struct AugmentFlags {
    /// RandomRotation degrees.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f32>)]
    #[serde(rename = "rotation_degrees")]
    rotation: Option<f32>,
    /// GaussianBlur kernel size, odd, 0 = off.
    #[arg(long)]
    blur_kernel: Option<usize>,
    /// GaussianBlur sigma range "min,max", drawn per image.
    #[arg(long, value_parser = parse_pair)]
    blur_sigma: Option<[f32; 2]>,
    /// ColorJitter brightness.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f32>)]
    brightness: Option<f32>,
    /// ColorJitter contrast.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f32>)]
    contrast: Option<f32>,
    /// ColorJitter saturation.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f32>)]
    saturation: Option<f32>,
    /// ColorJitter hue.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f32>)]
    hue: Option<f32>,
    /// RandomHorizontalFlip (p = 0.5); =false turns it off (a recorded one, on --resume).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    hflip: Option<bool>,
    /// RandomResizedCrop instead of Resize; =false turns it off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    random_resized_crop: Option<bool>,
    /// RandomResizedCrop area scale range "min,max".
    #[arg(long, value_parser = parse_pair)]
    crop_scale: Option<[f32; 2]>,
}

/// The distillation flags of `kd distill`, besides the training ones.
#[derive(Debug, Args, Serialize)]
pub struct DistillFlags {
    /// Run folder of the trained teacher (required, but with --resume, which keeps the
    /// run's).
    #[arg(long, value_parser = crate::io::parse_path)]
    #[serde(skip_serializing_if = "Option::is_none")]
    teacher: Option<PathBuf>,
    /// Teacher checkpoint.
    #[arg(long, value_enum)]
    teacher_checkpoint: Option<Checkpoint>,
    /// Distillation method: hinton (alias kd), tutorial (the tutorial's exact formula; alias
    /// seed), dkd, dist, nkd, logit_std or feature. Each takes its own settings below (the
    /// defaults after the options); another method's setting is refused.
    #[arg(long, visible_alias = "kd-loss")]
    method: Option<String>,
    /// Softmax temperature T (every method but feature; DIST's tau, NKD's temp).
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    temperature: Option<f64>,
    /// hinton, tutorial: weight of the soft-target term; dkd: weight of TCKD.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    alpha: Option<f64>,
    /// dkd: weight of NCKD; dist: weight of the inter-class relation.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    beta: Option<f64>,
    /// dist: weight of the intra-class relation; nkd: weight of the non-target term.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    gamma: Option<f64>,
    /// dkd, dist, nkd, logit_std: weight of the cross-entropy.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    ce_weight: Option<f64>,
    /// dist, logit_std: weight of the distillation term.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    kd_weight: Option<f64>,
    /// dkd: epochs over which the KD terms grow to full weight.
    #[arg(long)]
    warmup: Option<usize>,
    /// hinton, dkd: standardize the logits first (logit standardization); =false turns it
    /// off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    standardize: Option<bool>,
    /// feature: weight of the task's cross-entropy (timm's task_loss_weight).
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    task_weight: Option<f64>,
    /// feature: weight of the feature term (timm's distill_loss_weight).
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    distill_weight: Option<f64>,
    /// Any logit method: add timm's feature term (projected student features against the
    /// teacher's, mean squared error) with this weight.
    #[arg(long, allow_negative_numbers = true, value_parser = finite::<f64>)]
    feature_weight: Option<f64>,
    /// Compute the teacher's outputs once and reuse them each epoch (needs --no-augment);
    /// =false turns it off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    cache_teacher: Option<bool>,
}

/// A number that is finite: the config records values as JSON, which has no NaN or infinity.
fn finite<T: std::str::FromStr<Err = std::num::ParseFloatError> + Into<f64> + Copy>(
    s: &str,
) -> Result<T, String> {
    let v: T = s.trim().parse().map_err(|e| format!("{e}"))?;
    if v.into().is_finite() {
        Ok(v)
    } else {
        Err("not a finite number".into())
    }
}

fn parse_triple(s: &str) -> Result<[f32; 3], String> {
    parse_floats(s, "three comma-separated numbers, e.g. 0.44,0.47,0.43")
}

fn parse_pair(s: &str) -> Result<[f32; 2], String> {
    parse_floats(s, "two comma-separated numbers, min,max, e.g. 0.1,3")
}

fn parse_floats<const N: usize>(s: &str, expected: &str) -> Result<[f32; N], String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| finite::<f32>(x).map_err(|e| format!("'{x}': {e}")))
        .collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("expected {expected}"))
}

/// The flags given, as a flat table (absent ones left out).
fn flat<T: Serialize>(flags: &T) -> Result<Map<String, Value>> {
    let Value::Object(mut map) = serde_json::to_value(flags)? else {
        unreachable!("flags serialise to a table")
    };
    prune_nulls(&mut map);
    Ok(map)
}

fn prune_nulls(map: &mut Map<String, Value>) {
    map.retain(|_, v| !v.is_null());
    for v in map.values_mut() {
        if let Value::Object(inner) = v {
            prune_nulls(inner);
        }
    }
}

impl TrainFlags {
    /// The run's config: the recipe (or, with --resume, the recorded config) with the given
    /// flags, and those of `distill`, applied.
    pub fn config(&self, distill: Option<&DistillFlags>) -> Result<TrainConfig> {
        let recorded = self.resume && self.out.join(files::CONFIG).is_file();
        let base = if recorded {
            Run::open(&self.out)?.config
        } else {
            TrainConfig::default()
        };
        if let Some(d) = distill
            && d.teacher.is_none()
            && base.teacher.is_none()
        {
            anyhow::bail!(
                "kd distill needs --teacher RUN, the folder of the trained teacher (kd train --out RUN)"
            );
        }
        let mut table = flat(self)?;
        if let Some(d) = distill {
            table.extend(flat(d)?);
        }
        let mut nested = patch::nest(&table);
        if self.no_augment {
            // No augmentation, then the augmentation flags given on top.
            let mut augment = serde_json::to_value(AugmentConfig::none())?;
            if let Some(given) = nested.get("augment") {
                patch::merge(&mut augment, given);
            }
            nested["augment"] = augment;
        }
        patch::apply(&base, &nested)
    }
}

/// The recipe's values and the distillation defaults, for `--help`: what the flags left out
/// are.
pub fn recipe_help() -> String {
    let Ok(Value::Object(recipe)) = serde_json::to_value(TrainConfig::default()) else {
        unreachable!("a config serialises to a table")
    };
    let mut text = String::from(
        "Defaults, the tutorial's recipe (the same keys go in a kd run file's tables):\n",
    );
    for (key, value) in recipe {
        match value {
            Value::Null => {}
            Value::Object(table) if key == "augment" => {
                for (k, v) in table {
                    text += &format!("  augment.{k} = {}\n", short(&v));
                }
            }
            Value::Object(_) => {}
            v => text += &format!("  {key} = {}\n", short(&v)),
        }
    }
    text += &format!(
        "Distillation (kd distill, [distill]): teacher_checkpoint = \"{}\"\n",
        Checkpoint::default()
    );
    for (name, aliases) in crate::losses::METHODS {
        let Some(Value::Object(settings)) =
            Method::defaults(name).and_then(|m| serde_json::to_value(m).ok())
        else {
            continue;
        };
        let settings: Vec<String> = settings
            .iter()
            .filter(|(k, _)| *k != "method")
            .map(|(k, v)| format!("{k} = {}", short(v)))
            .collect();
        let also = if aliases.is_empty() {
            String::new()
        } else {
            format!(" (also {})", aliases.join(", "))
        };
        let default = if *name == Method::default().name() {
            ", the default"
        } else {
            ""
        };
        text += &format!(
            "  method = \"{name}\"{also}{default}: {}\n",
            settings.join(", ")
        );
    }
    text
}

/// A value as written in a file: a number stored from an `f32` (0.1 recorded as
/// 0.10000000149011612) in its shortest form.
fn short(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            if f64::from(f as f32) == f {
                format!("{:?}", f as f32)
            } else {
                format!("{f:?}")
            }
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(short).collect();
            format!("[{}]", items.join(", "))
        }
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        train: TrainFlags,
        #[command(flatten)]
        distill: DistillFlags,
    }

    fn config(args: &[&str]) -> TrainConfig {
        let argv = ["kd", "--out", "x", "--teacher", "t"].iter().chain(args);
        let flags = Flags::try_parse_from(argv).unwrap();
        flags.train.config(Some(&flags.distill)).unwrap()
    }

    #[test]
    fn switches_turn_on_alone_and_off_with_false() {
        assert!(config(&["--hflip"]).augment.hflip);
        let kd = |c: TrainConfig| serde_json::to_value(c.teacher.unwrap().kd).unwrap();
        assert_eq!(kd(config(&["--standardize"]))["standardize"], true);
        // Over a base that has them on (a recorded run on --resume), =false turns them off.
        let on = config(&["--hflip", "--cache-teacher"]);
        let patch = patch::nest(
            &flat(
                &Flags::try_parse_from(["kd", "--out", "x", "--hflip=false"])
                    .unwrap()
                    .train,
            )
            .unwrap(),
        );
        assert!(!patch::apply(&on, &patch).unwrap().augment.hflip);
        assert!(on.teacher.unwrap().cache_logits);
        // The recipe's values print as written, not as their f32 expansion.
        let help = recipe_help();
        assert!(help.contains("augment.brightness = 0.5"), "{help}");
        assert!(!help.contains("0.10000000"), "{help}");
    }
}
