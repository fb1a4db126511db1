//! Depthwise convolution of the inference plan in NHWC (one filter per channel: the
//! MobileNetV3 and EfficientNet blocks): each output pixel sums its taps across a contiguous
//! run of channels, then the folded bias and the activation. With stride 1 a tap reads a
//! contiguous run of a whole input line, so each tap's weights are laid out once along an
//! output row (`[kh·kw, wo·C]`): the tap becomes one multiply-add over the row, full
//! vectors whatever the number of channels.

use rayon::prelude::*;

use super::pointwise::Act;
use crate::ops::flex::dispatch_simd;

/// Most channels for which the weights are laid out along the rows.
const ALONG_ROW_MAX_CHANNELS: usize = 32;

/// A depthwise convolution with its BatchNorm folded in.
#[derive(Debug, Clone)]
pub struct Depthwise {
    /// Channels (in and out).
    pub channels: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
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

/// One output row: `out[ox, c]` for every `ox`, from the input lines the kernel rows reach
/// (`None` above or below the image). Tap by tap, over the range of output pixels whose
/// input is inside the line, so the inner loop has no bounds to check.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row(
    lines: &[Option<&[f32]>],
    weight: &[f32],
    bias: &[f32],
    (w, c, kw, sw, pl): (usize, usize, usize, usize, usize),
    act: Act,
    out: &mut [f32],
) {
    let wo = out.len() / c;
    for out in out.chunks_exact_mut(c) {
        out.copy_from_slice(bias);
    }
    for (ky, line) in lines.iter().enumerate() {
        let Some(line) = line else { continue };
        for kx in 0..kw {
            // Output pixels whose input column ox·sw + kx − pl lies in 0..w.
            let lo = pl.saturating_sub(kx).div_ceil(sw);
            let hi = ((w + pl).saturating_sub(kx)).div_ceil(sw).min(wo);
            let taps = &weight[(ky * kw + kx) * c..][..c];
            for ox in lo..hi {
                let ix = ox * sw + kx - pl;
                let input = &line[ix * c..][..c];
                out[ox * c..][..c]
                    .iter_mut()
                    .zip(input.iter().zip(taps))
                    .for_each(|(o, (x, t))| *o += x * t);
            }
        }
    }
    act.apply(out);
}

/// [`row`] for stride 1 with the weights laid out along the row (`along [kh·kw, wo·C]`).
#[inline(always)]
fn row_along(
    lines: &[Option<&[f32]>],
    along: &[f32],
    bias: &[f32],
    (w, c, kw, pl): (usize, usize, usize, usize),
    act: Act,
    out: &mut [f32],
) {
    let wo = out.len() / c;
    for out in out.chunks_exact_mut(c) {
        out.copy_from_slice(bias);
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

dispatch_simd!(row_along_simd(
    lines: &[Option<&[f32]>],
    along: &[f32],
    bias: &[f32],
    dims: (usize, usize, usize, usize),
    act: Act,
    out: &mut [f32]
) => row_along(lines, along, bias, dims, act, out));

dispatch_simd!(row_simd(
    lines: &[Option<&[f32]>],
    weight: &[f32],
    bias: &[f32],
    dims: (usize, usize, usize, usize, usize),
    act: Act,
    out: &mut [f32]
) => row(lines, weight, bias, dims, act, out));

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
            kernel: [kh, kw],
            stride,
            pads,
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
        if self.stride[1] != 1 || self.channels > ALONG_ROW_MAX_CHANNELS {
            return;
        }
        let taps = self.weight.chunks_exact(self.channels);
        let rows = taps.flat_map(|tap| tap.iter().cycle().take(width * self.channels));
        self.along_row = Some((width, rows.copied().collect()));
    }

    /// Output height and width for an input of `h` × `w`.
    pub fn out_size(&self, h: usize, w: usize) -> [usize; 2] {
        let [kh, kw] = self.kernel;
        let [t, l, b, r] = self.pads;
        [
            (h + t + b - kh) / self.stride[0] + 1,
            (w + l + r - kw) / self.stride[1] + 1,
        ]
    }

    /// `out [b, ho, wo, C] = act(depthwise(x) + bias)` for `x [b, h, w, C]`.
    pub fn run(&self, x: &[f32], [_, h, w]: [usize; 3], out: &mut [f32]) {
        let c = self.channels;
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [pt, pl, _, _] = self.pads;
        let [ho, wo] = self.out_size(h, w);
        out.par_chunks_mut(wo * c)
            .enumerate()
            .for_each(|(index, out)| {
                let (image, oy) = (index / ho, index % ho);
                let image = &x[image * h * w * c..][..h * w * c];
                let lines: Vec<Option<&[f32]>> = (0..kh)
                    .map(|ky| {
                        let iy = (oy * sh + ky).wrapping_sub(pt);
                        (iy < h).then(|| &image[iy * w * c..][..w * c])
                    })
                    .collect();
                let dims = (w, c, kw, sw, pl);
                match &self.along_row {
                    Some((width, along)) if *width == wo => {
                        row_along_simd(&lines, along, &self.bias, (w, c, kw, pl), self.act, out)
                    }
                    _ => row_simd(&lines, &self.weight, &self.bias, dims, self.act, out),
                }
            });
    }
}
