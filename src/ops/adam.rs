//! [`FusedAdam`]: Adam with Burn's formulas and state, a drop-in replacement for Burn's
//! `Adam` that updates each f32 parameter on the CPU in one pass (kd's kernel) and leaves every
//! other parameter to Burn's `Adam`. No model knows about it; checkpoints are Burn's.

use burn::optim::{
    Adam, AdamConfig, AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};

use super::flex;

/// Adam (no weight decay, no AMSGrad) with Burn's formulas and state, fused on the CPU.
#[derive(Clone)]
pub struct FusedAdam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    /// Burn's own Adam with the same settings, for tensors the fused kernel does not take.
    fallback: Adam,
}

impl FusedAdam {
    /// PyTorch's and Burn's betas (0.9, 0.999) with the given epsilon.
    pub fn new(epsilon: f32) -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon,
            fallback: AdamConfig::new()
                .with_beta_1(0.9)
                .with_beta_2(0.999)
                .with_epsilon(epsilon)
                .build(),
        }
    }

    /// The whole-module optimizer (what `AdamConfig::init` returns for Burn's Adam).
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let fused = flex::is_flex_f32(&tensor)
            && flex::is_flex_f32(&grad)
            && state
                .as_ref()
                .is_none_or(|s| s.momentum.max_moment_2.is_none());
        if !fused {
            return self.fallback.step(lr, tensor, grad, state);
        }
        let (time, moments) = match state {
            Some(s) => (
                s.momentum.time + 1,
                Some((s.momentum.moment_1, s.momentum.moment_2)),
            ),
            None => (1, None),
        };
        // Burn's scalars, computed as Burn does (in f32).
        let t = time as i32;
        let bias_correction2_sqrt = (1.0 - self.beta_2.powi(t)).sqrt();
        let combined = bias_correction2_sqrt / (1.0 - self.beta_1.powi(t));
        let factors = [
            lr as f32,
            self.beta_1,
            self.beta_2,
            combined,
            self.epsilon * bias_correction2_sqrt,
        ];
        let (p, m, v) = flex::adam::adam_step(tensor, grad, moments, factors);
        let momentum = AdaptiveMomentumState::new(time, m, v);
        (p, Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <Adam as Optimizer>::to_device(state, device)
    }
}
