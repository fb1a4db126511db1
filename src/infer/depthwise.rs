//! Depthwise convolution of the inference plan in NHWC (one filter per channel: the
//! MobileNetV3 and EfficientNet blocks), with the folded bias and the activation.
//!
//! With AVX-512, eight output pixels at a time: for each block of 16 channels their eight
//! sums stay in registers across the taps, each tap's weights loaded once for the eight;
//! the pixels whose window crosses the border skip the columns outside. Elsewhere a
//! portable path: pixel by pixel, the sums of a run of channels in registers; with stride
//! 1 and few channels, each tap's weights laid out once along an output row
//! (`[kh·kw, wo·C]`), so that a tap is one multiply-add over the row.

use super::aligned::Aligned;
use super::pointwise::Act;
use super::window::Window;
use crate::ops::flex::dispatch_simd;

/// Most channels for which the portable path lays the weights out along the rows.
const ALONG_ROW_MAX_CHANNELS: usize = 32;

/// A depthwise convolution with its BatchNorm folded in.
#[derive(Debug, Clone)]
pub struct Depthwise {
    /// Channels (in and out).
    pub channels: usize,
    /// Kernel, stride, padding.
    pub window: Window,
    /// `[kh·kw, C]`.
    weight: Aligned,
    /// `[C]`.
    bias: Aligned,
    /// With stride 1, each tap's weights repeated along an output row of `width` pixels:
    /// `[kh·kw, width·C]`.
    along_row: Option<(usize, Vec<f32>)>,
    /// Applied to the output.
    pub act: Act,
}

/// `dst[l] = bias[ch0 + l] + Σ taps input · weight` over `L` channels from `ch0` of one output
/// pixel, the sum kept in registers across the taps (kernel columns `kx` of `columns`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pixel_lanes<const L: usize>(
    lines: &[Option<&[f32]>],
    weight: &[f32],
    bias: &[f32],
    (c, kw, ch0): (usize, usize, usize),
    x0: isize,
    columns: std::ops::Range<usize>,
    dst: &mut [f32],
) {
    let mut acc: [f32; L] = bias[ch0..ch0 + L].try_into().unwrap();
    for (ky, line) in lines.iter().enumerate() {
        let Some(line) = line else { continue };
        for kx in columns.clone() {
            let ix = (x0 + kx as isize) as usize;
            let input: &[f32; L] = line[ix * c + ch0..][..L].try_into().unwrap();
            let taps: &[f32; L] = weight[(ky * kw + kx) * c + ch0..][..L].try_into().unwrap();
            for l in 0..L {
                acc[l] += input[l] * taps[l];
            }
        }
    }
    dst[..L].copy_from_slice(&acc);
}

/// One output row: `out[ox, c]` for every `ox`, from the input lines the kernel rows reach
/// (`None` above or below the image). Pixel by pixel, 16 channels at a time, each sum kept
/// in registers across the taps; with the weights laid out along the row (`along`, stride
/// 1, few channels), tap by tap instead, each tap one run over the row.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row(
    lines: &[Option<&[f32]>],
    weight: &[f32],
    along: Option<&[f32]>,
    bias: &[f32],
    (w, c, kw, sw, pl): (usize, usize, usize, usize, usize),
    act: Act,
    out: &mut [f32],
) {
    let wo = out.len() / c;
    let Some(along) = along else {
        for (ox, pixel) in out.chunks_exact_mut(c).enumerate() {
            // The kernel columns whose input lies in 0..w.
            let x0 = (ox * sw) as isize - pl as isize;
            let columns = (-x0).max(0) as usize..(w as isize - x0).clamp(0, kw as isize) as usize;
            let mut ch0 = 0;
            while ch0 < c {
                let at = (c, kw, ch0);
                let dst = &mut pixel[ch0..];
                ch0 += match c - ch0 {
                    16.. => {
                        pixel_lanes::<16>(lines, weight, bias, at, x0, columns.clone(), dst);
                        16
                    }
                    8.. => {
                        pixel_lanes::<8>(lines, weight, bias, at, x0, columns.clone(), dst);
                        8
                    }
                    _ => {
                        pixel_lanes::<1>(lines, weight, bias, at, x0, columns.clone(), dst);
                        1
                    }
                };
            }
        }
        act.apply(out);
        return;
    };
    for out in out.chunks_exact_mut(c) {
        // A loop, not copy_from_slice: a call to memmove per pixel costs more than the copy.
        out.iter_mut().zip(bias).for_each(|(o, &b)| *o = b);
    }
    for (ky, line) in lines.iter().enumerate() {
        let Some(line) = line else { continue };
        for kx in 0..kw {
            // Output pixels whose input column ox + kx − pl lies in 0..w.
            let lo = pl.saturating_sub(kx);
            let hi = (w + pl).saturating_sub(kx).min(wo);
            if lo >= hi {
                continue;
            }
            let taps = &along[(ky * kw + kx) * wo * c..][lo * c..hi * c];
            let input = &line[(lo + kx - pl) * c..(hi + kx - pl) * c];
            out[lo * c..hi * c]
                .iter_mut()
                .zip(input.iter().zip(taps))
                .for_each(|(o, (x, t))| *o += x * t);
        }
    }
    act.apply(out);
}

/// Depthwise rows with AVX-512: eight output pixels at a time (the rest of the inside ones
/// by four, two and one), channel block by channel block (16 lanes, the last masked)
/// within them, the eight sums in registers and each tap's weights loaded once for the
/// eight; with stride 1 and a 3- or 5-wide kernel, each input column loaded once for the
/// pixels that use it; in the groups whose windows cross the left or right border, each
/// column is checked. The eight pixels' input stays in the L1 cache across the channel
/// blocks.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::pointwise::vector;
    use super::{Act, Window};

    /// Most kernel rows the vector path takes (taller kernels take the portable one).
    pub(super) const MAX_ROWS: usize = 8;

    /// One output row's operands: the input lines (`null` in the padding), the weights
    /// `[kh·kw, C]`, the bias, the output, and `(w, c, kw, sw, pl)`: input width,
    /// channels, kernel width, horizontal stride, left padding.
    struct Row {
        lines: [*const f32; MAX_ROWS],
        rows: usize,
        weight: *const f32,
        bias: *const f32,
        out: *mut f32,
        dims: (usize, usize, usize, usize, usize),
        /// Applied in registers (`Identity` where it comes after the store).
        act: Act,
    }

    /// Output pixels `ox..ox + n` (`n ≤ P`); with `CHECKED`, the kernel columns outside the
    /// input row are skipped, else every column lies inside it. With `KW` 0 (any kernel),
    /// each multiply-add loads its input; with `KW` 3 or 5 (stride 1, unchecked, `n` = `P`,
    /// a kernel `KW` wide), each input column is loaded once per kernel row and used by
    /// every pixel whose window holds it: `P + KW − 1` loads for `P · KW` multiply-adds.
    /// (With stride 2 that scheme measured slower.)
    #[inline(always)]
    unsafe fn pixels<const P: usize, const CHECKED: bool, const KW: usize>(
        r: &Row,
        ox: usize,
        n: usize,
    ) {
        let (w, c, kw, sw, pl) = r.dims;
        debug_assert!(KW == 0 || (!CHECKED && sw == 1 && kw == KW && n == P));
        // SAFETY (the whole body): unchecked, `row` made sure that columns ox·sw − pl ..
        // (ox + P − 1)·sw − pl + kw lie in 0..w; checked, only those inside are read.
        // Each block's mask keeps the lanes inside the channels, and only pixels below
        // `n` are written.
        unsafe {
            for ch0 in (0..c).step_by(16) {
                let m = vector::lanes(c, ch0);
                let mut acc = [_mm512_maskz_loadu_ps(m, r.bias.add(ch0)); P];
                for (ky, &line) in r.lines[..r.rows].iter().enumerate() {
                    if line.is_null() {
                        continue;
                    }
                    if KW > 0 {
                        let wv: [__m512; KW] = std::array::from_fn(|kx| {
                            _mm512_maskz_loadu_ps(m, r.weight.add((ky * KW + kx) * c + ch0))
                        });
                        let first = line.add((ox - pl) * c + ch0);
                        for j in 0..P + KW - 1 {
                            let v = _mm512_maskz_loadu_ps(m, first.add(j * c));
                            for (kx, wv) in wv.iter().enumerate() {
                                // Column j feeds pixel j − kx through tap kx.
                                if j >= kx && j - kx < P {
                                    acc[j - kx] = _mm512_fmadd_ps(v, *wv, acc[j - kx]);
                                }
                            }
                        }
                        continue;
                    }
                    for kx in 0..kw {
                        let wv = _mm512_maskz_loadu_ps(m, r.weight.add((ky * kw + kx) * c + ch0));
                        for (p, acc) in acc.iter_mut().enumerate() {
                            let ix = ((ox + p) * sw + kx).wrapping_sub(pl);
                            if CHECKED && (p >= n || ix >= w) {
                                continue;
                            }
                            let v = _mm512_maskz_loadu_ps(m, line.add(ix * c + ch0));
                            *acc = _mm512_fmadd_ps(v, wv, *acc);
                        }
                    }
                }
                for (p, acc) in acc.iter().enumerate().take(n) {
                    let v = vector::activate(r.act, *acc);
                    _mm512_mask_storeu_ps(r.out.add((ox + p) * c + ch0), m, v);
                }
            }
        }
    }

    /// One output row `out [wo, C]` from the input lines `lines` (`kh ≤ MAX_ROWS` of them,
    /// `None` in the padding), with the activation (in registers where
    /// `pointwise::vector` has it, else after the row).
    ///
    /// # Safety
    /// The CPU has AVX-512F, and the windows of output columns `lo..hi` lie inside the
    /// input row (`Window::inside_columns`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row(
        lines: &[Option<&[f32]>],
        weight: &[f32],
        bias: &[f32],
        dims: (usize, usize, usize, usize, usize),
        (lo, hi): (usize, usize),
        act: Act,
        out: &mut [f32],
    ) {
        let (w, c, kw, _, _) = dims;
        let wo = out.len() / c;
        assert!(
            lines.len() <= MAX_ROWS
                && lines.iter().flatten().all(|l| l.len() == w * c)
                && weight.len() == lines.len() * kw * c
                && bias.len() == c
                && out.len() == wo * c
                && lo <= hi
                && hi <= wo
        );
        let mut r = Row {
            lines: [std::ptr::null(); MAX_ROWS],
            rows: lines.len(),
            weight: weight.as_ptr(),
            bias: bias.as_ptr(),
            out: out.as_mut_ptr(),
            dims,
            act: if vector::applies(act) {
                act
            } else {
                Act::Identity
            },
        };
        for (p, line) in r.lines.iter_mut().zip(lines) {
            if let Some(line) = line {
                *p = line.as_ptr();
            }
        }
        let (_, _, kw, sw, _) = dims;
        // SAFETY: the sizes asserted; the windows of columns lo..hi lie inside the row
        // (the caller's `Window::inside_columns`), the others are checked.
        for (ox, n, inside) in Window::groups(wo, (lo, hi), 8) {
            unsafe {
                match (inside, n) {
                    (true, 8) if sw == 1 && kw == 3 => pixels::<8, false, 3>(&r, ox, n),
                    (true, 8) if sw == 1 && kw == 5 => pixels::<8, false, 5>(&r, ox, n),
                    (true, 4) if sw == 1 && kw == 3 => pixels::<4, false, 3>(&r, ox, n),
                    (true, 4) if sw == 1 && kw == 5 => pixels::<4, false, 5>(&r, ox, n),
                    (true, 8) => pixels::<8, false, 0>(&r, ox, n),
                    (true, 4) => pixels::<4, false, 0>(&r, ox, n),
                    (true, 2) => pixels::<2, false, 0>(&r, ox, n),
                    (true, _) => {
                        debug_assert_eq!(n, 1, "inside groups are 8, 4, 2 or 1 wide");
                        pixels::<1, false, 0>(&r, ox, n)
                    }
                    (false, 1..=2) => pixels::<2, true, 0>(&r, ox, n),
                    (false, _) => pixels::<8, true, 0>(&r, ox, n),
                }
            }
        }
        if !vector::applies(act) {
            super::super::pointwise::apply_slice(act, out);
        }
    }
}

dispatch_simd!(row_simd(
    lines: &[Option<&[f32]>],
    weight: &[f32],
    along: Option<&[f32]>,
    bias: &[f32],
    dims: (usize, usize, usize, usize, usize),
    act: Act,
    out: &mut [f32]
) => row(lines, weight, along, bias, dims, act, out));

impl Depthwise {
    /// From ONNX's `[C, 1, kh, kw]` weights.
    pub fn from_oihw(
        w: &[f32],
        [channels, _, kh, kw]: [usize; 4],
        bias: Option<&[f32]>,
        stride: [usize; 2],
        pads: [usize; 4],
    ) -> Self {
        let mut weight = vec![0.0; kh * kw * channels];
        for c in 0..channels {
            for tap in 0..kh * kw {
                weight[tap * channels + c] = w[c * kh * kw + tap];
            }
        }
        Self {
            channels,
            window: Window {
                kernel: [kh, kw],
                stride,
                pads,
            },
            weight: weight.into(),
            bias: bias.map_or_else(|| Aligned::zeros(channels), Aligned::from),
            along_row: None,
            act: Act::Identity,
        }
    }

    /// Lays the weights out along output rows of `width` pixels (stride 1, few channels:
    /// with more, a pixel's taps are already whole vectors, and the laid-out weights
    /// would only leave the L1 cache).
    pub fn lay_out_along(&mut self, width: usize) {
        if self.window.stride[1] != 1 || self.channels > ALONG_ROW_MAX_CHANNELS {
            return;
        }
        let taps = self.weight.chunks_exact(self.channels);
        let rows = taps.flat_map(|tap| tap.iter().cycle().take(width * self.channels));
        self.along_row = Some((width, rows.copied().collect()));
    }

    /// Output height and width for an input of `h` × `w`.
    pub fn out_size(&self, h: usize, w: usize) -> [usize; 2] {
        self.window.out_size(h, w, false)
    }

    /// `out [b, ho, wo, C] = act(depthwise(x) + bias)` for `x [b, h, w, C]`.
    pub fn run(&self, x: &[f32], dims: [usize; 3], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        let vectors = std::arch::is_x86_feature_detected!("avx512f")
            && self.window.kernel[0] <= avx512::MAX_ROWS;
        #[cfg(not(target_arch = "x86_64"))]
        let vectors = false;
        self.run_on(x, dims, out, vectors);
    }

    /// [`Depthwise::run`] without the CPU's vector path (its tests on any CPU).
    #[cfg(test)]
    pub(super) fn run_portable(&self, x: &[f32], dims: [usize; 3], out: &mut [f32]) {
        self.run_on(x, dims, out, false);
    }

    /// [`Depthwise::run`] row by row, through the AVX-512 rows where `vectors` (the CPU has
    /// them, the kernel is at most `MAX_ROWS` tall), else the portable ones.
    fn run_on(&self, x: &[f32], [_, h, w]: [usize; 3], out: &mut [f32], vectors: bool) {
        let c = self.channels;
        let [ho, wo] = self.out_size(h, w);
        let inside = self.window.inside_columns(w, wo);
        let along = match &self.along_row {
            Some((width, along)) if *width == wo => Some(along.as_slice()),
            _ => None,
        };
        let dims = (
            w,
            c,
            self.window.kernel[1],
            self.window.stride[1],
            self.window.pads[1],
        );
        self.window
            .rows(x, [h, w, c], [ho, wo * c], out, |lines, out| {
                #[cfg(target_arch = "x86_64")]
                if vectors {
                    // SAFETY: `vectors` says the CPU has AVX-512F; the columns inside come
                    // from the window's geometry; `row` checks the sizes it relies on.
                    return unsafe {
                        avx512::row(lines, &self.weight, &self.bias, dims, inside, self.act, out)
                    };
                }
                let _ = (vectors, inside); // used by the vector path only
                row_simd(lines, &self.weight, along, &self.bias, dims, self.act, out)
            });
    }
}
