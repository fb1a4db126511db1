//! The product of few rows (squeeze-and-excitation, classifiers, one image's last feature
//! maps) without packing: `dst [m, n] = a [m, k] · w [k, n]` with `w` read in place, a
//! register tile of 4 rows × 64 columns at a time (AVX-512; a portable loop elsewhere). A
//! packing GEMM copies all of `w` for every call, which for a handful of rows costs more
//! than the product itself. The weights are row-major, or laid out once in column panels of
//! 64 (`Layout::panels`) so that a tile streams its panel contiguously; panel by panel, all
//! row tiles, so that the panel stays in cache.

/// Rows of the register tile.
const R: usize = 4;
/// Columns of the register tile.
const C: usize = 64;

/// Where element `(kk, j)` of the weights `w [k × n]` lies: at `(j / 64)·panel + kk·ldw +
/// j % 64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Between rows.
    pub ldw: usize,
    /// Between column panels of 64.
    pub panel: usize,
}

impl Layout {
    /// Row-major with row stride `ldw`.
    pub fn row_major(ldw: usize) -> Self {
        Self { ldw, panel: C }
    }

    /// Column panels of 64 of `k` rows each, one after the other.
    pub fn panels(k: usize) -> Self {
        Self {
            ldw: C,
            panel: C * k,
        }
    }

    /// The position of column `j` in row 0.
    pub fn column(&self, j: usize) -> usize {
        (j / C) * self.panel + j % C
    }
}

/// Row-major `w [k × n]` in column panels of 64 (`Layout::panels(k)`), the last one padded
/// with zeros.
pub fn to_panels(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), k * n);
    let mut out = vec![0.0; n.div_ceil(C) * C * k];
    for (p, panel) in out.chunks_exact_mut(C * k).enumerate() {
        let (j0, cols) = (p * C, C.min(n - p * C));
        for (row, out) in w.chunks_exact(n).zip(panel.chunks_exact_mut(C)) {
            out[..cols].copy_from_slice(&row[j0..j0 + cols]);
        }
    }
    out
}

/// The operands of one call: `a [m × k]` (row stride `lda`), `w [k × n]` (in `layout`),
/// `dst` (row stride `ldd`).
#[derive(Clone, Copy)]
struct Operands<'a> {
    a: &'a [f32],
    lda: usize,
    w: &'a [f32],
    layout: Layout,
    dst: *mut f32,
    ldd: usize,
}

/// The portable product.
fn portable((m, n, k): (usize, usize, usize), o: Operands) {
    for j0 in (0..n).step_by(C) {
        for r in 0..m {
            let cols = C.min(n - j0);
            let mut acc = [0f32; C];
            let acc = &mut acc[..cols];
            for kk in 0..k {
                let s = o.a[r * o.lda + kk];
                let wrow = &o.w[o.layout.column(j0) + kk * o.layout.ldw..][..cols];
                acc.iter_mut().zip(wrow).for_each(|(a, w)| *a += s * w);
            }
            // SAFETY: the contract of `gemm_rows`.
            let d = unsafe { std::slice::from_raw_parts_mut(o.dst.add(r * o.ldd + j0), cols) };
            d.copy_from_slice(acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{C, Operands, R};

    /// One tile: rows `r0..r0 + N` (N ≤ 4), columns `j0..j0 + 16·Q` with `masks` for the
    /// lanes of each 16-wide vector. (No closures: they would not inherit the target
    /// feature, and each intrinsic would become a call.)
    #[allow(clippy::needless_range_loop)] // index loops over the register tile, unrolled
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const N: usize, const Q: usize>(
        k: usize,
        o: Operands,
        r0: usize,
        j0: usize,
        masks: [u16; Q],
    ) {
        // SAFETY (the whole body): rows r0..r0 + N of `a` hold k values, rows 0..k of
        // `w` hold columns j0..j0 + 16·Q where the masks are set (checked by `gemm_rows`),
        // and the destination rows are the caller's.
        unsafe {
            let mut a = [o.a.as_ptr(); N];
            for (r, a) in a.iter_mut().enumerate() {
                *a = o.a.as_ptr().add((r0 + r) * o.lda);
            }
            let w = o.w.as_ptr().add(o.layout.column(j0));
            let mut acc = [[_mm512_setzero_ps(); Q]; N];
            let mut wv = [_mm512_setzero_ps(); Q];
            for kk in 0..k {
                let row = w.add(kk * o.layout.ldw);
                for q in 0..Q {
                    wv[q] = _mm512_maskz_loadu_ps(masks[q], row.add(16 * q));
                }
                for r in 0..N {
                    let s = _mm512_set1_ps(*a[r].add(kk));
                    for q in 0..Q {
                        acc[r][q] = _mm512_fmadd_ps(s, wv[q], acc[r][q]);
                    }
                }
            }
            for r in 0..N {
                for q in 0..Q {
                    let d = o.dst.add((r0 + r) * o.ldd + j0 + 16 * q);
                    _mm512_mask_storeu_ps(d, masks[q], acc[r][q]);
                }
            }
        }
    }

    /// The tile of `N` rows from `r0` and `vectors` vectors of columns from `j0`.
    #[inline(always)]
    unsafe fn tiles<const N: usize>(
        k: usize,
        o: Operands,
        r0: usize,
        j0: usize,
        vectors: usize,
        mask: impl Fn(usize) -> u16,
    ) {
        // SAFETY: the caller's.
        unsafe {
            match vectors {
                1 => tile::<N, 1>(k, o, r0, j0, [mask(0)]),
                2 => tile::<N, 2>(k, o, r0, j0, [mask(0), mask(1)]),
                3 => tile::<N, 3>(k, o, r0, j0, [mask(0), mask(1), mask(2)]),
                _ => tile::<N, 4>(k, o, r0, j0, [mask(0), mask(1), mask(2), mask(3)]),
            }
        }
    }

    /// The product, tile by tile.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product((m, n, k): (usize, usize, usize), o: Operands) {
        for j0 in (0..n).step_by(C) {
            for r0 in (0..m).step_by(R) {
                let rows = R.min(m - r0);
                let cols = C.min(n - j0);
                let vectors = cols.div_ceil(16);
                let last = cols - 16 * (vectors - 1);
                let mask = |q: usize| {
                    if q + 1 < vectors || last == 16 {
                        u16::MAX
                    } else {
                        (1u16 << last) - 1
                    }
                };
                // SAFETY: the contract of `gemm_rows`.
                unsafe {
                    match rows {
                        1 => tiles::<1>(k, o, r0, j0, vectors, mask),
                        2 => tiles::<2>(k, o, r0, j0, vectors, mask),
                        3 => tiles::<3>(k, o, r0, j0, vectors, mask),
                        _ => tiles::<4>(k, o, r0, j0, vectors, mask),
                    }
                }
            }
        }
    }
}

/// `dst [m × n] (row stride ldd) = a [m × k] (row stride lda) · w [k × n] (in `layout`).
///
/// # Safety
/// For each `r < m`, the `n` elements at `dst + r·ldd` are valid and no one else accesses
/// them during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    w: &[f32],
    layout: Layout,
    dst: *mut f32,
    ldd: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k);
    assert!(w.len() > layout.column(n - 1) + (k.max(1) - 1) * layout.ldw);
    let o = Operands {
        a,
        lda,
        w,
        layout,
        dst,
        ldd,
    };
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the operands' extents are checked above and the
        // destination is the caller's.
        return unsafe { avx512::product((m, n, k), o) };
    }
    portable((m, n, k), o);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile shape (full, partial rows, partial and masked columns), on this CPU's
    /// path and the portable one, with the weights row-major and in panels, against a
    /// plain triple loop.
    #[test]
    fn matches_the_definition() {
        let (m, n, k) = (7, 150, 33);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 13) % 7) as f32 * 0.5 - 1.5)
            .collect();
        // Whatever the destination held is replaced.
        let start = vec![f32::NAN; m * n];
        let mut expected = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                expected[r * n + j] = (0..k).map(|kk| a[r * k + kk] * w[kk * n + j]).sum::<f32>();
            }
        }
        let panels = to_panels(&w, k, n);
        for (w, layout) in [(&w, Layout::row_major(n)), (&panels, Layout::panels(k))] {
            let mut dst = start.clone();
            // SAFETY: dst holds m rows of n.
            unsafe { gemm_rows((m, n, k), &a, k, w, layout, dst.as_mut_ptr(), n) };
            assert_eq!(dst, expected, "{layout:?}");
            let mut dst = start.clone();
            let o = Operands {
                a: &a,
                lda: k,
                w,
                layout,
                dst: dst.as_mut_ptr(),
                ldd: n,
            };
            portable((m, n, k), o);
            assert_eq!(dst, expected, "portable, {layout:?}");
        }
    }
}
