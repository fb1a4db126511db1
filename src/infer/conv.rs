//! Convolution and linear layers of the inference plan, in NHWC: the output pixels are the
//! rows of one GEMM, `out [pixels, O] = col [pixels, kh·kw·C] · W [kh·kw·C, O]`, where `col`
//! is the im2col of a tile of rows (a 1x1 convolution with stride 1 reads its input as it
//! is). The product goes through the `gemm` crate, or for few rows through the unpacked
//! product of `rows.rs`; then one pass over the tile, still in cache, adds the
//! (BatchNorm-folded) bias and the fused residual and applies the activation. 3x3 stride-1
//! convolutions with enough tiles go through Winograd's transform (`winograd.rs`), and a
//! first layer on the image's few channels is summed directly (`direct.rs`). With AVX-512, a
//! 1x1 convolution read in place goes through `narrow.rs`, its epilogue in registers.

use std::cell::RefCell;

use rayon::prelude::*;

use super::aligned::Aligned;
use super::direct::{self, Direct};
use super::narrow;
use super::pointwise::{Act, finish_rows};
use super::rows::{Layout, gemm_rows, to_panels};
use super::window::Window;
use super::winograd::Winograd;

/// Target size of one tile's im2col, in floats (a few hundred KiB: it stays in cache).
const COL_TILE: usize = 1 << 16;
/// Fewest rows of a tile, so that packing the weights (once per tile) stays cheap.
const MIN_ROWS: usize = 96;
/// Output channels per column block are a multiple of this (the GEMM's register tile).
const COL_ALIGN: usize = 16;
/// At most this many output rows go through the unpacked product of few rows (`rows.rs`).
const FEW_ROWS: usize = 64;
/// ... and a depth at most this (its column panel of the weights then stays in cache).
const FEW_ROWS_DEPTH: usize = 1024;
/// Its column blocks are a multiple of its register tile's columns...
const FEW_ROWS_COLS: usize = 64;
/// ... and its row tiles at least its rows.
const ROWS_TILE: usize = 4;
/// Fewest 2x2 tiles for which a 3x3 convolution goes through Winograd's transform. Its
/// weights are 16/9 the size of the direct ones and each is used once per tile: with fewer
/// tiles (one image's 7x7 maps have 16) reading them costs more than the products saved.
const WINOGRAD_MIN_TILES: usize = 32;

thread_local! {
    /// Each worker's im2col tile, kept between calls.
    static COL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A convolution (groups 1, no dilation) or linear layer with its BatchNorm folded in.
#[derive(Debug, Clone)]
pub struct Conv {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel, stride, padding.
    pub window: Window,
    /// `[kh·kw·C, O]`, rows in (ky, kx, c) order, laid out as `layout` says.
    weight: Aligned,
    /// Row-major, or column panels for the few-rows product (`Conv::for_output`).
    layout: Layout,
    /// `[O]`.
    bias: Aligned,
    /// Applied to the output (after the residual).
    pub act: Act,
    /// Winograd's transform of the weights (3x3, stride 1, padding 1).
    winograd: Option<Winograd>,
}

/// Shared output pointer for tasks that write disjoint tiles.
#[derive(Clone, Copy)]
pub(super) struct Out(*mut f32);
// SAFETY: every task writes its own rows × columns of the output (see `Conv::run`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Shares `out` for disjoint writes.
    pub(super) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// The element at `offset`.
    ///
    /// # Safety
    /// `offset` lies inside the output.
    pub(super) unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: guaranteed by the caller.
        unsafe { self.0.add(offset) }
    }
}

/// `dst [m × n] = a [m × k] · w [k × n]`, each operand row-major with the row stride given
/// beside it, through the `gemm` crate on this thread. Never with gemm's own threads: a
/// worker holding its scratch while it waited could be handed a task that borrows it again.
///
/// # Safety
/// The operands hold what their shapes and strides say, and `dst`'s rows are the caller's.
pub(super) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    (a, lda): (*const f32, usize),
    (w, ldw): (*const f32, usize),
    (dst, ldd): (*mut f32, usize),
) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ldd as isize,
            false,
            a,
            1,
            lda as isize,
            w,
            1,
            ldw as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

impl Conv {
    /// From ONNX's `[O, C, kh, kw]` weights.
    pub fn from_oihw(
        w: &[f32],
        [cout, cin, kh, kw]: [usize; 4],
        bias: Option<&[f32]>,
        stride: [usize; 2],
        pads: [usize; 4],
    ) -> Self {
        let k = kh * kw * cin;
        let mut weight = vec![0.0; k * cout];
        for o in 0..cout {
            for c in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        weight[((ky * kw + kx) * cin + c) * cout + o] =
                            w[((o * cin + c) * kh + ky) * kw + kx];
                    }
                }
            }
        }
        let winograd = ([kh, kw] == [3, 3] && stride == [1, 1] && pads == [1; 4])
            .then(|| Winograd::new(w, cout, cin));
        Self {
            cin,
            cout,
            window: Window {
                kernel: [kh, kw],
                stride,
                pads,
            },
            weight: weight.into(),
            layout: Layout::row_major(cout),
            bias: bias.map_or_else(|| Aligned::zeros(cout), Aligned::from),
            act: Act::Identity,
            winograd,
        }
    }

    /// A linear layer `y = x · W + b` with `W [inputs, outputs]` (Burn's layout).
    pub fn linear(w: &[f32], [inputs, outputs]: [usize; 2], bias: Option<&[f32]>) -> Self {
        Self {
            cin: inputs,
            cout: outputs,
            window: Window {
                kernel: [1, 1],
                stride: [1, 1],
                pads: [0; 4],
            },
            weight: w.into(),
            layout: Layout::row_major(outputs),
            bias: bias.map_or_else(|| Aligned::zeros(outputs), Aligned::from),
            act: Act::Identity,
            winograd: None,
        }
    }

    /// Output height and width for an input of `h` × `w`.
    pub fn out_size(&self, h: usize, w: usize) -> [usize; 2] {
        self.window.out_size(h, w, false)
    }

    /// Prepares for outputs of `pixels` pixels per image: where one image's rows are few
    /// (pooled features, the last small maps), every batch goes through the few-rows
    /// product, its weights laid out once in the column panels it streams.
    pub fn for_output(&mut self, pixels: usize) {
        let k = self.depth();
        if pixels <= FEW_ROWS && k <= FEW_ROWS_DEPTH && !self.in_panels() {
            self.weight = to_panels(&self.weight, k, self.cout).into();
            self.layout = Layout::panels(k);
        }
    }

    /// Whether the weights are laid out in the few-rows product's column panels.
    fn in_panels(&self) -> bool {
        self.layout != Layout::row_major(self.cout)
    }

    /// The GEMM's summed dimension, `kh·kw·C`.
    fn depth(&self) -> usize {
        self.window.kernel[0] * self.window.kernel[1] * self.cin
    }

    /// Whether the product may go through the unpacked kernel of `narrow.rs`: a 1x1
    /// convolution read in place, of depth at most 2048, on a CPU with AVX-512 (`run`
    /// takes it where the tiles are whole rows and not few).
    fn narrow(&self) -> bool {
        self.reads_input_directly() && !self.in_panels() && narrow::applies(self.depth())
    }

    /// Whether the input already is the GEMM's left operand (1x1, stride 1, no padding).
    fn reads_input_directly(&self) -> bool {
        let Window {
            kernel,
            stride,
            pads,
        } = self.window;
        kernel == [1, 1] && stride == [1, 1] && pads == [0; 4]
    }

    /// `out = act(conv(x) + bias (+ residual))` for `x [b, h, w, C]` (NHWC), `out` and
    /// `residual` `[b, ho, wo, O]`.
    pub fn run(&self, x: &[f32], [b, h, w]: [usize; 3], residual: Option<&[f32]>, out: &mut [f32]) {
        let [ho, wo] = self.out_size(h, w);
        let (m, k, n) = (b * ho * wo, self.depth(), self.cout);
        // The kernels write through raw pointers: the sizes are checked in every build.
        assert_eq!(x.len(), b * h * w * self.cin, "convolution input size");
        assert_eq!(out.len(), m * n, "convolution output size");
        assert!(residual.is_none_or(|r| r.len() == m * n), "residual size");
        if residual.is_none() && !self.in_panels() && direct::applies(self.cin, self.cout) {
            let direct = Direct {
                weight: &self.weight,
                bias: &self.bias,
                cin: self.cin,
                cout: self.cout,
                window: self.window,
                act: self.act,
            };
            return direct.run(x, [b, h, w], out);
        }
        if let Some(winograd) = &self.winograd
            && Winograd::tiles([b, h, w]) >= WINOGRAD_MIN_TILES
        {
            return winograd.run(x, [b, h, w], &self.bias, residual, self.act, out);
        }
        let threads = rayon::current_num_threads();
        // The few-rows product (few rows, or weights laid out for it) packs nothing, so its
        // row tiles may be as short as its register tile.
        let few = (m <= FEW_ROWS && k <= FEW_ROWS_DEPTH) || self.in_panels();
        let min_rows = if few { ROWS_TILE } else { MIN_ROWS };
        // Row tiles: about COL_TILE floats of im2col each and at least one per thread, of at
        // least `min_rows` rows (fewer only when the whole product has fewer), a multiple of
        // the threads. Whole rows keep one epilogue call per tile.
        let mut tiles = (m * k)
            .div_ceil(COL_TILE)
            .max(threads)
            .min(m.div_ceil(min_rows))
            .max(1);
        if tiles > 1 {
            tiles = tiles.next_multiple_of(threads);
        }
        let rows = m.div_ceil(tiles);
        let tiles = m.div_ceil(rows);
        // Too few row tiles for the threads (one image's pooled features): split the output
        // channels too.
        let align = if few { FEW_ROWS_COLS } else { COL_ALIGN };
        let blocks = if tiles < threads {
            (threads / tiles).min(n.div_ceil(align)).max(1)
        } else {
            1
        };
        let cols = n.div_ceil(blocks).next_multiple_of(align).min(n);
        let blocks = n.div_ceil(cols);
        let narrow = blocks == 1 && !few && self.narrow();
        let dst = Out::new(out);
        (0..tiles * blocks).into_par_iter().for_each(|task| {
            let (tile, block) = (task / blocks, task % blocks);
            let r0 = tile * rows;
            let r1 = (r0 + rows).min(m);
            let c0 = block * cols;
            let c1 = (c0 + cols).min(n);
            if narrow {
                let residual = residual.map(|res| &res[r0 * n..r1 * n]);
                // SAFETY: this task alone writes rows r0..r1 of `out`, which has m × n
                // elements.
                unsafe {
                    narrow::run(
                        (r1 - r0, n, k),
                        &x[r0 * k..r1 * k],
                        &self.weight,
                        &self.bias,
                        residual,
                        self.act,
                        dst.at(r0 * n),
                    )
                };
                return;
            }
            COL.with_borrow_mut(|col| {
                let lhs: &[f32] = if self.reads_input_directly() {
                    &x[r0 * k..r1 * k]
                } else {
                    col.resize(col.len().max((r1 - r0) * k), 0.0);
                    self.im2col(x, [h, w], [ho, wo], r0..r1, &mut col[..(r1 - r0) * k]);
                    &col[..(r1 - r0) * k]
                };
                // SAFETY: this task alone writes rows r0..r1 × columns c0..c1 of `out`,
                // which has m × n elements; the pointer outlives the parallel loop.
                let tile_out = |r: usize| unsafe {
                    std::slice::from_raw_parts_mut(dst.at(r * n + c0), c1 - c0)
                };
                let residual_row = |r: usize| residual.map(|res| &res[r * n + c0..r * n + c1]);
                // SAFETY: lhs is (r1−r0) × k row-major, the weights k × n row-major (read
                // from column c0), the destination rows r0..r1 × columns c0..c1 of `out`
                // (row stride n), written by this task only.
                unsafe {
                    let shape = (r1 - r0, c1 - c0, k);
                    if few {
                        gemm_rows(
                            shape,
                            lhs,
                            k,
                            &self.weight[self.layout.column(c0)..],
                            self.layout,
                            dst.at(r0 * n + c0),
                            n,
                        );
                    } else {
                        product(
                            shape,
                            (lhs.as_ptr(), k),
                            (self.weight.as_ptr().add(c0), n),
                            (dst.at(r0 * n + c0), n),
                        );
                    }
                }
                // Bias, residual and activation in one pass over the tile, in cache.
                if (c0, c1) == (0, n) {
                    // SAFETY: as `tile_out`, whole rows r0..r1.
                    let tile =
                        unsafe { std::slice::from_raw_parts_mut(dst.at(r0 * n), (r1 - r0) * n) };
                    let residual = residual.map(|res| &res[r0 * n..r1 * n]);
                    finish_rows(tile, &self.bias, residual, self.act);
                } else {
                    for r in r0..r1 {
                        let bias = &self.bias[c0..c1];
                        finish_rows(tile_out(r), bias, residual_row(r), self.act);
                    }
                }
            });
        });
    }

    /// Rows `rows` of the im2col of `x [b, h, w, C]`: `col[r, (ky·kw + kx)·C + c]`, zero
    /// where the kernel reaches into the padding.
    fn im2col(
        &self,
        x: &[f32],
        [h, w]: [usize; 2],
        [ho, wo]: [usize; 2],
        rows: std::ops::Range<usize>,
        col: &mut [f32],
    ) {
        let c = self.cin;
        let Window {
            kernel: [kh, kw],
            stride: [sh, sw],
            pads: [pt, pl, _, _],
        } = self.window;
        let k = self.depth();
        for (r, col) in rows.zip(col.chunks_exact_mut(k)) {
            let (image, pixel) = (r / (ho * wo), r % (ho * wo));
            let (oy, ox) = (pixel / wo, pixel % wo);
            let image = &x[image * h * w * c..][..h * w * c];
            for ky in 0..kh {
                let iy = (oy * sh + ky).wrapping_sub(pt);
                let taps = &mut col[ky * kw * c..][..kw * c];
                if iy >= h {
                    taps.fill(0.0);
                    continue;
                }
                let line = &image[iy * w * c..][..w * c];
                let ix0 = (ox * sw) as isize - pl as isize;
                if ix0 >= 0 && ix0 as usize + kw <= w {
                    // The whole kernel row is inside: one copy of kw·C floats.
                    taps.copy_from_slice(&line[ix0 as usize * c..][..kw * c]);
                    continue;
                }
                for (kx, tap) in taps.chunks_exact_mut(c).enumerate() {
                    let ix = (ix0 + kx as isize) as usize;
                    if ix < w {
                        tap.copy_from_slice(&line[ix * c..][..c]);
                    } else {
                        tap.fill(0.0);
                    }
                }
            }
        }
    }
}
