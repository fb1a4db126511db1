//! im2col and its adjoint col2im, channel-major (`[C·kh·kw, pixels]`, the forward GEMM's
//! layout) and pixel-major (`[pixels, kh·kw·C]`, the gradients'), with the per-thread scratch
//! buffers they fill.

use rayon::prelude::*;

use super::geometry::{Chunk, Geometry, valid_range};
use super::transpose::transpose;
use crate::ops::flex::dispatch_simd;

/// Pixels (rows) per rayon task of [`im2col_pixel_major`].
const PIXELS_PER_TASK: usize = 64;

/// Output planes up to this many pixels take [`im2col`]'s index-map path.
const SMALL_PLANE: usize = 32;

/// Whether [`im2col`] and [`col2im`] go through per-tap index maps: small output planes, where
/// rows are too short for copies (strided convolutions read up to twice as large planes).
fn uses_tap_maps(g: &Geometry) -> bool {
    g.out_plane()
        <= if g.stride[1] > 1 {
            2 * SMALL_PLANE
        } else {
            SMALL_PLANE
        }
}

/// For each kernel tap, the input offset read by each output pixel of a plane (`u32::MAX`
/// where the tap sees padding).
fn tap_maps(g: &Geometry) -> Vec<Vec<u32>> {
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    (0..kh * kw)
        .map(|tap| {
            let (i, j) = (tap / kw, tap % kw);
            (0..g.out_plane())
                .map(|q| {
                    let ih = ((q / g.out_width) * sh + i).wrapping_sub(ph);
                    let iw = ((q % g.out_width) * sw + j).wrapping_sub(pw);
                    if ih < g.height && iw < g.width {
                        (ih * g.width + iw) as u32
                    } else {
                        u32::MAX
                    }
                })
                .collect()
        })
        .collect()
}

/// im2col of one chunk into `col [C·kh·kw, count·Ho·Wo]` (every element written):
/// `col[(c, i, j), (b, oh, ow)] = x[first + b, c, oh·sh + i − ph, ow·sw + j − pw]` (0 outside).
pub(super) fn im2col(x: &[f32], g: &Geometry, chunk: Chunk, col: &mut [f32]) {
    let (plane, in_plane) = (g.out_plane(), g.height * g.width);
    let (width, out_width) = (g.width, g.out_width);
    let n = chunk.count * plane;
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    let small = uses_tap_maps(g);
    if sw > 1 && !small {
        return im2col_strided(x, g, chunk, col);
    }
    // Stride 1 with "same" width: a tap's rows are one run of the input plane.
    let whole_runs = sh == 1 && sw == 1 && out_width == width;
    // Small planes gather through a per-tap index map (u32::MAX: padding) instead of short
    // copies and fills.
    let maps = if small { tap_maps(g) } else { Vec::new() };
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
pub(super) fn im2col_strided(x: &[f32], g: &Geometry, chunk: Chunk, col: &mut [f32]) {
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
pub(super) fn col2im(dcol: &[f32], g: &Geometry, chunk: Chunk, dx: &mut [f32]) {
    let (plane, in_plane) = (g.out_plane(), g.height * g.width);
    let n = chunk.count * plane;
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    if uses_tap_maps(g) {
        let maps = tap_maps(g);
        for b in 0..chunk.count {
            for c in 0..g.channels {
                let dst = &mut dx[(b * g.channels + c) * in_plane..][..in_plane];
                for (t, map) in maps.iter().enumerate() {
                    let src = &dcol[(c * kh * kw + t) * n + b * plane..][..plane];
                    for (&m, &v) in map.iter().zip(src) {
                        if let Some(d) = dst.get_mut(m as usize) {
                            *d += v;
                        }
                    }
                }
            }
        }
        return;
    }
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

/// The im2col of one chunk with pixels as rows and `(i, j, c)` as columns:
/// `col_t[(b, oh, ow), (i, j, c)] = x[first + b, c, oh·sh + i − ph, ow·sw + j − pw]`
/// (0 outside), written whole into `col_t [count·Ho·Wo, kh·kw·C]`. Each entry is a copy of C
/// contiguous floats from the chunk transposed to channels-last (`x_t`, scratch of
/// `count·H·W·C`). This is the layout the weight-gradient GEMM reads without repacking.
pub(super) fn im2col_pixel_major(
    x: &[f32],
    g: &Geometry,
    chunk: Chunk,
    x_t: &mut [f32],
    col_t: &mut [f32],
) {
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
pub(super) fn col2im_pixel_major(
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
    pub(super) static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::Cell::new((Vec::new(), Vec::new()))
    };
}

/// `[A, B, P] → [B, A, P]` for contiguous blocks of `P` elements, into `dst`.
pub(super) fn swap_outer(src: &[f32], a: usize, b: usize, p: usize, dst: &mut [f32]) {
    for bi in 0..b {
        for ai in 0..a {
            dst[(bi * a + ai) * p..][..p].copy_from_slice(&src[(ai * b + bi) * p..][..p]);
        }
    }
}
