//! The geometry of a sliding window in the inference plan (convolutions, pooling): kernel,
//! stride and padding, the output size, and the input lines each output row reads.

use rayon::prelude::*;

/// Kernel, stride and padding of a 2-D window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
}

impl Window {
    /// Output height and width for an input of `h` × `w`, rounded down (or up, as
    /// PyTorch's `ceil_mode`: the last window then still starts inside the input or the
    /// leading padding).
    pub fn out_size(&self, h: usize, w: usize, ceil: bool) -> [usize; 2] {
        let [kh, kw] = self.kernel;
        let [t, l, b, r] = self.pads;
        let size = |n: usize, k: usize, s: usize, p0: usize, p1: usize| {
            let span = n + p0 + p1 - k;
            let out = if ceil { span.div_ceil(s) } else { span / s } + 1;
            if ceil && (out - 1) * s >= n + p0 {
                out - 1
            } else {
                out
            }
        };
        [
            size(h, kh, self.stride[0], t, b),
            size(w, kw, self.stride[1], l, r),
        ]
    }

    /// The output columns `lo..hi` (of `wo`) whose window lies wholly inside an input row
    /// of width `w`: before `lo` and from `hi` on, windows reach into the padding.
    pub fn inside_columns(&self, w: usize, wo: usize) -> (usize, usize) {
        let (kw, sw, pl) = (self.kernel[1], self.stride[1], self.pads[1]);
        let lo = pl.div_ceil(sw).min(wo);
        let hi = if w + pl >= kw {
            ((w + pl - kw) / sw + 1).min(wo)
        } else {
            0
        };
        (lo, hi.max(lo))
    }

    /// The output columns of a row of `wo` in groups of at most `size`: `(first, count,
    /// inside)`, `inside` for a group of `size` whose windows all lie inside the input row
    /// (columns `lo..hi` of [`Window::inside_columns`]); the groups before `lo` and from
    /// the last inside one on are checked by the kernels, column by column.
    pub fn groups(
        wo: usize,
        (lo, hi): (usize, usize),
        size: usize,
    ) -> impl Iterator<Item = (usize, usize, bool)> {
        let mut ox = 0;
        std::iter::from_fn(move || {
            if ox >= wo {
                return None;
            }
            let group = if ox >= lo && ox + size <= hi {
                (ox, size, true)
            } else {
                let end = if ox < lo { lo } else { wo };
                (ox, (end - ox).min(size), false)
            };
            ox += group.1;
            Some(group)
        })
    }

    /// `f(lines, out_row)` for every output row of `out` (`ho` rows of `row_len` floats
    /// per image), in parallel: `lines[ky]` is the input line of `x [b, h, w, C]` that
    /// kernel row `ky` reads, `None` in the padding.
    pub fn rows<F>(
        &self,
        x: &[f32],
        [h, w, c]: [usize; 3],
        [ho, row_len]: [usize; 2],
        out: &mut [f32],
        f: F,
    ) where
        F: Fn(&[Option<&[f32]>], &mut [f32]) + Sync,
    {
        // One vector of lines per rayon job, refilled row by row (not one allocation a row).
        out.par_chunks_mut(row_len).enumerate().for_each_init(
            || Vec::with_capacity(self.kernel[0]),
            |lines, (index, out)| {
                let (image, oy) = (index / ho, index % ho);
                let image = &x[image * h * w * c..][..h * w * c];
                lines.clear();
                lines.extend((0..self.kernel[0]).map(|ky| {
                    let iy = (oy * self.stride[0] + ky).wrapping_sub(self.pads[0]);
                    (iy < h).then(|| &image[iy * w * c..][..w * c])
                }));
                f(lines, out);
            },
        );
    }
}
