//! The f32 forward and backward passes behind [`super::GemmConv`] on the flex backend: chunks
//! of images through im2col ([`super::im2col`]) and GEMMs ([`super::gemm`]), parallel over
//! chunks with rayon.

use burn::backend::flex::FlexTensor;

use super::gemm::{Mat, matmul, matmul_strided};
use super::geometry::{Chunk, Geometry};
use super::im2col::{SCRATCH, col2im, col2im_pixel_major, im2col, im2col_pixel_major, swap_outer};
use super::transpose::transpose;
use crate::ops::flex::{f32_contiguous, f32_tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// Input channels from which the weight gradient runs one GEMM per kernel tap (see
/// `backward`).
const PER_TAP_MIN_CHANNELS: usize = 128;

/// Groups of chunks whose weight gradients are summed separately (then in order).
const WEIGHT_GROUPS: usize = 4;

/// The input gradient goes pixel-major when the batch has this many output pixels per
/// output channel (see `backward`).
const PIXEL_MAJOR_MIN_RATIO: usize = 8;

/// Fewest output pixels per chunk of the weight gradient (the GEMM's summed dimension).
const WEIGHT_MIN_PIXELS: usize = 512;

/// `y [B, O, Ho, Wo] = conv(x, weight)`, on the live window of the kernel.
pub fn forward(x: &FlexTensor, weight: &FlexTensor, g: &Geometry) -> FlexTensor {
    match g.live_window() {
        Some(live) => forward_full(x, &live.crop(weight, g), &live.geometry),
        None => forward_full(x, weight, g),
    }
}

/// Gradients of `x` and `weight` given the output gradient `grad [B, O, Ho, Wo]`, on the
/// live window of the kernel (the other taps' weight gradient is 0).
pub fn backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    g: &Geometry,
    need_x: bool,
    need_w: bool,
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    match g.live_window() {
        Some(live) => {
            let weight = live.crop(weight, g);
            let (dx, dw) = backward_full(x, &weight, grad, &live.geometry, need_x, need_w);
            (dx, dw.map(|dw| live.expand(&dw, g)))
        }
        None => backward_full(x, weight, grad, g, need_x, need_w),
    }
}

/// `y [B, O, Ho, Wo] = conv(x, weight)` with the whole kernel, one chunk of images per
/// rayon task.
fn forward_full(x: &FlexTensor, weight: &FlexTensor, g: &Geometry) -> FlexTensor {
    let (x, weight) = (f32_contiguous(x), f32_contiguous(weight));
    let (x, w) = (x.storage::<f32>(), weight.storage::<f32>());
    let (k, o, plane) = (g.rows(), g.out_channels, g.out_plane());
    let per_chunk = g.images_per_chunk();
    let parallel = g.gemm_in_parallel();
    let mut out = vec![0.0f32; g.batch * o * plane];
    out.par_chunks_mut(per_chunk * o * plane)
        .enumerate()
        .for_each(|(index, out)| {
            let chunk = Chunk {
                first: index * per_chunk,
                count: out.len() / (o * plane),
            };
            let n = chunk.count * plane;
            let (mut col, mut y) = SCRATCH.take();
            col.resize(col.len().max(k * n), 0.0);
            im2col(x, g, chunk, &mut col[..k * n]);
            let w = Mat {
                data: w,
                rs: k as isize,
                cs: 1,
            };
            let col_m = Mat {
                data: &col,
                rs: n as isize,
                cs: 1,
            };
            if chunk.count == 1 {
                matmul((o, n, k), out, w, col_m, false, parallel);
            } else {
                y.resize(y.len().max(o * n), 0.0);
                matmul((o, n, k), &mut y, w, col_m, false, parallel);
                swap_outer(&y, o, chunk.count, plane, out);
            }
            SCRATCH.set((col, y));
        });
    f32_tensor(out, [g.batch, o, g.out_height, g.out_width])
}

/// Gradients of `x` and `weight` given the output gradient `grad [B, O, Ho, Wo]`, with the
/// whole kernel.
fn backward_full(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    g: &Geometry,
    need_x: bool,
    need_w: bool,
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let (x, weight, grad) = (
        f32_contiguous(x),
        f32_contiguous(weight),
        f32_contiguous(grad),
    );
    let (x, w, dy) = (
        x.storage::<f32>(),
        weight.storage::<f32>(),
        grad.storage::<f32>(),
    );
    let (k, o, plane) = (g.rows(), g.out_channels, g.out_plane());
    let per_chunk = g.images_per_chunk();
    let parallel = g.gemm_in_parallel();
    let split = |per_chunk: usize| -> Vec<Chunk> {
        (0..g.batch)
            .step_by(per_chunk)
            .map(|first| Chunk {
                first,
                count: per_chunk.min(g.batch - first),
            })
            .collect()
    };
    let chunks = split(per_chunk);
    // One chunk's output gradient as a matrix [O × count·P] (copied only for several images).
    let dy_chunk = |chunk: Chunk| -> Cow<[f32]> {
        let src = &dy[chunk.first * o * plane..][..chunk.count * o * plane];
        if chunk.count == 1 {
            Cow::Borrowed(src)
        } else {
            let mut m = vec![0.0f32; src.len()];
            swap_outer(src, chunk.count, o, plane, &mut m);
            Cow::Owned(m)
        }
    };

    let grad_w = need_w.then(|| {
        // dW[O × K] = Σ over chunks of dY[O × n] · colᵀ[n × K], computed as dWᵀ from the
        // pixel-major im2col (see `im2col_pixel_major`). The chunks are summed in
        // WEIGHT_GROUPS fixed groups, then the groups in order, so the result does not depend
        // on thread scheduling (a resumed run replays bit for bit).
        // At least WEIGHT_MIN_PIXELS pixels per chunk: each chunk's GEMM reads and writes the
        // whole gradient [O × K] once, so fewer pixels would make it memory-bound.
        let chunks = split(per_chunk.max(WEIGHT_MIN_PIXELS.div_ceil(plane.max(1))));
        let per_group = chunks.len().div_ceil(WEIGHT_GROUPS).max(1);
        // With fewer groups than threads the GEMMs themselves use every thread (gemm does not
        // split the summed dimension, so this does not change the result).
        let groups = chunks.len().div_ceil(per_group);
        let parallel = parallel || groups < rayon::current_num_threads();
        let in_image = g.channels * g.height * g.width;
        let taps = g.kernel[0] * g.kernel[1];
        // Wide layers write the gradient per kernel tap straight into [O][(c, i, j)]; narrow
        // ones in one GEMM as [O][(i, j, c)], reordered at the end.
        let per_tap = taps > 1 && g.channels >= PER_TAP_MIN_CHANNELS;
        let partials: Vec<Vec<f32>> = chunks
            .par_chunks(per_group)
            .map(|group| {
                let mut dw = vec![0.0f32; o * k];
                for &chunk in group {
                    let n = chunk.count * plane;
                    let dy = dy_chunk(chunk);
                    // dWᵀ[(i, j, c) × O] += col_tᵀ · dYᵀ, stored as dw[O][(i, j, c)].
                    let (mut x_t, mut col_t) = SCRATCH.take();
                    x_t.resize(x_t.len().max(chunk.count * in_image), 0.0);
                    col_t.resize(col_t.len().max(n * k), 0.0);
                    im2col_pixel_major(x, g, chunk, &mut x_t, &mut col_t[..n * k]);
                    let rhs = Mat {
                        data: &dy,
                        rs: 1,
                        cs: n as isize,
                    };
                    if per_tap {
                        // One GEMM per tap t writes rows (c, t) of dW[O][(c, i, j)] in place.
                        // With few chunks the threads split the output channels between them
                        // (whole rows of dW each) rather than each GEMM.
                        let parts = if parallel {
                            rayon::current_num_threads()
                        } else {
                            1
                        };
                        let per_part = o.div_ceil(parts).max(1);
                        dw.par_chunks_mut(per_part * k)
                            .enumerate()
                            .for_each(|(part, dw)| {
                                let first = part * per_part;
                                let outs = dw.len() / k;
                                let rhs = Mat {
                                    data: &dy[first * n..],
                                    ..rhs
                                };
                                for t in 0..taps {
                                    let lhs = Mat {
                                        data: &col_t[t * g.channels..],
                                        rs: 1,
                                        cs: k as isize,
                                    };
                                    let (m, dst) = (g.channels, &mut dw[t..]);
                                    matmul_strided(
                                        (m, outs, n),
                                        dst,
                                        (taps, k),
                                        lhs,
                                        rhs,
                                        true,
                                        false,
                                    );
                                }
                            });
                    } else {
                        let lhs = Mat {
                            data: &col_t,
                            rs: 1,
                            cs: k as isize,
                        };
                        matmul_strided((k, o, n), &mut dw, (1, k), lhs, rhs, true, parallel);
                    }
                    SCRATCH.set((x_t, col_t));
                }
                dw
            })
            .collect();
        let mut partials = partials.into_iter();
        let mut dw = partials.next().unwrap_or_else(|| vec![0.0f32; o * k]);
        for partial in partials {
            dw.iter_mut().zip(&partial).for_each(|(a, b)| *a += b);
        }
        if !per_tap {
            // [O][(i, j, c)] → [O][(c, i, j)]
            let mut reordered = vec![0.0f32; o * k];
            dw.par_chunks_exact(k)
                .zip(reordered.par_chunks_exact_mut(k))
                .for_each(|(src, dst)| transpose(src, taps, g.channels, dst));
            dw = reordered;
        }
        f32_tensor(dw, [o, g.channels, g.kernel[0], g.kernel[1]])
    });

    let grad_x = need_x.then(|| {
        let in_image = g.channels * g.height * g.width;
        let mut dx = vec![0.0f32; g.batch * in_image];
        // Pixel-major (runs of C floats in col2im) needs the weight reordered, O·K floats:
        // worth it only when the im2col is much larger than the weight.
        let pixel_major = g.batch * plane >= PIXEL_MAJOR_MIN_RATIO * o;
        let taps = g.kernel[0] * g.kernel[1];
        let mut w_pm = Vec::new();
        if pixel_major {
            // The weight as [O][(i, j, c)], the column order of the pixel-major im2col.
            w_pm = vec![0.0f32; o * k];
            w.par_chunks_exact(k)
                .zip(w_pm.par_chunks_exact_mut(k))
                .for_each(|(src, dst)| transpose(src, g.channels, taps, dst));
        }
        dx.par_chunks_mut(per_chunk * in_image)
            .zip(&chunks)
            .for_each(|(dx, &chunk)| {
                let n = chunk.count * plane;
                let dy = dy_chunk(chunk);
                let dy = Mat {
                    data: &dy,
                    rs: n as isize,
                    cs: 1,
                };
                if pixel_major {
                    // dcol_t[n × (i, j, c)] = dYᵀ · W', computed as its transpose
                    // [(i, j, c) × n] (column-major) = W'ᵀ[(i, j, c) × O] · dY[O × n].
                    let w_t = Mat {
                        data: &w_pm,
                        rs: 1,
                        cs: k as isize,
                    };
                    let (mut dx_t, mut dcol_t) = SCRATCH.take();
                    dcol_t.resize(dcol_t.len().max(n * k), 0.0);
                    matmul_strided((k, n, o), &mut dcol_t, (1, k), w_t, dy, false, parallel);
                    dx_t.resize(dx_t.len().max(chunk.count * in_image), 0.0);
                    col2im_pixel_major(&dcol_t[..n * k], g, chunk, &mut dx_t, dx);
                    SCRATCH.set((dx_t, dcol_t));
                } else {
                    // dcol[K × n] = Wᵀ[K × O] · dY[O × n]
                    let w_t = Mat {
                        data: w,
                        rs: 1,
                        cs: k as isize,
                    };
                    let mut dcol = vec![0.0f32; k * n];
                    matmul((k, n, o), &mut dcol, w_t, dy, false, parallel);
                    col2im(&dcol, g, chunk, dx);
                }
            });
        f32_tensor(dx, [g.batch, g.channels, g.height, g.width])
    });
    (grad_x, grad_w)
}
