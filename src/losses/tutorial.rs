//! The original tutorial's loss, exactly: `KLDivLoss()` (a mean over batch *and* classes)
//! of the soft targets times `2 · alpha · T²`, plus `(1 − alpha) · CE`. (Called `seed` before;
//! `--method seed` and `method = "seed"` still name it.)

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::hinton::{Hinton, soft_targets};
use super::{Distiller, Loss, Step};

/// Settings of the tutorial's loss (its own values by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tutorial {
    /// Softmax temperature `T`.
    pub temperature: f64,
    /// Weight of the soft-target term.
    pub alpha: f64,
}

impl Default for Tutorial {
    fn default() -> Self {
        let Hinton {
            temperature, alpha, ..
        } = Hinton::default();
        Self { temperature, alpha }
    }
}

impl Tutorial {
    /// Checks temperature and alpha (as Hinton's).
    pub fn validate(&self) -> Result<()> {
        Hinton {
            temperature: self.temperature,
            alpha: self.alpha,
            standardize: false,
        }
        .validate()
    }
}

impl Distiller for Tutorial {
    fn parts(&self) -> Vec<&'static str> {
        vec!["kd", "ce"]
    }

    fn loss(&self, step: &Step) -> Loss {
        let [batch, classes] = step.student.logits.dims();
        soft_targets(
            step.student.logits.clone(),
            step.teacher.logits.clone(),
            step.targets.clone(),
            (self.temperature, self.alpha, false),
            (batch * classes) as f64 / 2.0,
        )
    }
}
