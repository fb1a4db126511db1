//! Winograd's F(2x2, 3x3) for the 3x3, stride-1, padding-1 convolutions of the inference
//! plan (most of a ResNet's work): each 2x2 block of output pixels comes from a 4x4 patch of
//! the input as `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`, so the products become 16 GEMMs over the
//! channels, `M[ξ] [tiles, O] = V[ξ] [tiles, C] · U[ξ] [C, O]`: 16 multiply-adds per tile
//! and channel pair where the direct convolution needs 36, 2.25 times fewer. The transforms
//! only add, subtract and halve, so the result stays within a few ulps of the direct
//! convolution. Tiles go a block at a time (transform, GEMMs, back-transform with the bias,
//! residual and activation), so the transformed values stay in cache.

use std::cell::RefCell;

use rayon::prelude::*;

use super::conv::{Out, product};
use super::pointwise::{Act, finish_slice};
use crate::ops::flex::dispatch_simd;

/// Target floats of one ξ's operands in a block (`tiles · (C + O)`): they stay in cache.
const BLOCK_FLOATS: usize = 1 << 16;
/// Fewest tiles per block (the GEMM's rows).
const MIN_TILES: usize = 32;

thread_local! {
    /// Each worker's transformed input, products and row temporary, kept between calls.
    static SCRATCH: RefCell<[Vec<f32>; 3]> =
        const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// The transformed weights of one convolution.
#[derive(Debug, Clone)]
pub struct Winograd {
    cin: usize,
    cout: usize,
    /// `U[ξ] = (G g Gᵀ)[ξ]`, as `[16, C, O]`.
    u: Vec<f32>,
}

#[inline(always)]
fn zip2(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    out.iter_mut()
        .zip(a.iter().zip(b))
        .for_each(|(o, (&a, &b))| *o = f(a, b));
}

/// `V = Bᵀ d B` of one tile: `d[i·4 + j]` the patch's pixel (i, j) (C channels), `V[ξ]`
/// written at `v[ξ · stride..][..C]`, `t` a 16·C temporary.
#[inline(always)]
fn input_transform(d: &[&[f32]; 16], v: &mut [f32], stride: usize, t: &mut [f32]) {
    let c = d[0].len();
    // Bᵀ d, row by row: d0 − d2, d1 + d2, d2 − d1, d1 − d3.
    for j in 0..4 {
        let row = |i: usize| d[i * 4 + j];
        let (r0, rest) = t.split_at_mut(4 * c);
        let (r1, rest) = rest.split_at_mut(4 * c);
        let (r2, r3) = rest.split_at_mut(4 * c);
        let at = j * c..(j + 1) * c;
        zip2(row(0), row(2), &mut r0[at.clone()], |a, b| a - b);
        zip2(row(1), row(2), &mut r1[at.clone()], |a, b| a + b);
        zip2(row(2), row(1), &mut r2[at.clone()], |a, b| a - b);
        zip2(row(1), row(3), &mut r3[at], |a, b| a - b);
    }
    // Then times B, the same combinations along each row.
    for r in 0..4 {
        let at = |j: usize| &t[(r * 4 + j) * c..][..c];
        let to = |j: usize| (r * 4 + j) * stride;
        zip2(at(0), at(2), &mut v[to(0)..][..c], |a, b| a - b);
        zip2(at(1), at(2), &mut v[to(1)..][..c], |a, b| a + b);
        zip2(at(2), at(1), &mut v[to(2)..][..c], |a, b| a - b);
        zip2(at(1), at(3), &mut v[to(3)..][..c], |a, b| a - b);
    }
}

/// `Y = Aᵀ M A` of one tile, `M[ξ]` at `m[ξ · stride..][..O]`: the four output pixels
/// `y[r·2 + s]` (O channels each) into `y`, with `t` an 8·O temporary.
#[inline(always)]
fn output_transform(m: &[f32], stride: usize, t: &mut [f32], y: &mut [f32]) {
    let o = y.len() / 4;
    let at = |xi: usize| &m[xi * stride..][..o];
    // Aᵀ M: m0 + m1 + m2 and m1 − m2 − m3, for each column j.
    for j in 0..4 {
        let (t0, t1) = t.split_at_mut(4 * o);
        let (t0, t1) = (&mut t0[j * o..][..o], &mut t1[j * o..][..o]);
        let (m0, m1, m2, m3) = (at(j), at(4 + j), at(8 + j), at(12 + j));
        for k in 0..o {
            t0[k] = m0[k] + m1[k] + m2[k];
            t1[k] = m1[k] - m2[k] - m3[k];
        }
    }
    // Then times A along each row.
    for r in 0..2 {
        let row = |j: usize| &t[(r * 4 + j) * o..][..o];
        let (a0, a1, a2, a3) = (row(0), row(1), row(2), row(3));
        let (y0, y1) = y[r * 2 * o..][..2 * o].split_at_mut(o);
        for k in 0..o {
            y0[k] = a0[k] + a1[k] + a2[k];
            y1[k] = a1[k] - a2[k] - a3[k];
        }
    }
}

/// The input transform of tiles `first..first + count` of `x [b, h, w, C]` into
/// `v [16, count, C]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn transform_inputs(
    x: &[f32],
    [h, w, c]: [usize; 3],
    (first, count): (usize, usize),
    zeros: &[f32],
    v: &mut [f32],
    t: &mut [f32],
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    for i in 0..count {
        let tile = first + i;
        let (image, rest) = (tile / (th * tw), tile % (th * tw));
        let (y0, x0) = (2 * (rest / tw), 2 * (rest % tw));
        let image = &x[image * h * w * c..][..h * w * c];
        let d: [&[f32]; 16] = std::array::from_fn(|k| {
            // The patch starts one pixel up and left of the tile (padding 1).
            let (iy, ix) = ((y0 + k / 4).wrapping_sub(1), (x0 + k % 4).wrapping_sub(1));
            if iy < h && ix < w {
                &image[(iy * w + ix) * c..][..c]
            } else {
                zeros
            }
        });
        input_transform(&d, &mut v[i * c..], count * c, t);
    }
}

dispatch_simd!(transform_inputs_simd(
    x: &[f32],
    shape: [usize; 3],
    tiles: (usize, usize),
    zeros: &[f32],
    v: &mut [f32],
    t: &mut [f32]
) => transform_inputs(x, shape, tiles, zeros, v, t));

/// How the output of a block is finished: bias, residual, activation.
struct Finish<'a> {
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
    act: Act,
}

/// The output transform of tiles `first..first + count` from `m [16, count, O]`, finished
/// and written to the pixels of `out [b, h, w, O]` they cover.
#[inline(always)]
fn transform_outputs(
    m: &[f32],
    [h, w, o]: [usize; 3],
    (first, count): (usize, usize),
    finish: &Finish,
    t: &mut [f32],
    out: Out,
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let (t, y) = t.split_at_mut(8 * o);
    for i in 0..count {
        let tile = first + i;
        let (image, rest) = (tile / (th * tw), tile % (th * tw));
        let (y0, x0) = (2 * (rest / tw), 2 * (rest % tw));
        output_transform(&m[i * o..], count * o, t, &mut y[..4 * o]);
        for (k, y) in y.chunks_exact(o).take(4).enumerate() {
            let (oy, ox) = (y0 + k / 2, x0 + k % 2);
            if oy >= h || ox >= w {
                continue;
            }
            let pixel = (image * h + oy) * w + ox;
            // SAFETY: each pixel belongs to one tile, and each tile to one task.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.at(pixel * o), o) };
            dst.iter_mut().zip(y).for_each(|(d, &v)| *d = v);
            let residual = finish.residual.map(|r| &r[pixel * o..][..o]);
            finish_slice(dst, finish.bias, residual, finish.act);
        }
    }
}

dispatch_simd!(transform_outputs_simd(
    m: &[f32],
    shape: [usize; 3],
    tiles: (usize, usize),
    finish: &Finish,
    t: &mut [f32],
    out: Out
) => transform_outputs(m, shape, tiles, finish, t, out));

impl Winograd {
    /// From ONNX's `[O, C, 3, 3]` weights.
    pub fn new(w: &[f32], cout: usize, cin: usize) -> Self {
        let mut u = vec![0.0; 16 * cin * cout];
        for o in 0..cout {
            for c in 0..cin {
                let g = &w[(o * cin + c) * 9..][..9];
                // G g: rows g0, (g0 + g1 + g2)/2, (g0 − g1 + g2)/2, g2 (each 3 wide).
                let gg: [[f32; 3]; 4] = std::array::from_fn(|r| {
                    std::array::from_fn(|j| {
                        let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
                        match r {
                            0 => a,
                            1 => (a + b + c) * 0.5,
                            2 => (a - b + c) * 0.5,
                            _ => c,
                        }
                    })
                });
                // (G g) Gᵀ: the same along each row.
                for (r, [a, b, c2]) in gg.into_iter().enumerate() {
                    let row = [a, (a + b + c2) * 0.5, (a - b + c2) * 0.5, c2];
                    for (j, value) in row.into_iter().enumerate() {
                        u[((r * 4 + j) * cin + c) * cout + o] = value;
                    }
                }
            }
        }
        Self { cin, cout, u }
    }

    /// 2x2 tiles of `b` images of `h` × `w`.
    pub fn tiles([b, h, w]: [usize; 3]) -> usize {
        b * h.div_ceil(2) * w.div_ceil(2)
    }

    /// `out [b, h, w, O] = act(conv3x3(x) + bias (+ residual))` for `x [b, h, w, C]`.
    pub fn run(
        &self,
        x: &[f32],
        [b, h, w]: [usize; 3],
        bias: &[f32],
        residual: Option<&[f32]>,
        act: Act,
        out: &mut [f32],
    ) {
        let (c, o) = (self.cin, self.cout);
        // The tasks write through raw pointers: the sizes are checked in every build.
        assert_eq!(x.len(), b * h * w * c, "convolution input size");
        assert_eq!(out.len(), b * h * w * o, "convolution output size");
        assert!(
            residual.is_none_or(|r| r.len() == out.len()),
            "residual size"
        );
        let tiles = Self::tiles([b, h, w]);
        let threads = rayon::current_num_threads();
        // Enough tiles per block to keep a ξ's operands in cache, but when the transformed
        // weights (16·C·O, read once per block) outweigh a block's operands several times,
        // one block per thread, so that they are read as few times as possible.
        let mut per_block = (BLOCK_FLOATS / (c + o)).max(MIN_TILES);
        if c * o > 4 * per_block * (c + o) {
            per_block = tiles;
        }
        let per_block = per_block.min(tiles.div_ceil(threads)).max(1);
        let blocks = tiles.div_ceil(per_block);
        let finish = Finish {
            bias,
            residual,
            act,
        };
        let dst = Out::new(out);
        (0..blocks).into_par_iter().for_each(|block| {
            let first = block * per_block;
            let count = per_block.min(tiles - first);
            SCRATCH.with_borrow_mut(|[v, m, t]| {
                v.resize(v.len().max(16 * count * c + c), 0.0);
                m.resize(m.len().max(16 * count * o), 0.0);
                t.resize(t.len().max(16 * c.max(o)), 0.0);
                let (v, zeros) = v.split_at_mut(16 * count * c);
                let zeros = &mut zeros[..c];
                zeros.fill(0.0);
                transform_inputs_simd(x, [h, w, c], (first, count), zeros, v, t);
                for xi in 0..16 {
                    // SAFETY: V[ξ] is count × C and U[ξ] C × O row-major, M[ξ] count × O
                    // row-major in this task's own scratch.
                    unsafe {
                        product(
                            (count, o, c),
                            (v.as_ptr().add(xi * count * c), c),
                            (self.u.as_ptr().add(xi * c * o), o),
                            (m.as_mut_ptr().add(xi * count * o), o),
                        );
                    }
                }
                transform_outputs_simd(m, [h, w, o], (first, count), &finish, t, dst);
            });
        });
    }
}
