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
        let soft = SoftTargets {
            temperature: self.temperature,
            alpha: self.alpha,
        };
        match self.loss {
            KdLossKind::Hinton => Box::new(Hinton(soft)),
            KdLossKind::Seed => Box::new(SeedLoss(soft)),
        }
    }
}

/// Shared soft-target computation.
#[derive(Debug, Clone, Copy)]
struct SoftTargets {
    temperature: f64,
    alpha: f64,
}

impl SoftTargets {
    /// Sum over batch and classes of `p_t * (log p_t - log p_s)` at temperature T.
    fn kl_sum(&self, student: Tensor<2>, teacher: Tensor<2>) -> Tensor<1> {
        let t = self.temperature;
        let log_ps = log_softmax(student.div_scalar(t), 1);
        let teacher = teacher.div_scalar(t);
        let log_pt = log_softmax(teacher.clone(), 1);
        let pt = softmax(teacher, 1);
        (pt * (log_pt - log_ps)).sum()
    }
}

/// Hinton's loss with KL averaged per sample.
struct Hinton(SoftTargets);

impl DistillLoss for Hinton {
    fn loss(&self, student: Tensor<2>, teacher: Tensor<2>, labels: Tensor<1, Int>) -> LossParts {
        let SoftTargets {
            temperature: t,
            alpha,
        } = self.0;
        let [batch, _] = student.dims();
        let kd = self
            .0
            .kl_sum(student.clone(), teacher)
            .mul_scalar(alpha * t * t / batch as f64);
        let ce = cross_entropy(student, labels).mul_scalar(1.0 - alpha);
        LossParts {
            total: kd.clone() + ce.clone(),
            kd,
            ce,
        }
    }
}

/// The tutorial's loss (KLDivLoss 'mean' reduction, factor 2).
struct SeedLoss(SoftTargets);

impl DistillLoss for SeedLoss {
    fn loss(&self, student: Tensor<2>, teacher: Tensor<2>, labels: Tensor<1, Int>) -> LossParts {
        let SoftTargets {
            temperature: t,
            alpha,
        } = self.0;
        let [batch, classes] = student.dims();
        let kd = self
            .0
            .kl_sum(student.clone(), teacher)
            .mul_scalar(2.0 * alpha * t * t / (batch * classes) as f64);
        let ce = cross_entropy(student, labels).mul_scalar(1.0 - alpha);
        LossParts {
            total: kd.clone() + ce.clone(),
            kd,
            ce,
        }
    }
}
