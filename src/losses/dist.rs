//! DIST (Huang et al., NeurIPS 2022), as torchdistill's `DISTLoss`: the Pearson correlation
//! of student and teacher probabilities between classes (inter-class, per sample) and
//! between samples (intra-class, per class), plus cross-entropy with the original training
//! wrapper's weights.

use anyhow::Result;
use burn::tensor::Tensor;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};

use super::{Distiller, Loss, Step, cross_entropy};

/// torch's `cosine_similarity` epsilon: a norm below it counts as it.
const EPS: f64 = 1e-8;

/// DIST's settings: torchdistill's `DISTLoss` defaults and the original wrapper's weights
/// (CE 1, KD 2; its CIFAR setup uses temperature 4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dist {
    /// Weight of the cross-entropy.
    pub ce_weight: f64,
    /// Weight of the DIST term.
    pub kd_weight: f64,
    /// Weight of the inter-class relation.
    pub beta: f64,
    /// Weight of the intra-class relation.
    pub gamma: f64,
    /// Softmax temperature (the reference's `tau`).
    pub temperature: f64,
}

impl Default for Dist {
    fn default() -> Self {
        Self {
            ce_weight: 1.0,
            kd_weight: 2.0,
            beta: 1.0,
            gamma: 1.0,
            temperature: 1.0,
        }
    }
}

impl Dist {
    /// Checks the weights and the temperature.
    pub fn validate(&self) -> Result<()> {
        super::check_weights(&[
            ("ce_weight", self.ce_weight),
            ("kd_weight", self.kd_weight),
            ("beta", self.beta),
            ("gamma", self.gamma),
        ])?;
        super::check_temperature(self.temperature)
    }
}

/// `1 − mean over rows of pearson(a[n, :], b[n, :])`, the Pearson correlation being the
/// cosine similarity of the mean-centred rows with torch's `max(|·|, eps)` norms (as
/// `sqrt(max(|·|², eps²))`, which has no NaN gradient at a zero row).
fn relation(a: Tensor<2>, b: Tensor<2>) -> Tensor<1> {
    let a = a.clone() - a.mean_dim(1);
    let b = b.clone() - b.mean_dim(1);
    let norm = |x: Tensor<2>| x.powi_scalar(2).sum_dim(1).clamp_min(EPS * EPS).sqrt();
    let cosine = (a.clone() * b.clone()).sum_dim(1) / (norm(a) * norm(b));
    cosine.mean().neg().add_scalar(1.0)
}

impl Distiller for Dist {
    fn parts(&self) -> Vec<&'static str> {
        vec!["ce", "inter", "intra"]
    }

    fn loss(&self, step: &Step) -> Loss {
        let t = self.temperature;
        let y_s = softmax(step.student.logits.clone().div_scalar(t), 1);
        let y_t = softmax(step.teacher.logits.clone().div_scalar(t), 1);
        let weight = self.kd_weight * t * t;
        let inter = relation(y_s.clone(), y_t.clone()).mul_scalar(weight * self.beta);
        let intra = relation(y_s.transpose(), y_t.transpose()).mul_scalar(weight * self.gamma);
        let ce = cross_entropy(step.student.logits.clone(), step.targets.clone())
            .mul_scalar(self.ce_weight);
        Loss {
            total: ce.clone() + inter.clone() + intra.clone(),
            parts: vec![ce, inter, intra],
        }
    }
}
