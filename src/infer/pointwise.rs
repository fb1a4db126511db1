//! Element-wise work of the inference plan: the activations fused into a convolution's or a
//! linear layer's output pass, and the few element-wise steps left on their own (a residual
//! addition that follows no convolution, squeeze-and-excitation's channel scaling).

use rayon::prelude::*;

use crate::ops::flex::activation::{relu6_shifted, sigmoid};
use crate::ops::flex::dispatch_simd;

/// An activation applied where a value is written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    /// None.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `x · clamp(x + 3, 0, 6) / 6`.
    Hardswish,
    /// `clamp(alpha · x + beta, 0, 1)` (ONNX's `HardSigmoid`).
    Hardsigmoid { alpha: f32, beta: f32 },
    /// `1 / (1 + e^−x)`.
    Sigmoid,
    /// `x · sigmoid(x)`.
    Silu,
}

/// `act` on `x`, inlined into a caller already compiled for the CPU's vectors.
#[inline(always)]
pub(super) fn apply_slice(act: Act, x: &mut [f32]) {
    match act {
        Act::Identity => {}
        Act::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
        // PyTorch (and kd's training kernel) divide `x · clamp` by 6; a division costs
        // several multiplications' time, so this multiplies by the nearest float to 1/6
        // (a rounding apart).
        Act::Hardswish => x
            .iter_mut()
            .for_each(|v| *v = *v * relu6_shifted(*v) * (1.0 / 6.0)),
        Act::Hardsigmoid { alpha, beta } => x
            .iter_mut()
            .for_each(|v| *v = (alpha * *v + beta).clamp(0.0, 1.0)),
        Act::Sigmoid => x.iter_mut().for_each(|v| *v = sigmoid(*v)),
        Act::Silu => x.iter_mut().for_each(|v| *v *= sigmoid(*v)),
    }
}

dispatch_simd!(apply_simd(act: Act, x: &mut [f32]) => apply_slice(act, x));

/// What the AVX-512 kernels share: the activations they apply in registers before their
/// one store, and the lane mask of a partial vector.
#[cfg(target_arch = "x86_64")]
pub(super) mod vector {
    use std::arch::x86_64::*;

    use super::Act;

    /// Whether `act` is applied in registers (the others by [`Act::apply`] after the
    /// store).
    pub fn applies(act: Act) -> bool {
        matches!(act, Act::Identity | Act::Relu | Act::Hardswish)
    }

    /// The lanes of a vector of `len` values from `from` that lie below `len`.
    #[inline(always)]
    pub fn lanes(len: usize, from: usize) -> u16 {
        if len - from >= 16 {
            u16::MAX
        } else {
            (1u16 << (len - from)) - 1
        }
    }

    /// `act(v)` where [`applies`] holds (else `v`), as `apply_slice` computes it.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    pub unsafe fn activate(act: Act, v: __m512) -> __m512 {
        // SAFETY: arithmetic on registers; the caller has AVX-512F.
        unsafe {
            match act {
                Act::Relu => _mm512_max_ps(v, _mm512_setzero_ps()),
                Act::Hardswish => {
                    let t = _mm512_add_ps(v, _mm512_set1_ps(3.0));
                    let t =
                        _mm512_min_ps(_mm512_max_ps(t, _mm512_setzero_ps()), _mm512_set1_ps(6.0));
                    _mm512_mul_ps(_mm512_mul_ps(v, t), _mm512_set1_ps(1.0 / 6.0))
                }
                _ => v,
            }
        }
    }
}

/// `out = act(out + bias (+ residual))` on one row of output channels after its product,
/// inlined into a caller already compiled for the CPU's vectors.
#[inline(always)]
pub(super) fn finish_slice(out: &mut [f32], bias: &[f32], residual: Option<&[f32]>, act: Act) {
    match residual {
        Some(r) => out
            .iter_mut()
            .zip(bias.iter().zip(r))
            .for_each(|(o, (b, r))| *o += b + r),
        None => out.iter_mut().zip(bias).for_each(|(o, b)| *o += b),
    }
    apply_slice(act, out);
}

#[inline(always)]
fn finish_rows_slice(out: &mut [f32], bias: &[f32], residual: Option<&[f32]>, act: Act) {
    let n = bias.len();
    match residual {
        Some(r) => out
            .chunks_exact_mut(n)
            .zip(r.chunks_exact(n))
            .for_each(|(out, r)| finish_slice(out, bias, Some(r), act)),
        None => out
            .chunks_exact_mut(n)
            .for_each(|out| finish_slice(out, bias, None, act)),
    }
}

dispatch_simd!(finish_rows_simd(out: &mut [f32], bias: &[f32], residual: Option<&[f32]>, act: Act) => finish_rows_slice(out, bias, residual, act));

/// `out = act(out + bias (+ residual))` on rows of output channels after their product,
/// `out [rows, bias.len()]` (and the residual alike): one call for a whole tile of narrow
/// rows, which one call per row would cost more than the work.
pub fn finish_rows(out: &mut [f32], bias: &[f32], residual: Option<&[f32]>, act: Act) {
    assert!(out.len().is_multiple_of(bias.len().max(1)));
    assert!(residual.is_none_or(|r| r.len() == out.len()));
    finish_rows_simd(out, bias, residual, act);
}

/// Elements per rayon task of the stand-alone passes.
const TASK: usize = 1 << 14;

impl Act {
    /// `x ← act(x)`, on the calling thread (a tile that is still in cache).
    pub fn apply(self, x: &mut [f32]) {
        if self != Act::Identity {
            apply_simd(self, x);
        }
    }

    /// `x ← act(x)`, in parallel.
    pub fn apply_par(self, x: &mut [f32]) {
        if self != Act::Identity {
            x.par_chunks_mut(TASK).for_each(|x| apply_simd(self, x));
        }
    }
}

/// `out = act(a + b)`.
pub fn add(a: &[f32], b: &[f32], act: Act, out: &mut [f32]) {
    out.par_chunks_mut(TASK)
        .zip(a.par_chunks(TASK).zip(b.par_chunks(TASK)))
        .for_each(|(out, (a, b))| {
            out.iter_mut()
                .zip(a.iter().zip(b))
                .for_each(|(o, (a, b))| *o = a + b);
            act.apply(out);
        });
}

/// `out[i, c] = x[i, c] · scale[image of i, c]` for `x` of `images` images of `pixels`
/// pixels with `channels` channels each (NHWC), `scale [images, channels]`.
pub fn scale_channels(
    x: &[f32],
    scale: &[f32],
    (pixels, channels): (usize, usize),
    out: &mut [f32],
) {
    out.par_chunks_mut(pixels * channels)
        .zip(x.par_chunks(pixels * channels))
        .zip(scale.par_chunks(channels))
        .for_each(|((out, x), scale)| {
            for (out, x) in out.chunks_mut(channels).zip(x.chunks(channels)) {
                out.iter_mut()
                    .zip(x.iter().zip(scale))
                    .for_each(|(o, (x, s))| *o = x * s);
            }
        });
}
