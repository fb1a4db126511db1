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
    /// inside)`. The columns `lo..hi` of [`Window::inside_columns`], whose windows lie
    /// inside the input row, come as `inside` groups: of `size`, then the rest in powers
    /// of two (7 = 4 + 2 + 1), so that a kernel's fixed-width paths take them unchecked;
    /// the columns before `lo` and from `hi` on come as groups that the kernels check
    /// column by column.
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
            let group = if ox < lo {
                (ox, (lo - ox).min(size), false)
            } else if ox < hi {
                let left = hi - ox;
                let n = if left >= size {
                    size
                } else {
                    1 << left.ilog2()
                };
                (ox, n, true)
            } else {
                (ox, (wo - ox).min(size), false)
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

#[cfg(test)]
mod tests {
    use super::Window;

    /// The groups cover the row once, in order; inside groups lie in `lo..hi` and are
    /// full or of halving sizes; checked ones lie outside it.
    #[test]
    fn groups_cover_the_row() {
        for (wo, lo, hi) in [
            (14, 1, 13),
            (7, 2, 5),
            (56, 1, 55),
            (5, 0, 5),
            (3, 2, 2),
            (9, 0, 0),
        ] {
            let groups: Vec<_> = Window::groups(wo, (lo, hi), 8).collect();
            let mut next = 0;
            for &(ox, n, inside) in &groups {
                assert_eq!(ox, next, "{groups:?}");
                assert!(n > 0 && n <= 8, "{groups:?}");
                if inside {
                    assert!(
                        ox >= lo && ox + n <= hi && n.is_power_of_two(),
                        "{groups:?}"
                    );
                } else {
                    assert!(ox + n <= lo || ox >= hi, "{groups:?}");
                }
                next = ox + n;
            }
            assert_eq!(next, wo, "{groups:?}");
        }
        let sizes: Vec<_> = Window::groups(14, (1, 13), 8).map(|g| g.1).collect();
        assert_eq!(sizes, [1, 8, 4, 1]);
    }
}
