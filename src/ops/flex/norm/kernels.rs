//! f32 kernels of [`super::FusedBatchNorm`] on the flex backend: one rayon task per channel.

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use crate::ops::flex::{SharedOut, dispatch_simd, f32_contiguous, f32_tensor};

/// Independent f64 partial sums per reduction: enough to hide the add latency and to fill
/// two AVX-512 registers, so that the compiler vectorises the sums.
const LANES: usize = 16;

/// Sums `f(x[i], y[i], z[i])` over three equally long slices into [`LANES`] partial sums,
/// added up at the end. The order depends on the length alone, so results do not depend on
/// the CPU or the thread count.
#[inline(always)]
fn lane_sum(x: &[f32], y: &[f32], z: &[f32], f: impl Fn(f32, f32, f32) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (xs, ys, zs) = (
        x.chunks_exact(LANES),
        y.chunks_exact(LANES),
        z.chunks_exact(LANES),
    );
    let tail: f64 = (xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .zip(zs.remainder()))
    .map(|((&a, &b), &c)| f(a, b, c))
    .sum();
    for ((xc, yc), zc) in xs.zip(ys).zip(zs) {
        let exact = "exact chunk";
        let xc: &[f32; LANES] = xc.try_into().expect(exact);
        let yc: &[f32; LANES] = yc.try_into().expect(exact);
        let zc: &[f32; LANES] = zc.try_into().expect(exact);
        for l in 0..LANES {
            acc[l] += f(xc[l], yc[l], zc[l]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The gradient that passes a ReLU whose output is `y`.
#[inline(always)]
fn through_relu(dy: f32, y: f32) -> f32 {
    if y > 0.0 { dy } else { 0.0 }
}

/// `Σ x` of one plane.
#[inline(always)]
fn plane_sum(x: &[f32]) -> f64 {
    lane_sum(x, x, x, |v, _, _| f64::from(v))
}

/// `Σ (x − mean)²` of one plane.
#[inline(always)]
fn plane_sq_dev(x: &[f32], mean: f64) -> f64 {
    lane_sum(x, x, x, |v, _, _| {
        (f64::from(v) - mean) * (f64::from(v) - mean)
    })
}

/// `(Σ g, Σ g·(x − mean))` of one plane, where `g` is `dy`, or, given a ReLU's output `y`
/// (not empty), the part of `dy` that passes the ReLU.
#[inline(always)]
fn plane_grad_sums(x: &[f32], dy: &[f32], y: &[f32], mean: f64) -> (f64, f64) {
    assert_eq!(x.len(), dy.len());
    if y.is_empty() {
        (
            lane_sum(dy, dy, dy, |g, _, _| f64::from(g)),
            lane_sum(x, dy, dy, |v, g, _| f64::from(g) * (f64::from(v) - mean)),
        )
    } else {
        let g = |d, y| f64::from(through_relu(d, y));
        (
            lane_sum(dy, y, y, |d, y, _| g(d, y)),
            lane_sum(x, dy, y, |v, d, y| g(d, y) * (f64::from(v) - mean)),
        )
    }
}

/// `dst = (x − mean)·scale + beta`.
#[inline(always)]
fn plane_normalise(x: &[f32], dst: &mut [f32], mean: f32, scale: f32, beta: f32) {
    for (d, &v) in dst.iter_mut().zip(x) {
        *d = (v - mean) * scale + beta;
    }
}

/// ReLU as `torch.relu`: negatives to 0, NaN kept.
#[inline(always)]
fn relu(v: f32) -> f32 {
    if v < 0.0 { 0.0 } else { v }
}

/// `dst = relu((x − mean)·scale + beta [+ residual])` (`residual` empty: none).
#[inline(always)]
fn plane_normalise_relu(
    x: &[f32],
    residual: &[f32],
    dst: &mut [f32],
    [mean, scale, beta]: [f32; 3],
) {
    if residual.is_empty() {
        for (d, &v) in dst.iter_mut().zip(x) {
            *d = relu((v - mean) * scale + beta);
        }
    } else {
        for ((d, &v), &r) in dst.iter_mut().zip(x).zip(residual) {
            *d = relu((v - mean) * scale + beta + r);
        }
    }
}

/// `dst = a·g − k·(x − mean) − shift`, where `g` is `dy`, or, given a ReLU's output `y` (not
/// empty), the part of `dy` that passes the ReLU, then also written to `passed` (unless
/// empty: the residual's gradient).
#[inline(always)]
fn plane_input_grad(
    [x, dy, y]: [&[f32]; 3],
    dst: &mut [f32],
    passed: &mut [f32],
    [a, k, mean, shift]: [f32; 4],
) {
    if y.is_empty() {
        for ((d, &v), &g) in dst.iter_mut().zip(x).zip(dy) {
            *d = a * g - k * (v - mean) - shift;
        }
    } else if passed.is_empty() {
        for (((d, &v), &g), &y) in dst.iter_mut().zip(x).zip(dy).zip(y) {
            *d = a * through_relu(g, y) - k * (v - mean) - shift;
        }
    } else {
        let ins = x.iter().zip(dy).zip(y);
        for ((d, p), ((&v, &g), &y)) in dst.iter_mut().zip(passed.iter_mut()).zip(ins) {
            let g = through_relu(g, y);
            *d = a * g - k * (v - mean) - shift;
            *p = g;
        }
    }
}

dispatch_simd!(sum_simd(x: &[f32]) -> f64 => plane_sum(x));
dispatch_simd!(sq_dev_simd(x: &[f32], mean: f64) -> f64 => plane_sq_dev(x, mean));
dispatch_simd!(grad_sums_simd(x: &[f32], dy: &[f32], y: &[f32], mean: f64) -> (f64, f64) => plane_grad_sums(x, dy, y, mean));
dispatch_simd!(normalise_simd(x: &[f32], dst: &mut [f32], mean: f32, scale: f32, beta: f32) => plane_normalise(x, dst, mean, scale, beta));
dispatch_simd!(normalise_relu_simd(x: &[f32], residual: &[f32], dst: &mut [f32], c: [f32; 3]) => plane_normalise_relu(x, residual, dst, c));
dispatch_simd!(input_grad_simd(inputs: [&[f32]; 3], dst: &mut [f32], passed: &mut [f32], c: [f32; 4]) => plane_input_grad(inputs, dst, passed, c));

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

/// What follows the normalisation in [`forward`].
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// Nothing: plain BatchNorm.
    None,
    /// `relu(bn(x))`.
    Relu,
    /// `relu(bn(x) + residual)`.
    AddRelu(&'a FlexTensor),
}

/// The ReLU epilogue seen from [`backward`].
#[derive(Debug, Clone, Copy)]
pub struct ReluGrad<'a> {
    /// The ReLU's output (its sign masks the gradient).
    pub output: &'a FlexTensor,
    /// Whether to return the gradient that passed the ReLU (a residual's gradient).
    pub keep_passed: bool,
}

/// Output, batch mean and biased batch variance.
pub fn forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    epilogue: Epilogue,
    epsilon: f64,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let dims = x.shape().to_vec();
    let residual = match epilogue {
        Epilogue::AddRelu(r) => {
            assert_eq!(
                r.shape().to_vec(),
                dims,
                "batch norm: residual shape differs"
            );
            Some(f32_contiguous(r))
        }
        _ => None,
    };
    let rs = residual.as_ref().map_or(&[][..], |r| r.storage::<f32>());
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
        let mean = planes().map(sum_simd).sum::<f64>() / count;
        let variance = planes().map(|x| sq_dev_simd(x, mean)).sum::<f64>() / count;
        let inv_std = 1.0 / (variance + epsilon).sqrt();
        // (x − mean)·scale + β: centring first keeps precision when |mean| ≫ std.
        let scale = (f64::from(gs[c]) * inv_std) as f32;
        let (mean32, beta) = (mean as f32, bs[c]);
        for b in 0..batch {
            // SAFETY: plane (b, c) is written by channel c's task only.
            let dst = unsafe { shared.slice(offset(b), plane) };
            let x = &xs[offset(b)..][..plane];
            match epilogue {
                Epilogue::None => normalise_simd(x, dst, mean32, scale, beta),
                Epilogue::Relu => normalise_relu_simd(x, &[], dst, [mean32, scale, beta]),
                Epilogue::AddRelu(_) => {
                    let r = &rs[offset(b)..][..plane];
                    normalise_relu_simd(x, r, dst, [mean32, scale, beta]);
                }
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
/// `dx = γ/σ · (g − mean(g) − x̂ · mean(g · x̂))`, `dγ = Σ g · x̂`, `dβ = Σ g`, where `g` is
/// the output gradient `grad`, or, after a ReLU epilogue (`relu`), `grad` where the ReLU's
/// output is positive (returned too when `keep_passed`: the residual's gradient).
pub fn backward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    mean: &FlexTensor,
    variance: &FlexTensor,
    epsilon: f64,
    grad: &FlexTensor,
    relu: Option<ReluGrad>,
) -> (FlexTensor, FlexTensor, FlexTensor, Option<FlexTensor>) {
    let dims = x.shape().to_vec();
    let keep_passed = relu.is_some_and(|r| r.keep_passed);
    let relu_output = relu.map(|r| r.output);
    let (x, gamma, mean, variance, grad) = (
        f32_contiguous(x),
        f32_contiguous(gamma),
        f32_contiguous(mean),
        f32_contiguous(variance),
        f32_contiguous(grad),
    );
    let relu_output = relu_output.map(f32_contiguous);
    let (xs, gs, ms, vs, dys) = (
        x.storage::<f32>(),
        gamma.storage::<f32>(),
        mean.storage::<f32>(),
        variance.storage::<f32>(),
        grad.storage::<f32>(),
    );
    let ys = relu_output.as_ref().map(|y| y.storage::<f32>());
    let shape @ (batch, _, plane) = layout(&x);
    let count = (batch * plane) as f64;
    let mut dx = vec![0.0f32; xs.len()];
    // The gradient that passed the ReLU is only kept for a residual.
    let mut passed = vec![0.0f32; if keep_passed { xs.len() } else { 0 }];
    let shared = SharedOut::new(&mut dx);
    let shared_passed = SharedOut::new(&mut passed);
    let sums = per_channel(shape, |c, offset| {
        let mean = f64::from(ms[c]);
        let inv_std = 1.0 / (f64::from(vs[c]) + epsilon).sqrt();
        let planes = |b: usize| {
            let y = ys.map_or(&[][..], |ys| &ys[offset(b)..][..plane]);
            [&xs[offset(b)..][..plane], &dys[offset(b)..][..plane], y]
        };
        let (mut sum_dy, mut sum_dy_xhat) = (0.0f64, 0.0f64);
        for b in 0..batch {
            let [x, dy, y] = planes(b);
            let (dy_sum, dy_dev_sum) = grad_sums_simd(x, dy, y, mean);
            sum_dy += dy_sum;
            sum_dy_xhat += dy_dev_sum * inv_std;
        }
        let scale = f64::from(gs[c]) * inv_std;
        let (mean_dy, mean_dy_xhat) = (sum_dy / count, sum_dy_xhat / count);
        // dx = scale·dy − scale·mean(dy) − scale·mean(dy·x̂)·inv_std·(x − mean)
        let a = scale as f32;
        let k = (scale * mean_dy_xhat * inv_std) as f32;
        let shift = (scale * mean_dy) as f32;
        let mean32 = mean as f32;
        for b in 0..batch {
            // SAFETY: plane (b, c) of `dx` and of `passed` is written by channel c's task only.
            let dst = unsafe { shared.slice(offset(b), plane) };
            let passed = if keep_passed {
                unsafe { shared_passed.slice(offset(b), plane) }
            } else {
                &mut []
            };
            input_grad_simd(planes(b), dst, passed, [a, k, mean32, shift]);
        }
        (sum_dy_xhat as f32, sum_dy as f32)
    });
    let (dgamma, dbeta): (Vec<f32>, Vec<f32>) = sums.into_iter().unzip();
    let channels = dgamma.len();
    let passed = keep_passed.then(|| f32_tensor(passed, dims.clone()));
    (
        f32_tensor(dx, dims),
        f32_tensor(dgamma, [channels]),
        f32_tensor(dbeta, [channels]),
        passed,
    )
}
