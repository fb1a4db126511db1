//! The ops layer: what models compute with, beyond plain tensor arithmetic.
//!
//! A model's forward pass takes a [`Ctx`] and calls its methods for convolutions, linear
//! layers, attention products, BatchNorm, pooling, activations and dropout. Each method picks
//! kd's CPU kernel ([`flex`]) where it applies (f32 on the flex device) and Burn's own
//! operation everywhere else (GPUs, bf16/f16), computes the heavy products in the context's
//! [`Precision`] (autocast) and keeps PyTorch's semantics (BatchNorm's running statistics,
//! dropout's scaling). A model written against it gets the fast path and autocast without
//! knowing they exist. [`FusedAdam`] is the optimizer counterpart.
//!
//! Training mode follows the device, as in Burn: on an autodiff device BatchNorm uses batch
//! statistics and dropout is active; on a plain device the network infers.

pub mod activation;
mod adam;
mod autocast;
pub mod conv;
mod dropout;
pub mod flex;
pub mod norm;
pub mod pool;
mod precision;

use std::cell::RefCell;

use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, Linear};
use burn::tensor::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use adam::FusedAdam;
pub use precision::Precision;

/// The context of one forward pass: the precision of its heavy products and the generator of
/// its random masks (dropout, stochastic depth), seeded per training step so that a resumed
/// run replays them.
#[derive(Debug)]
pub struct Ctx {
    precision: Precision,
    rng: RefCell<ChaCha8Rng>,
}

impl Ctx {
    /// A forward pass in `precision`; random masks (when training) from seed 0.
    pub fn new(precision: Precision) -> Self {
        Self::seeded(precision, 0)
    }

    /// A forward pass in `precision` whose random masks derive from `seed`.
    pub fn seeded(precision: Precision, seed: u64) -> Self {
        Self {
            precision,
            rng: RefCell::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    /// The precision of the heavy products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// `conv.forward(x)`.
    pub fn conv2d(&self, conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        conv::conv2d(conv, x, self.precision)
    }

    /// `layer.forward(x)`.
    pub fn linear<const D: usize>(&self, layer: &Linear, x: Tensor<D>) -> Tensor<D> {
        autocast::linear(layer, x, self.precision)
    }

    /// `a.matmul(b)`.
    pub fn matmul<const D: usize>(&self, a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
        autocast::matmul(a, b, self.precision)
    }

    /// `bn.forward(x)`, with PyTorch's running statistics when training.
    pub fn batch_norm<const D: usize>(&self, bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
        norm::batch_norm(bn, x)
    }

    /// `relu(bn.forward(x) + residual)`, or `relu(bn.forward(x))` without a residual.
    pub fn batch_norm_relu<const D: usize>(
        &self,
        bn: &BatchNorm,
        x: Tensor<D>,
        residual: Option<Tensor<D>>,
    ) -> Tensor<D> {
        norm::batch_norm_relu(bn, x, residual)
    }

    /// `pool.forward(x)`.
    pub fn max_pool2d(&self, pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
        pool::max_pool2d(pool, x)
    }

    /// Mean over the spatial dimensions: `[b, c, h, w]` -> `[b, c]`.
    pub fn global_avg_pool(&self, x: Tensor<4>) -> Tensor<2> {
        pool::global_avg_pool(x)
    }

    /// Exact GELU.
    pub fn gelu<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        activation::gelu(x)
    }

    /// `x · relu6(x + 3) / 6`.
    pub fn hardswish<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        activation::hardswish(x)
    }

    /// `relu6(x + 3) / 6`.
    pub fn hardsigmoid<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        activation::hardsigmoid(x)
    }

    /// `x · sigmoid(x)`.
    pub fn silu<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        activation::silu(x)
    }

    /// `1 / (1 + e^−x)`.
    pub fn sigmoid<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        activation::sigmoid(x)
    }

    /// Dropout with probability `p` when training (an autodiff device), else `x`.
    pub fn dropout<const D: usize>(&self, x: Tensor<D>, p: f64) -> Tensor<D> {
        if p <= 0.0 || !x.device().is_autodiff() {
            return x;
        }
        dropout::dropout(x, p, &mut self.rng.borrow_mut())
    }

    /// Drops a residual branch `x` per sample with probability `p` when training (an autodiff
    /// device), else `x`.
    pub fn stochastic_depth(&self, x: Tensor<4>, p: f64) -> Tensor<4> {
        if p <= 0.0 || !x.device().is_autodiff() {
            return x;
        }
        dropout::stochastic_depth(x, p, &mut self.rng.borrow_mut())
    }
}
