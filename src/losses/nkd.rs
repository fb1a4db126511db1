//! Normalized KD (Yang et al., ICCV 2023), as yzd-v/cls_KD's `nkd.py`: the teacher's
//! target probability weighting the student's target log-probability, and the cross-entropy
//! of the non-target classes' renormalized distributions, plus the student's own CE.

use anyhow::Result;
use burn::tensor::activation::{log_softmax, softmax};
use serde::{Deserialize, Serialize};

use super::logits::one_hot;
use super::{Distiller, Loss, Step, cross_entropy};

/// NKD's settings: the reference's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Nkd {
    /// Weight of the student's cross-entropy.
    pub ce_weight: f64,
    /// Weight of the non-target term.
    pub gamma: f64,
    /// Temperature of the non-target distributions (the reference's `temp`, lambda).
    pub temperature: f64,
}

impl Default for Nkd {
    fn default() -> Self {
        Self {
            ce_weight: 1.0,
            gamma: 1.5,
            temperature: 1.0,
        }
    }
}

impl Nkd {
    /// Checks the weights and the temperature.
    pub fn validate(&self) -> Result<()> {
        super::check_weights(&[("ce_weight", self.ce_weight), ("gamma", self.gamma)])?;
        super::check_temperature(self.temperature)
    }
}

impl Distiller for Nkd {
    fn parts(&self) -> Vec<&'static str> {
        vec!["ce", "target", "nontarget"]
    }

    fn loss(&self, step: &Step) -> Loss {
        let (s, t) = (step.student.logits.clone(), step.teacher.logits.clone());
        let [batch, classes] = s.dims();
        let gt = one_hot(step.targets, classes);
        // Target term at temperature 1; the teacher's probability is a constant.
        let s_target = (log_softmax(s.clone(), 1) * gt.clone()).sum_dim(1);
        let t_target = (softmax(t.clone(), 1) * gt.clone()).sum_dim(1).detach();
        let target = (t_target * s_target).sum().div_scalar(-(batch as f64));
        // Non-target term: the target class shifted out of both distributions (as removing
        // its column), at temperature `temp`.
        let temp = self.temperature;
        let shift = gt.mul_scalar(1000.0);
        let q_t = softmax(t.div_scalar(temp) - shift.clone(), 1);
        let log_q_s = log_softmax(s.clone().div_scalar(temp) - shift, 1);
        let nontarget = (q_t * log_q_s)
            .sum()
            .mul_scalar(-self.gamma * temp * temp / batch as f64);
        let ce = cross_entropy(s, step.targets.clone()).mul_scalar(self.ce_weight);
        Loss {
            total: ce.clone() + target.clone() + nontarget.clone(),
            parts: vec![ce, target, nontarget],
        }
    }
}
