//! The learning-rate schedule: PyTorch's `CosineAnnealingLR`, stepped per epoch.

use serde::{Deserialize, Serialize};

/// `CosineAnnealingLR(T_max, eta_min)` over a base rate. Periodic past `t_max`, as PyTorch's
/// (the rate climbs back towards the base rate after reaching `eta_min`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    /// Base learning rate (epoch 0).
    pub base_lr: f64,
    /// Half period in epochs.
    pub t_max: usize,
    /// Minimum rate.
    pub eta_min: f64,
}

impl CosineSchedule {
    /// The rate in effect during `epoch` (0-based).
    pub fn lr(&self, epoch: usize) -> f64 {
        if self.t_max == 0 {
            return self.base_lr;
        }
        let phase = std::f64::consts::PI * epoch as f64 / self.t_max as f64;
        self.eta_min + (self.base_lr - self.eta_min) * (1.0 + phase.cos()) / 2.0
    }
}

impl CosineSchedule {
    /// The schedule of a run's config.
    pub fn of(config: &crate::run::TrainConfig) -> Self {
        Self {
            base_lr: config.lr,
            t_max: config.t_max,
            eta_min: config.eta_min,
        }
    }
}
