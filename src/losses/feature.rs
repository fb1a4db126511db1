//! Feature distillation as timm's `FeatureDistillationTask`: the student's pooled features,
//! through a learned linear projection when the sizes differ, against the teacher's pooled
//! features with mean squared error, plus the task's cross-entropy. Any other method adds
//! the same feature term with `feature_weight` ([`WithFeatures`]).

use anyhow::{Result, bail};
use burn::nn::Linear;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::{Distiller, Loss, Step, cross_entropy};

/// Feature distillation's settings, the weights resolved by timm's rule when read: both
/// given, as given; only `distill_weight`, task 1; only `task_weight`, distill `1 − task`;
/// neither, both 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "FeatureTable")]
pub struct Feature {
    /// Weight of the task's cross-entropy.
    pub task_weight: f64,
    /// Weight of the feature term.
    pub distill_weight: f64,
}

impl Default for Feature {
    fn default() -> Self {
        FeatureTable::default().into()
    }
}

/// [`Feature`] as written: either weight may be left out.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FeatureTable {
    task_weight: Option<f64>,
    distill_weight: Option<f64>,
}

impl From<FeatureTable> for Feature {
    fn from(t: FeatureTable) -> Self {
        let (task_weight, distill_weight) = match (t.task_weight, t.distill_weight) {
            (Some(t), Some(d)) => (t, d),
            (None, Some(d)) => (1.0, d),
            (Some(t), None) => (t, 1.0 - t),
            (None, None) => (1.0, 1.0),
        };
        Self {
            task_weight,
            distill_weight,
        }
    }
}

impl Feature {
    /// Checks the weights.
    pub fn validate(&self) -> Result<()> {
        super::check_weights(&[
            ("task_weight", self.task_weight),
            ("distill_weight", self.distill_weight),
        ])
    }
}

/// The mean over every element of `(proj(f_s) − f_t)²`, the projection applied when the
/// training loop made one (the sizes differ).
pub fn feature_mse(step: &Step) -> Tensor<1> {
    let student = step
        .student
        .features
        .clone()
        .expect("a feature method gets the student's features");
    let teacher = step
        .teacher
        .features
        .clone()
        .expect("a feature method gets the teacher's features");
    let student = match step.projection {
        Some(projection) => projection.forward(student),
        None => student,
    };
    (student - teacher).powi_scalar(2).mean()
}

impl Distiller for Feature {
    fn parts(&self) -> Vec<&'static str> {
        vec!["task", "feature"]
    }

    fn needs_features(&self) -> bool {
        true
    }

    fn loss(&self, step: &Step) -> Loss {
        let task = cross_entropy(step.student.logits.clone(), step.targets.clone())
            .mul_scalar(self.task_weight);
        let feature = feature_mse(step).mul_scalar(self.distill_weight);
        Loss {
            total: task.clone() + feature.clone(),
            parts: vec![task, feature],
        }
    }
}

/// A logit method with timm's feature term added: `loss + weight · MSE(proj(f_s), f_t)`.
pub struct WithFeatures {
    /// The method.
    pub inner: Box<dyn Distiller>,
    /// Weight of the feature term.
    pub weight: f64,
}

impl WithFeatures {
    /// Refuses a weight that is negative or not finite.
    pub fn check(weight: f64) -> Result<()> {
        if !(weight >= 0.0 && weight.is_finite()) {
            bail!("feature_weight {weight} is invalid: use 0 (off) or a positive number such as 1");
        }
        Ok(())
    }
}

impl Distiller for WithFeatures {
    fn parts(&self) -> Vec<&'static str> {
        let mut parts = self.inner.parts();
        parts.push("feature");
        parts
    }

    fn factors(&self, epoch: usize) -> Vec<(&'static str, f64)> {
        self.inner.factors(epoch)
    }

    fn needs_features(&self) -> bool {
        true
    }

    fn loss(&self, step: &Step) -> Loss {
        let mut loss = self.inner.loss(step);
        let feature = feature_mse(step).mul_scalar(self.weight);
        loss.total = loss.total + feature.clone();
        loss.parts.push(feature);
        loss
    }
}

/// The projection of a student's pooled features onto the teacher's size (`nn.Linear` with
/// bias and PyTorch's default initialisation), as timm makes it.
pub fn projection(student: usize, teacher: usize, device: &burn::tensor::Device) -> Linear {
    burn::nn::LinearConfig::new(student, teacher).init(device)
}
