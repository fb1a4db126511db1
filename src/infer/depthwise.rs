//! Depthwise convolution of the inference plan in NHWC (one filter per channel: the
//! MobileNetV3 and EfficientNet blocks): each output pixel sums its taps across a contiguous
//! run of channels, then the folded bias and the activation. With stride 1 a tap reads a
//! contiguous run of a whole input line, so each tap's weights are laid out once along an
//! output row (`[kh·kw, wo·C]`): the tap becomes one multiply-add over the row, full
//! vectors whatever the number of channels.

use super::pointwise::Act;
use super::window::Window;
use crate::ops::flex::dispatch_simd;

/// Most channels for which the weights are laid out along the rows.
const ALONG_ROW_MAX_CHANNELS: usize = 32;

/// A depthwise convolution with its BatchNorm folded in.
#[derive(Debug, Clone)]
pub struct Depthwise {
    /// Channels (in and out).
    pub channels: usize,
    /// Kernel, stride, padding.
    pub window: Window,
    /// `[kh·kw, C]`.
    weight: Vec<f32>,
    /// `[C]`.
    bias: Vec<f32>,
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
            weight,
            bias: bias.map_or_else(|| vec![0.0; channels], <[f32]>::to_vec),
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
    pub fn run(&self, x: &[f32], [_, h, w]: [usize; 3], out: &mut [f32]) {
        let c = self.channels;
        let [ho, wo] = self.out_size(h, w);
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
                row_simd(lines, &self.weight, along, &self.bias, dims, self.act, out)
            });
    }
}
