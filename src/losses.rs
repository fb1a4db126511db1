//! Losses: cross-entropy and knowledge-distillation objectives.
//!
//! A distillation method is one [`DistillLoss`] implementation; add a file per method
//! (DKD, DIST, feature distillation) and a variant to [`KdLossKind`].

use anyhow::{Result, bail};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// Mean cross-entropy of logits `[batch, classes]` against class indices `[batch]`.
pub fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let [batch, _] = logits.dims();
    let logp = log_softmax(logits, 1);
    let picked = logp.gather(1, labels.reshape([batch, 1]));
    picked.mean().neg()
}

/// The parts of a distillation loss, for logging.
pub struct LossParts {
    /// What is minimised.
    pub total: Tensor<1>,
    /// The weighted soft-target term.
    pub kd: Tensor<1>,
    /// The weighted hard-label cross-entropy term.
    pub ce: Tensor<1>,
}

/// A logit-distillation objective.
pub trait DistillLoss: Send + Sync {
    /// Loss of student logits against teacher logits and true labels.
    fn loss(&self, student: Tensor<2>, teacher: Tensor<2>, labels: Tensor<1, Int>) -> LossParts;
}

/// Which distillation loss to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KdLossKind {
    /// `alpha * T^2 * KL(batchmean) + (1 - alpha) * CE` (Hinton et al.).
    Hinton,
    /// The tutorial's exact formula: `KLDivLoss()` mean over batch and classes, times
    /// `2 * alpha * T^2`, plus `(1 - alpha) * CE`.
    Seed,
}

/// Distillation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdConfig {
    /// Softmax temperature `T`.
    pub temperature: f64,
    /// Weight of the soft-target term.
    pub alpha: f64,
    /// Loss formula.
    pub loss: KdLossKind,
}

impl Default for KdConfig {
    /// The tutorial's: T = 7, alpha = 0.7, Hinton loss.
    fn default() -> Self {
        Self {
            temperature: 7.0,
            alpha: 0.7,
            loss: KdLossKind::Hinton,
        }
    }
}

impl KdConfig {
    /// Checks temperature and alpha.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            bail!(
                "--temperature {} is invalid: use a positive number such as 7",
                self.temperature
            );
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            bail!(
                "--alpha {} is invalid: use a number in [0, 1] such as 0.7",
                self.alpha
            );
        }
        Ok(())
    }

    /// The loss object for these settings.
    pub fn build(&self) -> Box<dyn DistillLoss> {
        Box::new(SoftTargets {
            temperature: self.temperature,
            alpha: self.alpha,
            kind: self.loss,
        })
    }
}

/// Soft-target distillation, `alpha * T^2 * KL / norm + (1 - alpha) * CE`. Hinton's loss
/// averages KL per sample (`norm = batch`); the tutorial's `KLDivLoss()` averages over
/// batch and classes and doubles it (`norm = batch * classes / 2`).
#[derive(Debug, Clone, Copy)]
struct SoftTargets {
    temperature: f64,
    alpha: f64,
    kind: KdLossKind,
}

impl DistillLoss for SoftTargets {
    fn loss(&self, student: Tensor<2>, teacher: Tensor<2>, labels: Tensor<1, Int>) -> LossParts {
        let (t, alpha) = (self.temperature, self.alpha);
        let [batch, classes] = student.dims();
        let norm = match self.kind {
            KdLossKind::Hinton => batch as f64,
            KdLossKind::Seed => (batch * classes) as f64 / 2.0,
        };
        // Sum over batch and classes of p_t * (log p_t - log p_s) at temperature T.
        let log_ps = log_softmax(student.clone().div_scalar(t), 1);
        let teacher = teacher.div_scalar(t);
        let log_pt = log_softmax(teacher.clone(), 1);
        let kl_sum = (softmax(teacher, 1) * (log_pt - log_ps)).sum();
        let kd = kl_sum.mul_scalar(alpha * t * t / norm);
        let ce = cross_entropy(student, labels).mul_scalar(1.0 - alpha);
        LossParts {
            total: kd.clone() + ce.clone(),
            kd,
            ce,
        }
    }
}
