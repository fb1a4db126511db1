//! 1x1 convolutions read in place, with AVX-512: `out [rows, n] = act(a [rows, k] · w [k,
//! n] + bias (+ residual))` with nothing packed, the bias, residual and activation applied
//! in registers before the one store. The packing GEMM copies the input once per call,
//! which for MobileNetV3's and EfficientNet's depths of 16–120 costs about as much as the
//! product, and its register tile wastes lanes on 24 or 40 columns. Here the columns go in
//! blocks of at most four vectors (72 = 3 + 2 vectors, not 4 + 1), each with as many rows
//! as keep 16 to 24 sums in registers; rows go in panels of about 4096 floats of input (at
//! least 48 rows) that stay in cache across the blocks, and a block's weights (`k` × 64
//! floats) stay in L2. The residual and output lines of a tile are fetched while its sums
//! run.

use super::pointwise::Act;

/// Floats of input per panel of rows (it stays in cache across the column blocks); a
/// panel has at least 48 rows, a multiple of every tile's rows.
const PANEL_FLOATS: usize = 4096;
/// Most summed channels: a column block of the weights (`k` × 64 floats) stays in L2.
const MAX_DEPTH: usize = 2048;

/// Whether a product of depth `k` goes through this kernel on this CPU.
pub fn applies(k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    let vectors = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let vectors = false;
    k <= MAX_DEPTH && vectors
}

/// One call's operands.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the AVX-512 kernels
struct Operands {
    /// `[rows, k]`.
    a: *const f32,
    /// `[k, n]`, row-major.
    w: *const f32,
    /// `[n]`.
    bias: *const f32,
    /// `[rows, n]`, or null.
    residual: *const f32,
    /// `[rows, n]`.
    out: *mut f32,
    k: usize,
    n: usize,
    /// Applied to the output.
    act: Act,
}

/// `out [rows, n] = act(a [rows, k] · w [k, n] + bias (+ residual))`, row-major.
///
/// # Safety
/// No one else accesses the `rows · n` elements at `out` during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn run(
    (rows, n, k): (usize, usize, usize),
    a: &[f32],
    w: &[f32],
    bias: &[f32],
    residual: Option<&[f32]>,
    act: Act,
    out: *mut f32,
) {
    assert!(applies(k), "the narrow product does not apply");
    assert_eq!(a.len(), rows * k, "narrow product input size");
    assert_eq!(w.len(), k * n, "narrow product weights size");
    assert_eq!(bias.len(), n, "narrow product bias size");
    assert!(
        residual.is_none_or(|r| r.len() == rows * n),
        "residual size"
    );
    let o = Operands {
        a: a.as_ptr(),
        w: w.as_ptr(),
        bias: bias.as_ptr(),
        residual: residual.map_or(std::ptr::null(), |r| r.as_ptr()),
        out,
        k,
        n,
        act,
    };
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F (`applies`), the operands' sizes are checked above and
    // the output rows are the caller's.
    unsafe {
        avx512::product(rows, o)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, o);
        unreachable!("the narrow product applies only with AVX-512")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::pointwise::vector::{activate, applies as in_registers, lanes};
    use super::{Act, Operands, PANEL_FLOATS};

    /// Rows `r0..r0 + N` × the `Q` vectors of columns from `j0`. (No closures: they would not
    /// inherit the target feature.)
    #[allow(clippy::needless_range_loop)] // index loops over the register tile, unrolled
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const N: usize, const Q: usize>(o: Operands, r0: usize, j0: usize) {
        // SAFETY (the whole body): rows r0..r0 + N of `a`, `residual` and `out` exist (checked
        // by `run`), the masks keep every column access below n, and the output rows are the
        // caller's.
        unsafe {
            let mut masks = [0u16; Q];
            for (q, m) in masks.iter_mut().enumerate() {
                *m = lanes(o.n, j0 + 16 * q);
            }
            // The residual arrives from a block's input, long out of cache: fetch it while the
            // sums run (a cache line per 16 floats).
            if !o.residual.is_null() {
                for r in 0..N {
                    for q in 0..Q {
                        let p = o.residual.add((r0 + r) * o.n + j0 + 16 * q);
                        _mm_prefetch::<_MM_HINT_T0>(p.cast());
                    }
                }
            }
            // And the output's lines, which a store would otherwise wait to own.
            {
                for r in 0..N {
                    for q in 0..Q {
                        let p = o.out.add((r0 + r) * o.n + j0 + 16 * q);
                        _mm_prefetch::<_MM_HINT_ET0>(p.cast());
                    }
                }
            }
            let a = o.a.add(r0 * o.k);
            let w = o.w.add(j0);
            let mut acc = [[_mm512_setzero_ps(); Q]; N];
            for kk in 0..o.k {
                let row = w.add(kk * o.n);
                let mut wv = [_mm512_setzero_ps(); Q];
                for q in 0..Q {
                    wv[q] = _mm512_maskz_loadu_ps(masks[q], row.add(16 * q));
                }
                for r in 0..N {
                    let s = _mm512_set1_ps(*a.add(r * o.k + kk));
                    for q in 0..Q {
                        acc[r][q] = _mm512_fmadd_ps(s, wv[q], acc[r][q]);
                    }
                }
            }
            let mut bias = [_mm512_setzero_ps(); Q];
            for q in 0..Q {
                bias[q] = _mm512_maskz_loadu_ps(masks[q], o.bias.add(j0 + 16 * q));
            }
            for r in 0..N {
                let at = (r0 + r) * o.n + j0;
                for q in 0..Q {
                    let mut add = bias[q];
                    if !o.residual.is_null() {
                        let res = _mm512_maskz_loadu_ps(masks[q], o.residual.add(at + 16 * q));
                        add = _mm512_add_ps(add, res);
                    }
                    let v = activate(o.act, _mm512_add_ps(acc[r][q], add));
                    _mm512_mask_storeu_ps(o.out.add(at + 16 * q), masks[q], v);
                }
            }
        }
    }

    /// Register tiles of `Q` vectors over rows `lo..hi`, `N` rows at a time: the last tile
    /// ends at `hi`, overlapping the one before (it writes the same values again) rather than
    /// being narrower; one row at a time where there are fewer than `N` rows in all.
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const N: usize, const Q: usize>(
        o: Operands,
        (lo, hi): (usize, usize),
        j0: usize,
    ) {
        // SAFETY: the tiles stay inside rows 0..hi, the caller's (the last one may reach below
        // `lo`, into the panel before: the same call's rows, written again with the same values).
        unsafe {
            if hi < N {
                (lo..hi).for_each(|r| tile::<1, Q>(o, r, j0));
                return;
            }
            let mut r0 = lo;
            while r0 < hi {
                tile::<N, Q>(o, r0.min(hi - N), j0);
                r0 += N;
            }
        }
    }

    /// The product of [`super::run`], column block by column block within panels of rows,
    /// then the activations that are not applied in registers.
    ///
    /// # Safety
    /// The CPU has AVX-512F, the operands hold `rows` rows, and the `rows · n` elements at
    /// `o.out` are the caller's.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(rows: usize, o: Operands) {
        let Operands { k, n, act, out, .. } = o;
        // The tiles apply the activations they can in registers, the others come after.
        let o = Operands {
            act: if in_registers(act) {
                act
            } else {
                Act::Identity
            },
            ..o
        };
        // Column blocks of at most four vectors, as even as they go.
        let vectors = n.div_ceil(16);
        let blocks = vectors.div_ceil(4);
        // Panels of rows whose input stays in cache across the column blocks.
        let panel = (PANEL_FLOATS / k.max(1)).next_multiple_of(48).max(48);
        for lo in (0..rows).step_by(panel) {
            let hi = (lo + panel).min(rows);
            let mut j0 = 0;
            for b in 0..blocks {
                let q = vectors / blocks + usize::from(b < vectors % blocks);
                // SAFETY: the caller's.
                unsafe {
                    match q {
                        1 => block::<16, 1>(o, (lo, hi), j0),
                        2 => block::<12, 2>(o, (lo, hi), j0),
                        3 => block::<8, 3>(o, (lo, hi), j0),
                        _ => block::<6, 4>(o, (lo, hi), j0),
                    }
                }
                j0 += 16 * q;
            }
        }
        if !in_registers(act) {
            // SAFETY: the caller's rows, written above.
            act.apply(unsafe { std::slice::from_raw_parts_mut(out, rows * n) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every column-block shape (1 to 4 vectors, masked lanes, 72 = 3 + 2 vectors, four
    /// blocks), rows fewer than a tile, not a multiple of it and across panels, with and
    /// without a residual, each activation (in registers or after the store), against a
    /// plain triple loop.
    #[test]
    fn matches_the_definition() {
        if !applies(1) {
            eprintln!("no AVX-512 on this CPU: the narrow product is not used here");
            return;
        }
        let acts = [Act::Identity, Act::Relu, Act::Hardswish, Act::Sigmoid];
        for (rows, n, k) in [
            (5, 16, 3),
            (37, 24, 16),
            (100, 40, 72),
            (13, 72, 24),
            (300, 200, 9),
            (7, 64, 1),
        ] {
            let a: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 37) % 11) as f32 * 0.25 - 1.25)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 13) % 7) as f32 * 0.5 - 1.5)
                .collect();
            let bias: Vec<f32> = (0..n).map(|i| (i % 5) as f32 - 2.0).collect();
            let res: Vec<f32> = (0..rows * n).map(|i| ((i * 7) % 9) as f32 - 4.0).collect();
            for act in acts {
                for residual in [None, Some(&res[..])] {
                    let mut expected = vec![0.0; rows * n];
                    for r in 0..rows {
                        for j in 0..n {
                            let sum = (0..k).map(|kk| a[r * k + kk] * w[kk * n + j]).sum::<f32>();
                            expected[r * n + j] =
                                sum + bias[j] + residual.map_or(0.0, |res| res[r * n + j]);
                        }
                    }
                    act.apply(&mut expected);
                    let mut out = vec![f32::NAN; rows * n];
                    // SAFETY: the CPU has AVX-512F; `out` holds rows × n.
                    unsafe { run((rows, n, k), &a, &w, &bias, residual, act, out.as_mut_ptr()) };
                    let what = format!(
                        "{rows}x{k} -> {n}, {act:?}, residual {}",
                        residual.is_some()
                    );
                    for (e, o) in expected.iter().zip(&out) {
                        assert!(
                            (e - o).abs() <= 1e-5 * e.abs().max(1.0),
                            "{what}: {e} vs {o}"
                        );
                    }
                }
            }
        }
    }
}
