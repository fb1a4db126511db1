//! Pooling in the inference plan (NHWC): max pooling over a window, and the mean over all
//! pixels of each image.

use rayon::prelude::*;

use super::window::Window;

/// Max pooling (padding never wins: it is skipped, as ONNX and PyTorch pad with −∞).
#[derive(Debug, Clone)]
pub struct MaxPool {
    /// Kernel, stride, padding.
    pub window: Window,
    /// Output size rounded up rather than down.
    pub ceil: bool,
}

impl MaxPool {
    /// Output height and width for an input of `h` × `w`.
    pub fn out_size(&self, h: usize, w: usize) -> [usize; 2] {
        self.window.out_size(h, w, self.ceil)
    }

    /// `out [b, ho, wo, C]` from `x [b, h, w, C]`.
    pub fn run(&self, x: &[f32], [_, h, w, c]: [usize; 4], out: &mut [f32]) {
        let [ho, wo] = self.out_size(h, w);
        let (kw, sw, pl) = (
            self.window.kernel[1],
            self.window.stride[1],
            self.window.pads[1],
        );
        self.window
            .rows(x, [h, w, c], [ho, wo * c], out, |lines, out| {
                for (ox, out) in out.chunks_exact_mut(c).enumerate() {
                    out.fill(f32::NEG_INFINITY);
                    for line in lines.iter().flatten() {
                        for kx in 0..kw {
                            let ix = (ox * sw + kx).wrapping_sub(pl);
                            if ix >= w {
                                continue;
                            }
                            let input = &line[ix * c..][..c];
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
