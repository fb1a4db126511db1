//! KD with logit standardization (Sun et al., CVPR 2024), as the authors' mdistiller `KD.py`
//! run with `--logit-stand --base-temp 2 --kd-weight 9`: Hinton's soft targets computed on
//! each model's z-scored logits, in the reference's weighting (CE weight, KD weight).
//! Hinton's loss and DKD take the same standardization as a switch (`standardize`).

use anyhow::Result;
use burn::tensor::activation::{log_softmax, softmax};
use serde::{Deserialize, Serialize};

use super::logits::{kl_sum, standardize};
use super::{Distiller, Loss, Step, cross_entropy};

/// The settings of KD with logit standardization: the reference's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogitStd {
    /// Weight of the cross-entropy (on the raw student logits).
    pub ce_weight: f64,
    /// Weight of the KD term (`T²` included as well).
    pub kd_weight: f64,
    /// The base temperature: it divides the standardized logits (each sample's effective
    /// temperature is `T · std`); the `T²` factor uses it alone.
    pub temperature: f64,
}

impl Default for LogitStd {
    fn default() -> Self {
        Self {
            ce_weight: 0.1,
            kd_weight: 9.0,
            temperature: 2.0,
        }
    }
}

impl LogitStd {
    /// Checks the weights and the temperature.
    pub fn validate(&self) -> Result<()> {
        super::check_weights(&[
            ("ce_weight", self.ce_weight),
            ("kd_weight", self.kd_weight),
        ])?;
        super::check_temperature(self.temperature)
    }
}

/// `kd_weight · T² · KL(softmax(Z(t)/T) ‖ softmax(Z(s)/T)) / batch`, Z the z-scores.
pub fn standardized_kd(step: &Step, temperature: f64, kd_weight: f64) -> burn::tensor::Tensor<1> {
    let t = temperature;
    let s = standardize(step.student.logits.clone()).div_scalar(t);
    let teacher = standardize(step.teacher.logits.clone()).div_scalar(t);
    let [batch, _] = s.dims();
    kl_sum(softmax(teacher, 1), log_softmax(s, 1)).mul_scalar(kd_weight * t * t / batch as f64)
}

impl Distiller for LogitStd {
    fn parts(&self) -> Vec<&'static str> {
        vec!["kd", "ce"]
    }

    fn loss(&self, step: &Step) -> Loss {
        let kd = standardized_kd(step, self.temperature, self.kd_weight);
        let ce = cross_entropy(step.student.logits.clone(), step.targets.clone())
            .mul_scalar(self.ce_weight);
        Loss {
            total: kd.clone() + ce.clone(),
            parts: vec![kd, ce],
        }
    }
}
