//! Dropout and stochastic depth for training, with masks drawn on the host from the forward
//! context's seeded generator, so that a resumed run draws exactly the same masks.

use burn::tensor::{Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// `n` values of a keep mask: `1 / (1 − p)` with probability `1 − p`, else 0 (all 0 when
/// `p` is 1), as PyTorch scales the survivors.
fn keep_mask(rng: &mut ChaCha8Rng, n: usize, p: f64) -> Vec<f32> {
    let keep = 1.0 - p;
    let scale = if keep > 0.0 { (1.0 / keep) as f32 } else { 0.0 };
    (0..n)
        .map(|_| {
            if rng.random::<f64>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect()
}

/// Zeroes each element with probability `p` and scales the rest by `1 / (1 − p)`
/// (`nn.Dropout` in training).
pub fn dropout<const D: usize>(x: Tensor<D>, p: f64, rng: &mut ChaCha8Rng) -> Tensor<D> {
    let dims = x.dims();
    let mask = keep_mask(rng, dims.iter().product(), p);
    let mask = Tensor::<D>::from_data(TensorData::new(mask, dims), &x.device());
    x * mask
}

/// Zeroes each sample's `x` (a residual branch) with probability `p` and scales the rest by
/// `1 / (1 − p)` (torchvision's `StochasticDepth(p, "row")` in training).
pub fn stochastic_depth(x: Tensor<4>, p: f64, rng: &mut ChaCha8Rng) -> Tensor<4> {
    let batch = x.dims()[0];
    let mask = keep_mask(rng, batch, p);
    let mask = Tensor::<4>::from_data(TensorData::new(mask, [batch, 1, 1, 1]), &x.device());
    x * mask
}
