//! The learned projection of feature distillation: the student's pooled features onto the
//! teacher's size, trained with the student (its own Adam state, the same rate), saved and
//! resumed with it, and never part of the student's checkpoints or exports.

use std::path::Path;

use anyhow::Result;
use burn::nn::Linear;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Gradients};

use crate::models::weights;
use crate::ops::FusedAdam;

/// A projection and its optimizer.
pub struct Projection {
    /// `Linear(student features, teacher features)` with bias.
    pub layer: Linear,
    /// Its Adam state.
    pub optim: ModuleOptimizer,
}

impl Projection {
    /// A fresh projection from `student` to `teacher` features on the autodiff `device`.
    pub fn new(student: usize, teacher: usize, epsilon: f64, device: &Device) -> Self {
        Self {
            // Numbered apart from the student's parameters.
            layer: crate::models::weights::stable_ids(
                crate::losses::feature::projection(student, teacher, device),
                1 << 32,
            ),
            optim: FusedAdam::new(epsilon as f32).init(),
        }
    }

    /// One optimizer step with the projection's gradients, taken out of the step's.
    pub fn step(&mut self, lr: f64, grads: &mut Gradients) {
        let grads = GradientsParams::from_module(grads, &self.layer);
        self.layer = self.optim.step(lr, self.layer.clone(), grads);
    }

    /// The layer's and the optimizer's bytes, for the resume state.
    pub fn to_bytes(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let optim = self
            .optim
            .into_bytes()
            .map_err(|e| anyhow::anyhow!("cannot serialise the projection's optimizer: {e:?}"))?;
        Ok((weights::to_bytes(&self.layer)?, optim.to_vec()))
    }

    /// Restores the layer and its optimizer from the resume state's bytes.
    pub fn restore(&mut self, (layer, optim): (Vec<u8>, Vec<u8>), origin: &Path) -> Result<()> {
        weights::load_bytes(&mut self.layer, layer, origin)?;
        let fresh = std::mem::replace(&mut self.optim, FusedAdam::new(1.0).init());
        self.optim = fresh
            .from_bytes(burn::tensor::Bytes::from_bytes_vec(optim))
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot restore the projection's optimizer from {}: {e:?}",
                    origin.display()
                )
            })?;
        Ok(())
    }
}
