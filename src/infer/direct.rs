//! Convolutions over few input channels (a network's first layer, on the image's three),
//! summed straight from the NHWC input: no im2col, which would copy a handful of floats
//! per tap and pixel, and no GEMM, whose register tile few output channels would leave
//! mostly empty. With AVX-512, eight output pixels at a time, their sums of up to 32
//! output channels in registers, each input value broadcast once per tap.

use super::pointwise::Act;
use super::window::Window;

/// Most input channels the direct path takes.
const MAX_IN: usize = 4;
/// Most output channels (two vectors of 16).
const MAX_OUT: usize = 32;

/// Whether the direct path serves a convolution of `cin` → `cout` channels on this CPU.
pub fn applies(cin: usize, cout: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    let vectors = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let vectors = false;
    cin <= MAX_IN && cout <= MAX_OUT && vectors
}

/// The convolution's operands: weights `[kh·kw·C, O]` (rows in (ky, kx, c) order), bias,
/// channels, geometry and activation.
pub struct Direct<'a> {
    /// `[kh·kw·C, O]`.
    pub weight: &'a [f32],
    /// `[O]`.
    pub bias: &'a [f32],
    /// Input channels `C`.
    pub cin: usize,
    /// Output channels `O`.
    pub cout: usize,
    /// Kernel, stride, padding.
    pub window: Window,
    /// Applied to the output.
    pub act: Act,
}

impl Direct<'_> {
    /// `out [b, ho, wo, O] = act(conv(x) + bias)` for `x [b, h, w, C]`, where [`applies`].
    pub fn run(&self, x: &[f32], [_, h, w]: [usize; 3], out: &mut [f32]) {
        assert!(
            applies(self.cin, self.cout),
            "the direct path does not apply"
        );
        let [ho, wo] = self.window.out_size(h, w, false);
        let inside = self.window.inside_columns(w, wo);
        let [kh, kw] = self.window.kernel;
        assert_eq!(self.weight.len(), kh * kw * self.cin * self.cout);
        assert_eq!(self.bias.len(), self.cout);
        self.window.rows(
            x,
            [h, w, self.cin],
            [ho, wo * self.cout],
            out,
            |lines, out| {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX-512F (`applies`); the columns inside come from
                // the window's geometry; the weights and bias are checked above, `row`
                // checks the lines and the output row.
                unsafe {
                    avx512::row(lines, self, w, inside, out)
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (lines, out);
                    unreachable!("the direct path applies only with AVX-512")
                }
            },
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::pointwise::vector;
    use super::{Direct, Window};

    /// Lane masks of the `Q` output vectors of `cout` channels.
    fn masks<const Q: usize>(cout: usize) -> [u16; Q] {
        std::array::from_fn(|q| {
            let lanes = cout.saturating_sub(16 * q).min(16);
            ((1u32 << lanes) - 1) as u16
        })
    }

    /// Output pixels `ox..ox + n` (`n ≤ P`) of one row into `out`; with `CHECKED`, the
    /// kernel columns outside the input row are skipped, else all lie inside it (and `n`
    /// is `P`).
    #[inline(always)]
    unsafe fn pixels<const Q: usize, const P: usize, const CHECKED: bool>(
        lines: &[Option<&[f32]>],
        d: &Direct,
        w: usize,
        (ox, n): (usize, usize),
        out: *mut f32,
    ) {
        let (cin, cout) = (d.cin, d.cout);
        let kw = d.window.kernel[1];
        let (sw, pl) = (d.window.stride[1], d.window.pads[1]);
        let m = masks::<Q>(cout);
        // SAFETY (the whole body): the masks keep the lanes inside the output channels;
        // unchecked, `row` was told that these pixels' windows lie inside the input row,
        // checked, only the columns inside are read; only pixels below `n` are written.
        unsafe {
            let bias: [__m512; Q] =
                std::array::from_fn(|q| _mm512_maskz_loadu_ps(m[q], d.bias.as_ptr().add(16 * q)));
            let mut acc = [bias; P];
            for (ky, line) in lines.iter().enumerate() {
                let Some(line) = line else { continue };
                for kx in 0..kw {
                    for c in 0..cin {
                        let row = d.weight.as_ptr().add(((ky * kw + kx) * cin + c) * cout);
                        let wv: [__m512; Q] =
                            std::array::from_fn(|q| _mm512_maskz_loadu_ps(m[q], row.add(16 * q)));
                        for (p, acc) in acc.iter_mut().enumerate() {
                            let ix = ((ox + p) * sw + kx).wrapping_sub(pl);
                            if CHECKED && (p >= n || ix >= w) {
                                continue;
                            }
                            let v = _mm512_set1_ps(*line.as_ptr().add(ix * cin + c));
                            for (acc, wv) in acc.iter_mut().zip(&wv) {
                                *acc = _mm512_fmadd_ps(v, *wv, *acc);
                            }
                        }
                    }
                }
            }
            let act = if vector::applies(d.act) {
                d.act
            } else {
                super::Act::Identity
            };
            for (p, acc) in acc.iter().enumerate().take(n) {
                for (q, acc) in acc.iter().enumerate() {
                    let v = vector::activate(act, *acc);
                    _mm512_mask_storeu_ps(out.add((ox + p) * cout + 16 * q), m[q], v);
                }
            }
        }
    }

    /// One output row `out [wo, O]` from the input lines of the kernel rows (`None` in the
    /// padding), with the activation (in registers where
    /// `pointwise::vector` has it, else after the row).
    ///
    /// # Safety
    /// The CPU has AVX-512F, and the windows of output columns `lo..hi` lie inside the
    /// input row (`Window::inside_columns`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row(
        lines: &[Option<&[f32]>],
        d: &Direct,
        w: usize,
        (lo, hi): (usize, usize),
        out: &mut [f32],
    ) {
        let wo = out.len() / d.cout;
        assert!(
            lines.len() == d.window.kernel[0]
                && lines.iter().flatten().all(|l| l.len() == w * d.cin)
                && out.len() == wo * d.cout
                && lo <= hi
                && hi <= wo
                && d.cout <= 32
        );
        let dst = out.as_mut_ptr();
        // SAFETY: the caller's (the windows of columns lo..hi lie inside the row), and the
        // sizes asserted.
        for (ox, n, inside) in Window::groups(wo, (lo, hi), 8) {
            unsafe {
                match (d.cout <= 16, inside, n) {
                    (true, true, 8) => pixels::<1, 8, false>(lines, d, w, (ox, n), dst),
                    (true, true, 4) => pixels::<1, 4, false>(lines, d, w, (ox, n), dst),
                    (true, true, 2) => pixels::<1, 2, false>(lines, d, w, (ox, n), dst),
                    (true, true, _) => pixels::<1, 1, false>(lines, d, w, (ox, n), dst),
                    (true, false, _) => pixels::<1, 8, true>(lines, d, w, (ox, n), dst),
                    (false, true, 8) => pixels::<2, 8, false>(lines, d, w, (ox, n), dst),
                    (false, true, 4) => pixels::<2, 4, false>(lines, d, w, (ox, n), dst),
                    (false, true, 2) => pixels::<2, 2, false>(lines, d, w, (ox, n), dst),
                    (false, true, _) => pixels::<2, 1, false>(lines, d, w, (ox, n), dst),
                    (false, false, _) => pixels::<2, 8, true>(lines, d, w, (ox, n), dst),
                }
            }
        }
        if !vector::applies(d.act) {
            super::super::pointwise::apply_slice(d.act, out);
        }
    }
}
