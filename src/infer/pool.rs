//! Pooling in the inference plan (NHWC): max pooling over a window, and the mean over all
//! pixels of each image.

use rayon::prelude::*;

/// Max pooling (padding never wins: it is skipped, as ONNX and PyTorch pad with −∞).
#[derive(Debug, Clone)]
pub struct MaxPool {
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    /// Output size rounded up rather than down.
    pub ceil: bool,
}

impl MaxPool {
    /// Output height and width for an input of `h` × `w`.
    pub fn out_size(&self, h: usize, w: usize) -> [usize; 2] {
        let [kh, kw] = self.kernel;
        let [t, l, b, r] = self.pads;
        let size = |n: usize, k: usize, s: usize, p0: usize, p1: usize| {
            let span = n + p0 + p1 - k;
            let mut out = if self.ceil {
                span.div_ceil(s)
            } else {
                span / s
            } + 1;
            // As PyTorch: with ceil, the last window must start inside the input or the
            // leading padding.
            if self.ceil && (out - 1) * s >= n + p0 {
                out -= 1;
            }
            out
        };
        [
            size(h, kh, self.stride[0], t, b),
            size(w, kw, self.stride[1], l, r),
        ]
    }

    /// `out [b, ho, wo, C]` from `x [b, h, w, C]`.
    pub fn run(&self, x: &[f32], [_, h, w, c]: [usize; 4], out: &mut [f32]) {
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [pt, pl, _, _] = self.pads;
        let [ho, wo] = self.out_size(h, w);
        out.par_chunks_mut(wo * c)
            .enumerate()
            .for_each(|(index, out)| {
                let (image, oy) = (index / ho, index % ho);
                let image = &x[image * h * w * c..][..h * w * c];
                for (ox, out) in out.chunks_exact_mut(c).enumerate() {
                    out.fill(f32::NEG_INFINITY);
                    for ky in 0..kh {
                        let iy = (oy * sh + ky).wrapping_sub(pt);
                        if iy >= h {
                            continue;
                        }
                        for kx in 0..kw {
                            let ix = (ox * sw + kx).wrapping_sub(pl);
                            if ix >= w {
                                continue;
                            }
                            let input = &image[(iy * w + ix) * c..][..c];
                            out.iter_mut().zip(input).for_each(|(o, &v)| *o = o.max(v));
                        }
                    }
                }
            });
    }
}

/// `out [b, C]`: the mean of `x [b, pixels, C]` over its pixels.
pub fn global_avg_pool(x: &[f32], [pixels, c]: [usize; 2], out: &mut [f32]) {
    out.par_chunks_mut(c)
        .zip(x.par_chunks(pixels * c))
        .for_each(|(out, x)| {
            out.fill(0.0);
            for pixel in x.chunks_exact(c) {
                out.iter_mut().zip(pixel).for_each(|(o, v)| *o += v);
            }
            let scale = 1.0 / pixels as f32;
            out.iter_mut().for_each(|o| *o *= scale);
        });
}
