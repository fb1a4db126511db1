//! f32 kernels of [`super::FusedBatchNorm`] on the flex backend: one rayon task per channel.

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use crate::flex::{SharedOut, f32_contiguous, f32_tensor};

/// `[batch, channels, plane]` of a `[B, C, ...]` tensor.
fn layout(x: &FlexTensor) -> (usize, usize, usize) {
    let dims = x.shape().to_vec();
    assert!(dims.len() >= 2, "batch norm needs [batch, channels, ...]");
    (dims[0], dims[1], dims[2..].iter().product())
}

/// Runs `f(channel, planes)` for every channel in parallel, where `planes` yields the
/// offsets of that channel's `batch` planes of `plane` values.
fn per_channel<T: Send>(
    (_, channels, plane): (usize, usize, usize),
    f: impl Fn(usize, &dyn Fn(usize) -> usize) -> T + Sync + Send,
) -> Vec<T> {
    (0..channels)
        .into_par_iter()
        .map(|c| f(c, &|b| (b * channels + c) * plane))
        .collect()
}

/// Output, batch mean and biased batch variance.
pub fn forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    epsilon: f64,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let dims = x.shape().to_vec();
    let (x, gamma, beta) = (
        f32_contiguous(x),
        f32_contiguous(gamma),
        f32_contiguous(beta),
    );
    let (xs, gs, bs) = (
        x.storage::<f32>(),
        gamma.storage::<f32>(),
        beta.storage::<f32>(),
    );
    let shape @ (batch, _, plane) = layout(&x);
    let count = (batch * plane) as f64;
    let mut out = vec![0.0f32; xs.len()];
    let shared = SharedOut::new(&mut out);
    let stats = per_channel(shape, |c, offset| {
        let planes = || (0..batch).map(|b| &xs[offset(b)..][..plane]);
        let mean = planes().flatten().map(|&v| f64::from(v)).sum::<f64>() / count;
        let variance = planes()
            .flatten()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / count;
        let inv_std = 1.0 / (variance + epsilon).sqrt();
        // (x − mean)·scale + β: centring first keeps precision when |mean| ≫ std.
        let scale = (f64::from(gs[c]) * inv_std) as f32;
        let (mean32, beta) = (mean as f32, bs[c]);
        for b in 0..batch {
            // SAFETY: plane (b, c) is written by channel c's task only.
            let dst = unsafe { shared.slice(offset(b), plane) };
            for (d, &v) in dst.iter_mut().zip(&xs[offset(b)..][..plane]) {
                *d = (v - mean32) * scale + beta;
            }
        }
        (mean as f32, variance as f32)
    });
    let (mean, variance): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
    let channels = mean.len();
    (
        f32_tensor(out, dims),
        f32_tensor(mean, [channels]),
        f32_tensor(variance, [channels]),
    )
}

/// Gradients of input, gamma and beta:
/// `dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy · x̂))`, `dγ = Σ dy · x̂`, `dβ = Σ dy`.
pub fn backward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    mean: &FlexTensor,
    variance: &FlexTensor,
    epsilon: f64,
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let dims = x.shape().to_vec();
    let (x, gamma, mean, variance, grad) = (
        f32_contiguous(x),
        f32_contiguous(gamma),
        f32_contiguous(mean),
        f32_contiguous(variance),
        f32_contiguous(grad),
    );
    let (xs, gs, ms, vs, dys) = (
        x.storage::<f32>(),
        gamma.storage::<f32>(),
        mean.storage::<f32>(),
        variance.storage::<f32>(),
        grad.storage::<f32>(),
    );
    let shape @ (batch, _, plane) = layout(&x);
    let count = (batch * plane) as f64;
    let mut dx = vec![0.0f32; xs.len()];
    let shared = SharedOut::new(&mut dx);
    let sums = per_channel(shape, |c, offset| {
        let mean = f64::from(ms[c]);
        let inv_std = 1.0 / (f64::from(vs[c]) + epsilon).sqrt();
        let (mut sum_dy, mut sum_dy_xhat) = (0.0f64, 0.0f64);
        for b in 0..batch {
            let (x, dy) = (&xs[offset(b)..][..plane], &dys[offset(b)..][..plane]);
            for (&v, &g) in x.iter().zip(dy) {
                sum_dy += f64::from(g);
                sum_dy_xhat += f64::from(g) * (f64::from(v) - mean) * inv_std;
            }
        }
        let scale = f64::from(gs[c]) * inv_std;
        let (mean_dy, mean_dy_xhat) = (sum_dy / count, sum_dy_xhat / count);
        // dx = scale·dy − scale·mean(dy) − scale·mean(dy·x̂)·inv_std·(x − mean)
        let a = scale as f32;
        let k = (scale * mean_dy_xhat * inv_std) as f32;
        let shift = (scale * mean_dy) as f32;
        let mean32 = mean as f32;
        for b in 0..batch {
            // SAFETY: plane (b, c) is written by channel c's task only.
            let dst = unsafe { shared.slice(offset(b), plane) };
            let (x, dy) = (&xs[offset(b)..][..plane], &dys[offset(b)..][..plane]);
            for ((d, &v), &g) in dst.iter_mut().zip(x).zip(dy) {
                *d = a * g - k * (v - mean32) - shift;
            }
        }
        (sum_dy_xhat as f32, sum_dy as f32)
    });
    let (dgamma, dbeta): (Vec<f32>, Vec<f32>) = sums.into_iter().unzip();
    let channels = dgamma.len();
    (
        f32_tensor(dx, dims),
        f32_tensor(dgamma, [channels]),
        f32_tensor(dbeta, [channels]),
    )
}
