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

/// Input channels from which the weight gradient runs one GEMM per kernel tap (see
/// `backward`).
const PER_TAP_MIN_CHANNELS: usize = 128;

/// Pixels (rows) per rayon task of [`im2col_pixel_major`].
const PIXELS_PER_TASK: usize = 64;

/// Output planes up to this many pixels take [`im2col`]'s index-map path.
const SMALL_PLANE: usize = 32;

/// Rows of gemm's widest f32 microkernel (4 AVX-512 vectors).
const GEMM_ROWS: usize = 64;

/// Greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

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
    /// Images per chunk: about [`CHUNK_FLOATS`] of im2col each, at least one image, a chunk
    /// count that is a multiple of [`CHUNK_MULTIPLE`] so that the chunks spread evenly over
    /// 1, 2 or 4 threads, then rounded up to whole multiples of [`GEMM_ROWS`] pixels. The chunking depends on the shapes only, never on the thread
    /// count, so a machine gives the same results whatever its thread count (other CPUs may
    /// differ in the last bits: gemm's blocking and microkernels follow the CPU).
    fn images_per_chunk(&self) -> usize {
        let batch = self.batch.max(1);
        let total = batch * (self.rows() * self.out_plane()).max(1);
        let chunks = total
            .div_ceil(CHUNK_FLOATS)
            .next_multiple_of(CHUNK_MULTIPLE);
        let per = batch.div_ceil(chunks.min(batch));
        // Whole multiples of 64 pixels where the plane allows: gemm's widest microkernel
        // covers 64 rows, and a 32-row remainder runs at half its speed.
        let unit = GEMM_ROWS / gcd(self.out_plane().max(1), GEMM_ROWS);
        if unit <= batch {
            per.next_multiple_of(unit).min(batch)
        } else {
            per
        }
    }

    /// Whether the GEMMs should use all threads themselves: only when there are fewer chunks
    /// than threads to spread the chunks over.
    fn gemm_in_parallel(&self) -> bool {
        self.batch.div_ceil(self.images_per_chunk()) < rayon::current_num_threads()
    }
}

/// im2col of one chunk into `col [C·kh·kw, count·Ho·Wo]` (every element written):
/// `col[(c, i, j), (b, oh, ow)] = x[first + b, c, oh·sh + i − ph, ow·sw + j − pw]` (0 outside).
fn im2col(x: &[f32], g: &Geometry, chunk: Chunk, col: &mut [f32]) {
    let (plane, in_plane) = (g.out_plane(), g.height * g.width);
    let (width, out_width) = (g.width, g.out_width);
    let n = chunk.count * plane;
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    // (Strided convolutions gather from up to twice as large planes: see SMALL_PLANE.)
    let small = plane <= if sw > 1 { 2 * SMALL_PLANE } else { SMALL_PLANE };
    if sw > 1 && !small {
        return im2col_strided(x, g, chunk, col);
    }
    // Stride 1 with "same" width: a tap's rows are one run of the input plane.
    let whole_runs = sh == 1 && sw == 1 && out_width == width;
    // Small planes gather through a per-tap index map (u32::MAX: padding) instead of short
    // copies and fills.
    let maps: Vec<Vec<u32>> = if small {
        (0..kh * kw)
            .map(|tap| {
                let (i, j) = (tap / kw, tap % kw);
                (0..plane)
                    .map(|q| {
                        let ih = ((q / out_width) * sh + i).wrapping_sub(ph);
                        let iw = ((q % out_width) * sw + j).wrapping_sub(pw);
                        if ih < g.height && iw < width {
                            (ih * width + iw) as u32
                        } else {
                            u32::MAX
                        }
                    })
                    .collect()
            })
            .collect()
    } else {
        Vec::new()
    };
    for (row, dst) in col.chunks_mut(n).enumerate() {
        let (c, i, j) = (row / (kh * kw), row / kw % kh, row % kw);
        let (oh_lo, oh_hi) = valid_range(g.out_height, g.height, i, sh, ph);
        let (ow_lo, ow_hi) = valid_range(out_width, width, j, sw, pw);
        for b in 0..chunk.count {
            let src = &x[((chunk.first + b) * g.channels + c) * in_plane..][..in_plane];
            let dst = &mut dst[b * plane..][..plane];
            if let Some(map) = maps.get(row % (kh * kw)) {
                for (d, &m) in dst.iter_mut().zip(map) {
                    *d = src.get(m as usize).copied().unwrap_or(0.0);
                }
                continue;
            }
            if ow_lo >= ow_hi || oh_lo >= oh_hi {
                dst.fill(0.0); // this tap only ever sees padding
                continue;
            }
            dst[..oh_lo * out_width].fill(0.0);
            dst[oh_hi * out_width..].fill(0.0);
            let rows = &mut dst[oh_lo * out_width..oh_hi * out_width];
            if whole_runs {
                // rows[t] = src[start + t]; the columns that wrap into a neighbouring row (or
                // past the plane) are padding and zeroed below.
                let start = ((oh_lo + i - ph) * width + j) as isize - pw as isize;
                let lo = (-start).max(0) as usize;
                let hi = (rows.len() as isize).min(in_plane as isize - start) as usize;
                let from = (start + lo as isize) as usize;
                rows[lo..hi].copy_from_slice(&src[from..from + hi - lo]);
                rows[..lo].fill(0.0);
                rows[hi..].fill(0.0);
                if ow_lo > 0 || ow_hi < out_width {
                    for r in rows.chunks_exact_mut(out_width) {
                        r[..ow_lo].fill(0.0);
                        r[ow_hi..].fill(0.0);
                    }
                }
                continue;
            }
            for (oh, dst_row) in (oh_lo..oh_hi).zip(rows.chunks_exact_mut(out_width)) {
                let src_row = &src[(oh * sh + i - ph) * width..][..width];
                dst_row[..ow_lo].fill(0.0);
                dst_row[ow_hi..].fill(0.0);
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

/// [`im2col`] for column strides above 1: each input row is split once into its `sw` column
/// phases (padding as 0), so that each of the `kw` taps reading it copies one contiguous run
/// (`phase[j % sw][ow + j / sw]`) instead of gathering every `sw`-th value.
fn im2col_strided(x: &[f32], g: &Geometry, chunk: Chunk, col: &mut [f32]) {
    let (plane, in_plane) = (g.out_plane(), g.height * g.width);
    let (width, out_width) = (g.width, g.out_width);
    let n = chunk.count * plane;
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    let phase_len = out_width + (kw - 1) / sw;
    let mut phases = vec![0.0f32; sw * phase_len];
    // Rows (c, i, ·) of the matrix: kw consecutive rows of n values each.
    for (ci, rows) in col.chunks_mut(kw * n).enumerate() {
        let (c, i) = (ci / kh, ci % kh);
        for b in 0..chunk.count {
            let src = &x[((chunk.first + b) * g.channels + c) * in_plane..][..in_plane];
            for oh in 0..g.out_height {
                let at = b * plane + oh * out_width;
                let ih = (oh * sh + i).wrapping_sub(ph);
                if ih >= g.height {
                    for j in 0..kw {
                        rows[j * n + at..][..out_width].fill(0.0);
                    }
                    continue;
                }
                let src_row = &src[ih * width..][..width];
                for (t, phase) in phases.chunks_exact_mut(phase_len).enumerate() {
                    for (q, slot) in phase.iter_mut().enumerate() {
                        let iw = (q * sw + t).wrapping_sub(pw);
                        *slot = src_row.get(iw).copied().unwrap_or(0.0);
                    }
                }
                for j in 0..kw {
                    let run = &phases[(j % sw) * phase_len + j / sw..][..out_width];
                    rows[j * n + at..][..out_width].copy_from_slice(run);
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
    let images = &x[chunk.first * c_in * in_plane..][..chunk.count * c_in * in_plane];
    // Parallel inside the chunk too: with few chunks (small planes) this is the whole batch.
    x_t[..chunk.count * in_plane * c_in]
        .par_chunks_exact_mut(in_plane * c_in)
        .zip(images.par_chunks_exact(c_in * in_plane))
        .for_each(|(dst, image)| transpose(image, c_in, in_plane, dst));
    let x_t = &*x_t;
    col_t
        .par_chunks_mut(row_len * PIXELS_PER_TASK)
        .enumerate()
        .for_each(|(task, rows)| {
            for (r, row) in rows.chunks_exact_mut(row_len).enumerate() {
                let p = task * PIXELS_PER_TASK + r;
                let (b, q) = (p / g.out_plane(), p % g.out_plane());
                let (oh, ow) = (q / g.out_width, q % g.out_width);
                // Taps (i, 0..kw) read kw neighbouring pixels of input row ih: one run of
                // kw·C floats of x_t, clipped at the image's left and right edges.
                let iw0 = (ow * sw) as isize - pw as isize;
                let j_lo = (-iw0).max(0) as usize;
                let j_hi = (g.width as isize - iw0).clamp(0, kw as isize) as usize;
                for (i, taps) in row.chunks_exact_mut(kw * c_in).enumerate() {
                    let ih = (oh * sh + i).wrapping_sub(ph);
                    if ih >= g.height || j_lo >= j_hi {
                        taps.fill(0.0);
                        continue;
                    }
                    taps[..j_lo * c_in].fill(0.0);
                    taps[j_hi * c_in..].fill(0.0);
                    let at = (b * in_plane + ih * g.width) as isize + iw0 + j_lo as isize;
                    let len = (j_hi - j_lo) * c_in;
                    taps[j_lo * c_in..][..len].copy_from_slice(&x_t[at as usize * c_in..][..len]);
                }
            }
        });
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
    /// Per-thread scratch buffers for the im2col matrices and GEMM outputs, taken while in
    /// use and put back after: each use overwrites what it reads (gemm does not read its
    /// output unless accumulating), so they need neither new allocations nor zeroing.
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
#[derive(Clone, Copy)]
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

/// `dst (+)= lhs · rhs` for `dst [m × n]` stored as `dst[i·dst_rs + j·dst_cs]`, straight to
/// gemm (the operands' strides pick its packing).
#[allow(clippy::too_many_arguments)]
fn matmul_strided(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    parallel: bool,
) {
    assert!(m > 0 && n > 0 && dst.len() > (m - 1) * dst_rs + (n - 1) * dst_cs);
    let parallelism = if parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: as in `matmul`: the callers' shapes cover every strided access (checked above
    // for `dst`) and `dst` aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
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

/// Filters (`[kh, kw]` planes) per rayon task when cutting or placing a live window.
const FILTERS_PER_TASK: usize = 4096;

/// The kernel taps that see the input for at least one output pixel: rows `i0..i1` and
/// columns `j0..j1` of the kernel (a rectangle). The other taps only ever multiply padding.
/// On small planes (e.g. ResNet's last stage on 32x32 images, a 1x1 plane where only the
/// centre of a 3x3 kernel is live) the convolution runs on the live window alone.
#[derive(Debug, Clone, Copy)]
struct LiveWindow {
    rows: [usize; 2],
    cols: [usize; 2],
    /// The same convolution with the live window as its kernel.
    geometry: Geometry,
}

impl Geometry {
    /// The live window when it is smaller than the kernel.
    fn live_window(&self) -> Option<LiveWindow> {
        let live = |out: usize, size: usize, k: usize, s: usize, p: usize| {
            let taps: Vec<usize> = (0..k)
                .filter(|&t| {
                    let (lo, hi) = valid_range(out, size, t, s, p);
                    lo < hi
                })
                .collect();
            [
                taps.first().copied().unwrap_or(0),
                taps.last().map_or(0, |&t| t + 1),
            ]
        };
        let rows = live(
            self.out_height,
            self.height,
            self.kernel[0],
            self.stride[0],
            self.padding[0],
        );
        let cols = live(
            self.out_width,
            self.width,
            self.kernel[1],
            self.stride[1],
            self.padding[1],
        );
        let kernel = [rows[1] - rows[0], cols[1] - cols[0]];
        if kernel == self.kernel || kernel.contains(&0) {
            return None;
        }
        // Tap t of the window is tap t + i0 of the kernel: the same input offset with the
        // padding reduced by i0 (the output size stays as it is).
        let geometry = Geometry {
            kernel,
            padding: [self.padding[0] - rows[0], self.padding[1] - cols[0]],
            ..*self
        };
        Some(LiveWindow {
            rows,
            cols,
            geometry,
        })
    }
}

impl LiveWindow {
    /// `weight [O, C, kh, kw]` cut to the window.
    fn crop(&self, weight: &FlexTensor, g: &Geometry) -> FlexTensor {
        let weight = f32_contiguous(weight);
        let w = weight.storage::<f32>();
        let [kh, kw] = g.kernel;
        let [wh, ww] = self.geometry.kernel;
        let mut out = vec![0.0f32; g.out_channels * g.channels * wh * ww];
        out.par_chunks_mut(FILTERS_PER_TASK * wh * ww)
            .zip(w.par_chunks(FILTERS_PER_TASK * kh * kw))
            .for_each(|(small, full)| {
                for (small, filter) in small
                    .chunks_exact_mut(wh * ww)
                    .zip(full.chunks_exact(kh * kw))
                {
                    for r in 0..wh {
                        let from = (r + self.rows[0]) * kw + self.cols[0];
                        small[r * ww..][..ww].copy_from_slice(&filter[from..][..ww]);
                    }
                }
            });
        f32_tensor(out, [g.out_channels, g.channels, wh, ww])
    }

    /// The window's weight gradient placed in a zero `[O, C, kh, kw]` (dead taps get 0).
    fn expand(&self, grad: &FlexTensor, g: &Geometry) -> FlexTensor {
        let grad = f32_contiguous(grad);
        let dw = grad.storage::<f32>();
        let [kh, kw] = g.kernel;
        let [wh, ww] = self.geometry.kernel;
        let mut out = vec![0.0f32; g.out_channels * g.channels * kh * kw];
        out.par_chunks_mut(FILTERS_PER_TASK * kh * kw)
            .zip(dw.par_chunks(FILTERS_PER_TASK * wh * ww))
            .for_each(|(full, small)| {
                for (filter, small) in full
                    .chunks_exact_mut(kh * kw)
                    .zip(small.chunks_exact(wh * ww))
                {
                    for r in 0..wh {
                        let to = (r + self.rows[0]) * kw + self.cols[0];
                        filter[to..][..ww].copy_from_slice(&small[r * ww..][..ww]);
                    }
                }
            });
        f32_tensor(out, [g.out_channels, g.channels, kh, kw])
    }
}

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
                        for t in 0..taps {
                            let lhs = Mat {
                                data: &col_t[t * g.channels..],
                                rs: 1,
                                cs: k as isize,
                            };
                            let (m, dst) = (g.channels, &mut dw[t..]);
                            matmul_strided((m, o, n), dst, (taps, k), lhs, rhs, true, parallel);
                        }
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
