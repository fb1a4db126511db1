//! Hinton et al.'s soft targets (the default method):
//! `alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) / batch + (1 − alpha) · CE(s, y)`, optionally
//! on standardized logits (logit standardization).

use anyhow::{Result, bail};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use super::logits::standardize;
use super::{Distiller, Loss, Step, cross_entropy};

/// Settings of Hinton's loss; the defaults are the tutorial's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hinton {
    /// Softmax temperature `T`.
    pub temperature: f64,
    /// Weight of the soft-target term.
    pub alpha: f64,
    /// Standardize both models' logits for the soft targets (logit standardization; T then
    /// divides the z-scores). The cross-entropy keeps the raw logits.
    pub standardize: bool,
}

impl Default for Hinton {
    fn default() -> Self {
        Self {
            temperature: 7.0,
            alpha: 0.7,
            standardize: false,
        }
    }
}

impl Hinton {
    /// Checks temperature and alpha.
    pub fn validate(&self) -> Result<()> {
        super::check_temperature(self.temperature)?;
        if !(0.0..=1.0).contains(&self.alpha) {
            bail!(
                "--alpha {} is invalid: use a number in [0, 1] such as 0.7",
                self.alpha
            );
        }
        Ok(())
    }
}

/// `alpha · T² · Σ KL / norm + (1 − alpha) · CE`, the KL summed over batch and classes (of
/// the z-scored logits with `standardize`): parts `kd` and `ce`, both weighted.
pub fn soft_targets(
    student: Tensor<2>,
    teacher: Tensor<2>,
    targets: Tensor<1, Int>,
    (temperature, alpha, standardized): (f64, f64, bool),
    norm: f64,
) -> Loss {
    let t = temperature;
    let (soft_student, teacher) = if standardized {
        (standardize(student.clone()), standardize(teacher))
    } else {
        (student.clone(), teacher)
    };
    let log_ps = log_softmax(soft_student.div_scalar(t), 1);
    let teacher = teacher.div_scalar(t);
    let log_pt = log_softmax(teacher.clone(), 1);
    let kl_sum = (softmax(teacher, 1) * (log_pt - log_ps)).sum();
    let kd = kl_sum.mul_scalar(alpha * t * t / norm);
    let ce = cross_entropy(student, targets).mul_scalar(1.0 - alpha);
    Loss {
        total: kd.clone() + ce.clone(),
        parts: vec![kd, ce],
    }
}

impl Distiller for Hinton {
    fn parts(&self) -> Vec<&'static str> {
        vec!["kd", "ce"]
    }

    fn loss(&self, step: &Step) -> Loss {
        let [batch, _] = step.student.logits.dims();
        soft_targets(
            step.student.logits.clone(),
            step.teacher.logits.clone(),
            step.targets.clone(),
            (self.temperature, self.alpha, self.standardize),
            batch as f64,
        )
    }
}
