//! Decoupled KD (Zhao et al., CVPR 2022), as mdistiller's `DKD.py`: the target class's
//! binary KL (TCKD) and the KL over the other classes (NCKD), weighted separately and
//! warmed up over the first epochs, plus cross-entropy.

use anyhow::{Result, bail};
use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};
use serde::{Deserialize, Serialize};

use super::logits::{kl_sum, log_sum_exp, one_hot, standardize};
use super::{Distiller, Loss, Step, cross_entropy};

/// DKD's settings: mdistiller's defaults (`CFG.DKD`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dkd {
    /// Weight of the cross-entropy.
    pub ce_weight: f64,
    /// Weight of TCKD.
    pub alpha: f64,
    /// Weight of NCKD.
    pub beta: f64,
    /// Softmax temperature `T`.
    pub temperature: f64,
    /// Epochs over which the KD terms grow linearly to full weight (epoch `e` of a run, counted
    /// from 1, gets `min(e / warmup, 1)`).
    pub warmup: usize,
    /// Standardize both models' logits first (logit standardization).
    pub standardize: bool,
}

impl Default for Dkd {
    fn default() -> Self {
        Self {
            ce_weight: 1.0,
            alpha: 1.0,
            beta: 8.0,
            temperature: 4.0,
            warmup: 20,
            standardize: false,
        }
    }
}

impl Dkd {
    /// Checks the weights, the temperature and the warm-up.
    pub fn validate(&self) -> Result<()> {
        super::check_weights(&[
            ("ce_weight", self.ce_weight),
            ("alpha", self.alpha),
            ("beta", self.beta),
        ])?;
        super::check_temperature(self.temperature)?;
        if self.warmup == 0 {
            bail!("warmup 0 is invalid: use at least 1 epoch (mdistiller uses 20)");
        }
        Ok(())
    }

    /// `min(epoch / warmup, 1)`.
    pub fn warmup_factor(&self, epoch: usize) -> f64 {
        (epoch as f64 / self.warmup as f64).min(1.0)
    }
}

impl Distiller for Dkd {
    fn parts(&self) -> Vec<&'static str> {
        vec!["ce", "tckd", "nckd"]
    }

    fn factors(&self, epoch: usize) -> Vec<(&'static str, f64)> {
        vec![("warmup", self.warmup_factor(epoch))]
    }

    fn loss(&self, step: &Step) -> Loss {
        let (mut s, mut t) = (step.student.logits.clone(), step.teacher.logits.clone());
        let raw = s.clone();
        if self.standardize {
            (s, t) = (standardize(s), standardize(t));
        }
        let [batch, classes] = s.dims();
        let temperature = self.temperature;
        let gt = one_hot(step.targets, classes);
        let other = gt.clone().neg().add_scalar(1.0);
        let scale = temperature * temperature / batch as f64;
        // TCKD: the binary (target, rest) split of each full softmax; the student's in log
        // space, so that a probability that underflows (a wide logit gap at a low
        // temperature) gives a large finite loss, not log 0.
        let (s_t, t_t) = (s.clone().div_scalar(temperature), t.clone().div_scalar(temperature));
        let p_t = softmax(t_t.clone(), 1);
        let p_t = Tensor::cat(
            vec![
                (p_t.clone() * gt.clone()).sum_dim(1),
                (p_t * other).sum_dim(1),
            ],
            1,
        );
        let shift = gt.clone().mul_scalar(1000.0);
        let log_p = log_softmax(s_t.clone(), 1);
        let log_p_s = Tensor::cat(
            vec![
                (log_p.clone() * gt).sum_dim(1),
                log_sum_exp(log_p - shift.clone()),
            ],
            1,
        );
        let tckd = kl_sum(p_t, log_p_s).mul_scalar(scale);
        // NCKD: the target class shifted out of both distributions.
        let q_t = softmax(t_t - shift.clone(), 1);
        let log_q_s = log_softmax(s_t - shift, 1);
        let nckd = kl_sum(q_t, log_q_s).mul_scalar(scale);
        let warmup = self.warmup_factor(step.epoch);
        let ce = cross_entropy(raw, step.targets.clone()).mul_scalar(self.ce_weight);
        let tckd = tckd.mul_scalar(warmup * self.alpha);
        let nckd = nckd.mul_scalar(warmup * self.beta);
        Loss {
            total: ce.clone() + tckd.clone() + nckd.clone(),
            parts: vec![ce, tckd, nckd],
        }
    }
}
