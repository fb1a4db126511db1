//! Losses: cross-entropy, and the distillation methods.
//!
//! A method is one file: its settings (a serde struct with the reference's defaults, whose
//! fields are its config keys and flags) implementing [`Distiller`], and one line of the
//! registry below, which makes it a variant of [`Method`], the tagged settings a run records
//! (`"method": "hinton"`). A distiller sees the student's and the teacher's outputs (logits
//! and pooled features), the targets and the epoch, and returns its loss with named parts,
//! which the training log, `metrics.json` and the loss chart show.

mod cross_entropy;
pub mod logits;

use anyhow::{Result, bail};
use burn::nn::Linear;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use cross_entropy::cross_entropy;

use crate::models::Outputs;

/// What a distillation method sees at one training step.
pub struct Step<'a> {
    /// The student's outputs, in the autodiff graph.
    pub student: &'a Outputs,
    /// The teacher's outputs, constants (inference mode, no graph).
    pub teacher: &'a Outputs,
    /// The true classes `[batch]`.
    pub targets: &'a Tensor<1, Int>,
    /// The epoch, counted from 1 (for warm-ups).
    pub epoch: usize,
    /// The learned projection of the student's pooled features onto the teacher's size, for a
    /// method that reads features when the sizes differ (trained with the student).
    pub projection: Option<&'a Linear>,
}

/// A method's loss at one step.
pub struct Loss {
    /// What is minimised.
    pub total: Tensor<1>,
    /// Its parts, in the order of [`Distiller::parts`].
    pub parts: Vec<Tensor<1>>,
}

/// A distillation objective.
pub trait Distiller: Send + Sync {
    /// Names of the parts [`Distiller::loss`] returns, in order (`kd`, `ce`, ...): the
    /// weighted terms of the loss, which sum to it.
    fn parts(&self) -> Vec<&'static str>;

    /// Named factors the method applies in epoch `epoch` (counted from 1), such as DKD's
    /// warm-up: logged beside the parts, not summed into the loss.
    fn factors(&self, _epoch: usize) -> Vec<(&'static str, f64)> {
        Vec::new()
    }

    /// Whether it reads pooled features (then the teacher's are kept, and cached with its
    /// logits, and a projection is learnt when the sizes differ).
    fn needs_features(&self) -> bool {
        false
    }

    /// The loss of one step.
    fn loss(&self, step: &Step) -> Loss;
}

/// Declares the methods: `module::Settings => "name"` (and `| "alias"`s), `Settings` being
/// the method's serde settings implementing [`Distiller`] and a `validate` method.
macro_rules! registry {
    ($($module:ident :: $ty:ident => $name:literal $(| $alias:literal)*),* $(,)?) => {
        $(pub mod $module;)*

        /// A distillation method and its settings, as a run records them.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "method")]
        pub enum Method {
            $(
                #[doc = concat!("`", $name, "`")]
                #[serde(rename = $name $(, alias = $alias)*)]
                $ty($module::$ty),
            )*
        }

        /// Every method's name and the other names it takes.
        pub const METHODS: &[(&str, &[&str])] = &[$(($name, &[$($alias),*])),*];

        impl Method {
            /// The method's name.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Self::$ty(_) => $name,)*
                }
            }

            /// Checks the settings.
            pub fn validate(&self) -> Result<()> {
                match self {
                    $(Self::$ty(m) => m.validate(),)*
                }
            }

            /// The objective these settings describe, with timm's feature term added at
            /// `feature_weight` (0: none).
            pub fn build(&self, feature_weight: f64) -> Box<dyn Distiller> {
                let method: Box<dyn Distiller> = match self {
                    $(Self::$ty(m) => Box::new(m.clone()),)*
                };
                if feature_weight > 0.0 {
                    Box::new(feature::WithFeatures { inner: method, weight: feature_weight })
                } else {
                    method
                }
            }

            /// The method `name` (or alias) with its default settings.
            pub fn defaults(name: &str) -> Option<Self> {
                $(
                    if name == $name $(|| name == $alias)* {
                        return Some(Self::$ty(Default::default()));
                    }
                )*
                None
            }
        }
    };
}

registry! {
    hinton::Hinton => "hinton" | "kd",
    tutorial::Tutorial => "tutorial" | "seed",
    dkd::Dkd => "dkd",
    dist::Dist => "dist",
    nkd::Nkd => "nkd",
    logit_std::LogitStd => "logit_std",
    feature::Feature => "feature",
}

/// Refuses a temperature that is not a positive number.
fn check_temperature(temperature: f64) -> Result<()> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("--temperature {temperature} is invalid: use a positive number such as 4");
    }
    Ok(())
}

/// Refuses a loss weight that is negative or not finite, naming it.
fn check_weights(weights: &[(&str, f64)]) -> Result<()> {
    for &(name, w) in weights {
        if !(w >= 0.0 && w.is_finite()) {
            bail!("{name} {w} is invalid: use 0 or a positive number");
        }
    }
    Ok(())
}

impl Default for Method {
    /// Hinton's loss with the tutorial's T = 7, alpha = 0.7.
    fn default() -> Self {
        Self::Hinton(Default::default())
    }
}

/// The key that names the method in a settings table (`loss` in kd before 0.2 and in
/// `[distill]` tables written for it).
const TAG: &str = "method";
const OLD_TAG: &str = "loss";

impl Method {
    /// The keys these settings take besides `method`.
    pub fn keys(&self) -> Vec<String> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| k != TAG)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Every key some method takes (besides `method`).
    pub fn all_keys() -> Vec<String> {
        let mut keys: Vec<String> = METHODS
            .iter()
            .filter_map(|(name, _)| Method::defaults(name))
            .flat_map(|m| m.keys())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Settings from a (possibly partial) table: the method named by `method` (or the
    /// older `loss`; Hinton's when absent) with its defaults for the keys not given. A key
    /// of another method is refused, naming the keys this one takes, and so is a key
    /// without a value (TOML's `nan` or `inf`, which JSON cannot hold).
    pub fn from_table(table: &Value) -> Result<Self> {
        let Value::Object(map) = table else {
            bail!("the distillation settings must be a table of keys, e.g. method = \"hinton\"");
        };
        let mut map = map.clone();
        if let Some(old) = map.remove(OLD_TAG) {
            map.entry(TAG).or_insert(old);
        }
        let name = match map.get(TAG) {
            None => Method::default().name().to_string(),
            Some(Value::String(name)) => name.clone(),
            Some(other) => bail!("method {other} is not a name: use one of {}", names()),
        };
        let Some(defaults) = Method::defaults(&name) else {
            bail!("unknown method '{name}': use one of {}", names());
        };
        let known = defaults.keys();
        if let Some(key) = map.keys().find(|k| *k != TAG && !known.contains(k)) {
            bail!(
                "`{key}` is not a setting of method {}: it takes {}",
                defaults.name(),
                known.join(", ")
            );
        }
        if let Some((key, _)) = map.iter().find(|(_, v)| v.is_null()) {
            bail!("{key} has no value (nan or inf?): use a finite number");
        }
        // Each method's own defaults fill what is left out.
        map.insert(TAG.into(), Value::String(defaults.name().into()));
        Ok(serde_json::from_value(Value::Object(map))?)
    }
}

/// Deserializes recorded or written settings through [`Method::from_table`] (older runs say
/// `"loss": "seed"`), for `#[serde(deserialize_with)]`.
pub fn deserialize_method<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Method, D::Error> {
    let table = Value::deserialize(d)?;
    Method::from_table(&table).map_err(serde::de::Error::custom)
}

/// The method names, for messages.
pub fn names() -> String {
    METHODS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_tables_take_defaults_old_names_and_refuse_other_keys() {
        let t = |s: &str| Method::from_table(&serde_json::from_str(s).unwrap());
        assert_eq!(t("{}").unwrap(), Method::default());
        // As kd wrote it before methods had their own tables.
        let old = t(r#"{"temperature": 7.0, "alpha": 0.7, "loss": "seed"}"#).unwrap();
        assert_eq!(old.name(), "tutorial");
        assert_eq!(serde_json::to_value(&old).unwrap()["method"], "tutorial");
        let partial = t(r#"{"method": "hinton", "temperature": 4}"#).unwrap();
        assert_eq!(
            partial,
            Method::Hinton(hinton::Hinton {
                temperature: 4.0,
                alpha: 0.7,
                standardize: false,
            })
        );
        let err = t(r#"{"method": "hinton", "beta": 8}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`beta`") && err.contains("alpha, standardize, temperature"),
            "{err}"
        );
        let err = t(r#"{"method": "dkdd"}"#).unwrap_err().to_string();
        assert!(
            err.contains("unknown method 'dkdd'") && err.contains("hinton"),
            "{err}"
        );
    }
}
