//! f32 kernels of [`super::FastMaxPool`] on the flex backend: one rayon task per run of
//! `[B·C]` planes, each output keeping the in-plane offset of its maximum.

use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use crate::ops::flex::{dispatch_simd, f32_contiguous, f32_tensor};

/// Shapes, kernel, stride and padding of one 2-D max pooling (no dilation, floor mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGeometry {
    /// Input `[B, C, H, W]`.
    pub input: [usize; 4],
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[ph, pw]`, on both sides.
    pub padding: [usize; 2],
}

impl PoolGeometry {
    /// `[Ho, Wo]` (PyTorch's floor mode). Needs `size + 2·pad ≥ kernel` on both axes.
    pub fn output(&self) -> [usize; 2] {
        let out = |i: usize| {
            (self.input[2 + i] + 2 * self.padding[i] - self.kernel[i]) / self.stride[i] + 1
        };
        [out(0), out(1)]
    }

    fn planes(&self) -> usize {
        self.input[0] * self.input[1]
    }
}

/// Planes per rayon task: about 64 Ki input values each.
fn planes_per_task(plane: usize) -> usize {
    (65_536 / plane.max(1)).max(1)
}

/// The first index in `0..len` of window `o` (stride `s`, padding `p`, size `k`), clipped,
/// and one past its last.
fn window(o: usize, k: usize, s: usize, p: usize, len: usize) -> (usize, usize) {
    let start = (o * s) as isize - p as isize;
    let end = (start + k as isize).min(len as isize);
    (start.max(0) as usize, end.max(0) as usize)
}

/// Pools `planes` whole planes of `src` into `dst` (and `idx` unless it is empty).
#[inline(always)]
fn pool_planes(g: &PoolGeometry, src: &[f32], dst: &mut [f32], idx: &mut [u32]) {
    let [_, _, h, w] = g.input;
    let [ho, wo] = g.output();
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    // Each input row is split into its `sw` column phases (padding as −∞), so that kernel
    // column j of every output of a row is one contiguous run: `phase[j % sw][ow + j / sw]`.
    let phase_len = wo + (kw - 1) / sw;
    let mut phases = vec![f32::NEG_INFINITY; sw * phase_len];
    let mut at = vec![0u32; wo];
    for (p, (src, dst)) in src
        .chunks_exact(h * w)
        .zip(dst.chunks_exact_mut(ho * wo))
        .enumerate()
    {
        for oh in 0..ho {
            let (h0, h1) = window(oh, kh, sh, ph, h);
            let best = &mut dst[oh * wo..][..wo];
            best.fill(f32::NEG_INFINITY);
            at.fill((h0 * w) as u32);
            for ih in h0..h1 {
                let row = &src[ih * w..][..w];
                for (t, phase) in phases.chunks_exact_mut(phase_len).enumerate() {
                    for (i, slot) in phase.iter_mut().enumerate() {
                        let col = (i * sw + t).wrapping_sub(pw);
                        *slot = row.get(col).copied().unwrap_or(f32::NEG_INFINITY);
                    }
                }
                for j in 0..kw {
                    let run = &phases[(j % sw) * phase_len + j / sw..][..wo];
                    // Offset of output 0's candidate (may lie in the padding: never chosen).
                    let base = (ih * w + j) as i64 - pw as i64;
                    // PyTorch's rule `v > max || isnan(v)` as selects over the whole row, so
                    // that it vectorises (a branch would mispredict every other time).
                    let lanes = best.iter_mut().zip(at.iter_mut()).zip(run).zip(0i64..);
                    for (((b, a), &v), ow) in lanes {
                        let better = v > *b || v.is_nan();
                        *b = if better { v } else { *b };
                        *a = if better {
                            (base + ow * sw as i64) as u32
                        } else {
                            *a
                        };
                    }
                }
            }
            if !idx.is_empty() {
                idx[(p * ho + oh) * wo..][..wo].copy_from_slice(&at);
            }
        }
    }
}

// AVX-512 code of this loop measured slower than AVX2's; plain x86-64 code is 7x slower.
dispatch_simd!(avx2 pool_planes_simd(g: &PoolGeometry, src: &[f32], dst: &mut [f32], idx: &mut [u32]) => pool_planes(g, src, dst, idx));

/// Max of each window of `x` and, when `keep_indices`, the in-plane offset of the maximum
/// (the first one, or the last NaN: PyTorch's rule).
pub fn forward(x: &FlexTensor, g: &PoolGeometry, keep_indices: bool) -> (FlexTensor, Vec<u32>) {
    let x = f32_contiguous(x);
    let xs = x.storage::<f32>();
    let [b, c, h, w] = g.input;
    let [ho, wo] = g.output();
    let (in_plane, out_plane) = (h * w, ho * wo);
    let per_task = planes_per_task(in_plane);
    let mut out = vec![0.0f32; g.planes() * out_plane];
    let mut indices = vec![0u32; if keep_indices { out.len() } else { 0 }];
    let tasks = out
        .par_chunks_mut(per_task * out_plane)
        .zip(xs.par_chunks(per_task * in_plane));
    if keep_indices {
        tasks
            .zip(indices.par_chunks_mut(per_task * out_plane))
            .for_each(|((dst, src), idx)| pool_planes_simd(g, src, dst, idx));
    } else {
        tasks.for_each(|(dst, src)| pool_planes_simd(g, src, dst, &mut []));
    }
    (f32_tensor(out, [b, c, ho, wo]), indices)
}

/// The input gradient: each output gradient added at its maximum's offset.
pub fn backward(grad: &FlexTensor, indices: &[u32], g: &PoolGeometry) -> FlexTensor {
    let grad = f32_contiguous(grad);
    let dys = grad.storage::<f32>();
    let [_, _, h, w] = g.input;
    let [ho, wo] = g.output();
    let (in_plane, out_plane) = (h * w, ho * wo);
    assert_eq!(
        dys.len(),
        indices.len(),
        "max pool backward: gradient and indices differ"
    );
    let per_task = planes_per_task(in_plane);
    let mut dx = vec![0.0f32; g.planes() * in_plane];
    dx.par_chunks_mut(per_task * in_plane)
        .zip(dys.par_chunks(per_task * out_plane))
        .zip(indices.par_chunks(per_task * out_plane))
        .for_each(|((dx, dy), idx)| {
            for ((dx, dy), idx) in dx
                .chunks_mut(in_plane)
                .zip(dy.chunks(out_plane))
                .zip(idx.chunks(out_plane))
            {
                for (&g, &i) in dy.iter().zip(idx) {
                    dx[i as usize] += g;
                }
            }
        });
    f32_tensor(dx, g.input)
}
