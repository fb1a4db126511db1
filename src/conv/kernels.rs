//! The f32 kernels behind [`super::GemmConv`] on the flex backend: im2col, col2im, layout
//! permutes (all parallel over rows with rayon) and the `gemm` crate for the products.

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;

use crate::flex::{dispatch_simd, f32_contiguous, f32_tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// Shapes, stride and padding of one convolution.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    out_channels: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    out_height: usize,
    out_width: usize,
}

impl Geometry {
    /// The geometry of `x [B, C, H, W]` convolved with `weight [O, C, kh, kw]`.
    pub fn new<T: TensorMetadata>(
        x: &T,
        weight: &T,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> Self {
        let [batch, channels, height, width] = x.shape().dims();
        let [out_channels, weight_channels, kh, kw] = weight.shape().dims();
        assert_eq!(
            channels, weight_channels,
            "gemm_conv2d: input has {channels} channels, weight expects {weight_channels}"
        );
        let out = |size: usize, k: usize, s: usize, p: usize| {
            assert!(
                size + 2 * p >= k,
                "gemm_conv2d: kernel {k} larger than padded input"
            );
            (size + 2 * p - k) / s + 1
        };
        Self {
            batch,
            channels,
            height,
            width,
            out_channels,
            kernel: [kh, kw],
            stride,
            padding,
            out_height: out(height, kh, stride[0], padding[0]),
            out_width: out(width, kw, stride[1], padding[1]),
        }
    }

    /// Rows of the im2col matrix: `C · kh · kw`.
    fn rows(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// Output pixels of one image.
    fn out_plane(&self) -> usize {
        self.out_height * self.out_width
    }
}

/// Output positions `o` along one axis (of `out`) whose input index `o·s + k − p` lies in
/// `0..size`, for kernel tap `k`, stride `s` and padding `p`: the range `lo..hi`.
pub(super) fn valid_range(out: usize, size: usize, k: usize, s: usize, p: usize) -> (usize, usize) {
    // o·s + k ≥ p  and  o·s + k − p ≤ size − 1
    let lo = p.saturating_sub(k).div_ceil(s);
    let hi = if size + p > k {
        ((size + p - k - 1) / s + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Floats in one chunk's im2col matrix (1 MiB, so that it stays in cache while the
/// GEMM reads it).
const CHUNK_FLOATS: usize = 1 << 18;

/// The number of chunks is rounded up to a multiple of this (see `images_per_chunk`).
const CHUNK_MULTIPLE: usize = 4;

/// Groups of chunks whose weight gradients are summed separately (then in order).
const WEIGHT_GROUPS: usize = 4;

/// The input gradient goes pixel-major when the batch has this many output pixels per
/// output channel (see `backward`).
const PIXEL_MAJOR_MIN_RATIO: usize = 8;

/// Fewest output pixels per chunk of the weight gradient (the GEMM's summed dimension).
const WEIGHT_MIN_PIXELS: usize = 512;

/// A run of whole images `first..first + count` processed together.
#[derive(Clone, Copy)]
struct Chunk {
    first: usize,
    count: usize,
}

impl Geometry {
    /// Images per chunk: about [`CHUNK_FLOATS`] of im2col each, at least one image, and a
    /// chunk count that is a multiple of [`CHUNK_MULTIPLE`] so that the chunks spread evenly
    /// over 1, 2 or 4 threads. The chunking depends on the shapes only, never on the thread
    /// count, so a machine gives the same results whatever its thread count (other CPUs may
    /// differ in the last bits: gemm's blocking and microkernels follow the CPU).
    fn images_per_chunk(&self) -> usize {
        let batch = self.batch.max(1);
        let total = batch * (self.rows() * self.out_plane()).max(1);
        let chunks = total
            .div_ceil(CHUNK_FLOATS)
            .next_multiple_of(CHUNK_MULTIPLE);
        batch.div_ceil(chunks.min(batch))
    }

    /// Whether the GEMMs should use all threads themselves: only when there are fewer chunks
    /// than threads to spread the chunks over.
    fn gemm_in_parallel(&self) -> bool {
        self.batch.div_ceil(self.images_per_chunk()) < rayon::current_num_threads()
    }
}

/// im2col of one chunk into the zeroed `col [C·kh·kw, count·Ho·Wo]`:
/// `col[(c, i, j), (b, oh, ow)] = x[first + b, c, oh·sh + i − ph, ow·sw + j − pw]` (0 outside).
fn im2col(x: &[f32], g: &Geometry, chunk: Chunk, col: &mut [f32]) {
    let (plane, in_plane) = (g.out_plane(), g.height * g.width);
    let n = chunk.count * plane;
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    for (row, dst) in col.chunks_mut(n).enumerate() {
        let (c, i, j) = (row / (kh * kw), row / kw % kh, row % kw);
        let (oh_lo, oh_hi) = valid_range(g.out_height, g.height, i, sh, ph);
        let (ow_lo, ow_hi) = valid_range(g.out_width, g.width, j, sw, pw);
        if ow_lo >= ow_hi {
            continue; // this kernel column only ever sees padding
        }
        for b in 0..chunk.count {
            let src = &x[((chunk.first + b) * g.channels + c) * in_plane..][..in_plane];
            let dst = &mut dst[b * plane..][..plane];
            for oh in oh_lo..oh_hi {
                let src_row = &src[(oh * sh + i - ph) * g.width..][..g.width];
                let dst_row = &mut dst[oh * g.out_width..][..g.out_width];
                if sw == 1 {
                    let start = ow_lo + j - pw;
                    dst_row[ow_lo..ow_hi].copy_from_slice(&src_row[start..start + ow_hi - ow_lo]);
                } else {
                    for ow in ow_lo..ow_hi {
                        dst_row[ow] = src_row[ow * sw + j - pw];
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds one chunk's `dcol` into its images' gradient
/// `dx [count, C, H, W]` (which starts at zero).
fn col2im(dcol: &[f32], g: &Geometry, chunk: Chunk, dx: &mut [f32]) {
    let (plane, in_plane) = (g.out_plane(), g.height * g.width);
    let n = chunk.count * plane;
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    for (row, src) in dcol.chunks(n).enumerate() {
        let (c, i, j) = (row / (kh * kw), row / kw % kh, row % kw);
        let (oh_lo, oh_hi) = valid_range(g.out_height, g.height, i, sh, ph);
        let (ow_lo, ow_hi) = valid_range(g.out_width, g.width, j, sw, pw);
        if ow_lo >= ow_hi {
            continue; // this kernel column only ever sees padding
        }
        for b in 0..chunk.count {
            let src = &src[b * plane..][..plane];
            let dst = &mut dx[(b * g.channels + c) * in_plane..][..in_plane];
            for oh in oh_lo..oh_hi {
                let src_row = &src[oh * g.out_width..][..g.out_width];
                let dst_row = &mut dst[(oh * sh + i - ph) * g.width..][..g.width];
                if sw == 1 {
                    let start = ow_lo + j - pw;
                    let dst_run = &mut dst_row[start..start + ow_hi - ow_lo];
                    for (d, s) in dst_run.iter_mut().zip(&src_row[ow_lo..ow_hi]) {
                        *d += s;
                    }
                } else {
                    for ow in ow_lo..ow_hi {
                        dst_row[ow * sw + j - pw] += src_row[ow];
                    }
                }
            }
        }
    }
}

/// `dst[c · rows + r] = src[r · cols + c]`, in cache-sized tiles.
#[inline(always)]
fn transpose_tiles(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 16;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                let dst = &mut dst[c * rows..][..rows];
                for r in r0..(r0 + TILE).min(rows) {
                    dst[r] = src[r * cols + c];
                }
            }
        }
    }
}

dispatch_simd!(transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) => transpose_tiles(src, rows, cols, dst));

/// The im2col of one chunk with pixels as rows and `(i, j, c)` as columns:
/// `col_t[(b, oh, ow), (i, j, c)] = x[first + b, c, oh·sh + i − ph, ow·sw + j − pw]`
/// (0 outside), written whole into `col_t [count·Ho·Wo, kh·kw·C]`. Each entry is a copy of C
/// contiguous floats from the chunk transposed to channels-last (`x_t`, scratch of
/// `count·H·W·C`). This is the layout the weight-gradient GEMM reads without repacking.
fn im2col_pixel_major(x: &[f32], g: &Geometry, chunk: Chunk, x_t: &mut [f32], col_t: &mut [f32]) {
    let (c_in, in_plane) = (g.channels, g.height * g.width);
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    let row_len = kh * kw * c_in;
    for b in 0..chunk.count {
        let image = &x[(chunk.first + b) * c_in * in_plane..][..c_in * in_plane];
        transpose(
            image,
            c_in,
            in_plane,
            &mut x_t[b * in_plane * c_in..][..in_plane * c_in],
        );
    }
    for (p, row) in col_t.chunks_exact_mut(row_len).enumerate() {
        let (b, q) = (p / g.out_plane(), p % g.out_plane());
        let (oh, ow) = (q / g.out_width, q % g.out_width);
        for i in 0..kh {
            let ih = (oh * sh + i).wrapping_sub(ph);
            for j in 0..kw {
                let iw = (ow * sw + j).wrapping_sub(pw);
                let dst = &mut row[(i * kw + j) * c_in..][..c_in];
                if ih < g.height && iw < g.width {
                    dst.copy_from_slice(&x_t[(b * in_plane + ih * g.width + iw) * c_in..][..c_in]);
                } else {
                    dst.fill(0.0);
                }
            }
        }
    }
}

/// The adjoint of [`im2col_pixel_major`]: sums one chunk's `dcol_t [count·Ho·Wo, kh·kw·C]`
/// into the channels-last scratch `dx_t` (runs of C floats), then writes the chunk's images'
/// gradient `dx [count, C, H, W]` from it.
fn col2im_pixel_major(
    dcol_t: &[f32],
    g: &Geometry,
    chunk: Chunk,
    dx_t: &mut [f32],
    dx: &mut [f32],
) {
    let (c_in, in_plane) = (g.channels, g.height * g.width);
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    let dx_t = &mut dx_t[..chunk.count * in_plane * c_in];
    dx_t.fill(0.0);
    for (p, row) in dcol_t.chunks_exact(kh * kw * c_in).enumerate() {
        let (b, q) = (p / g.out_plane(), p % g.out_plane());
        let (oh, ow) = (q / g.out_width, q % g.out_width);
        for i in 0..kh {
            let ih = (oh * sh + i).wrapping_sub(ph);
            if ih >= g.height {
                continue;
            }
            for j in 0..kw {
                let iw = (ow * sw + j).wrapping_sub(pw);
                if iw < g.width {
                    let dst = &mut dx_t[(b * in_plane + ih * g.width + iw) * c_in..][..c_in];
                    add_assign(dst, &row[(i * kw + j) * c_in..][..c_in]);
                }
            }
        }
    }
    for (src, dst) in dx_t
        .chunks_exact(in_plane * c_in)
        .zip(dx.chunks_exact_mut(c_in * in_plane))
    {
        transpose(src, in_plane, c_in, dst);
    }
}

/// `dst += src`, elementwise.
#[inline(always)]
fn add_assign_plain(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

dispatch_simd!(add_assign(dst: &mut [f32], src: &[f32]) => add_assign_plain(dst, src));

thread_local! {
    /// Per-thread scratch `(x_t, col_t)` for [`im2col_pixel_major`], taken while in use and
    /// put back after: it is rewritten whole each time, so it needs neither a new allocation
    /// nor zeroing.
    static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::Cell::new((Vec::new(), Vec::new()))
    };
}

/// `[A, B, P] → [B, A, P]` for contiguous blocks of `P` elements, into `dst`.
fn swap_outer(src: &[f32], a: usize, b: usize, p: usize, dst: &mut [f32]) {
    for bi in 0..b {
        for ai in 0..a {
            dst[(bi * a + ai) * p..][..p].copy_from_slice(&src[(ai * b + bi) * p..][..p]);
        }
    }
}

/// A strided matrix operand: `data[row · rs + col · cs]`.
struct Mat<'a> {
    data: &'a [f32],
    rs: isize,
    cs: isize,
}

/// `dst[m × n] (+)= lhs[m × k] · rhs[k × n]`, `dst` row-major; adds to `dst` when
/// `accumulate`. (gemm picks its own internal orientation from the strides; the transposed
/// call for `m < n` computes the same product.)
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    parallel: bool,
) {
    assert!(dst.len() >= m * n);
    let parallelism = if parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // Row-major dst: row stride n, column stride 1.
    let (dst_rs, dst_cs) = (n as isize, 1isize);
    // SAFETY: every operand slice covers the strided ranges that gemm reads or writes
    // (checked by the callers' shapes); `dst` does not alias `lhs` or `rhs`.
    unsafe {
        if m >= n {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                dst_cs,
                dst_rs,
                accumulate,
                lhs.data.as_ptr(),
                lhs.cs,
                lhs.rs,
                rhs.data.as_ptr(),
                rhs.cs,
                rhs.rs,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        } else {
            // dstᵀ[n × m] = rhsᵀ[n × k] · lhsᵀ[k × m]
            gemm::gemm(
                n,
                m,
                k,
                dst.as_mut_ptr(),
                dst_rs,
                dst_cs,
                accumulate,
                rhs.data.as_ptr(),
                rhs.rs,
                rhs.cs,
                lhs.data.as_ptr(),
                lhs.rs,
                lhs.cs,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// `dst (+)= lhs · rhs` for `dst [m × n]` stored column-major (`dst[i + j·m]`), straight
/// to gemm (the operands' strides pick its packing).
fn matmul_col_major(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    parallel: bool,
) {
    assert!(dst.len() >= m * n);
    let parallelism = if parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: as in `matmul`: the callers' shapes cover every strided access and `dst`
    // aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            m as isize,
            1,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr(),
            rhs.cs,
            rhs.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `y [B, O, Ho, Wo] = conv(x, weight)`, one chunk of images per rayon task.
pub fn forward(x: &FlexTensor, weight: &FlexTensor, g: &Geometry) -> FlexTensor {
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
            let mut col = vec![0.0f32; k * n];
            im2col(x, g, chunk, &mut col);
            let w = Mat {
                data: w,
                rs: k as isize,
                cs: 1,
            };
            let col = Mat {
                data: &col,
                rs: n as isize,
                cs: 1,
            };
            if chunk.count == 1 {
                matmul((o, n, k), out, w, col, false, parallel);
            } else {
                let mut y = vec![0.0f32; o * n];
                matmul((o, n, k), &mut y, w, col, false, parallel);
                swap_outer(&y, o, chunk.count, plane, out);
            }
        });
    f32_tensor(out, [g.batch, o, g.out_height, g.out_width])
}

/// Gradients of `x` and `weight` given the output gradient `grad [B, O, Ho, Wo]`.
pub fn backward(
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
                    let lhs = Mat {
                        data: &col_t,
                        rs: 1,
                        cs: k as isize,
                    };
                    let rhs = Mat {
                        data: &dy,
                        rs: 1,
                        cs: n as isize,
                    };
                    matmul_col_major((k, o, n), &mut dw, lhs, rhs, true, parallel);
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
        // [O][(i, j, c)] → [O][(c, i, j)]
        let (taps, mut reordered) = (g.kernel[0] * g.kernel[1], vec![0.0f32; o * k]);
        dw.par_chunks_exact(k)
            .zip(reordered.par_chunks_exact_mut(k))
            .for_each(|(src, dst)| transpose(src, taps, g.channels, dst));
        f32_tensor(reordered, [o, g.channels, g.kernel[0], g.kernel[1]])
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
                    matmul_col_major((k, n, o), &mut dcol_t, w_t, dy, false, parallel);
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

#[cfg(test)]
mod tests {
    use super::valid_range;

    #[test]
    fn valid_ranges_match_a_brute_force_scan() {
        for size in 1..9 {
            for k in 0..4 {
                for s in 1..4 {
                    for p in 0..3 {
                        if size + 2 * p < k + 1 {
                            continue;
                        }
                        let out = (size + 2 * p - (k + 1)) / s + 1;
                        let brute: Vec<usize> = (0..out)
                            .filter(|&o| {
                                let i = (o * s + k) as isize - p as isize;
                                i >= 0 && i < size as isize
                            })
                            .collect();
                        let (lo, hi) = valid_range(out, size, k, s, p);
                        assert_eq!((lo..hi).collect::<Vec<_>>(), brute, "{size} {k} {s} {p}");
                    }
                }
            }
        }
    }
}
