//! Depthwise 2-D convolution (`groups == channels`, one filter per channel: CoAtNet's MBConv,
//! MobileNetV3, EfficientNet) for the flex backend: direct row-by-row stencils, vectorised
//! for the CPU's widest extension, a rayon task per group of image planes (per group of
//! channels for the weight gradient), with its own backward pass. At stride 2 and more each
//! input row is first split into its phases, so that every tap reads contiguous values.
//! Planes whose rows are too short to vectorise (the last stages) run batch-last instead:
//! each channel's planes transposed to `[pixel][batch]`, every tap a batch-long vector.
//!
//! Burn 0.22.1 computes the input gradient as a grouped transposed convolution and the weight
//! gradient group by group; a depthwise 3x3 pass over a CoAtNet-0 activation ran at about
//! 2 GFLOP/s there.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use rayon::prelude::*;

use super::autodiff::{ConvBackwardKernel, track};
use super::geometry::valid_range;
use crate::ops::flex::{dispatch_simd, f32_contiguous, f32_tensor};

/// The depthwise convolution as a backend operation (no bias).
#[backend_extension(Flex, Autodiff)]
pub trait DepthwiseConv: Backend {
    /// `x [B, C, H, W]` with `weight [C, 1, k, k]`; returns `[B, C, Ho, Wo]`.
    fn depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;
}

/// The backward kernel an inner backend provides for [`DepthwiseConv`].
pub trait DepthwiseConvKernels: Backend {
    /// Gradients of the input (when `need_x`) and of the weight (when `need_w`).
    fn depthwise_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        geometry: Depthwise,
        need_x: bool,
        need_w: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>);
}

/// Shapes, stride and padding of one depthwise convolution (square kernel).
#[derive(Debug, Clone, Copy)]
pub struct Depthwise {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    out_height: usize,
    out_width: usize,
}

impl Depthwise {
    /// The geometry of `x [B, C, H, W]` with `weight [C, 1, k, k]`.
    pub fn new<T: TensorMetadata>(x: &T, weight: &T, stride: usize, padding: usize) -> Self {
        let [batch, channels, height, width] = x.shape().dims();
        let [wc, one, kernel, kw] = weight.shape().dims();
        assert!(
            wc == channels && one == 1 && kernel == kw,
            "depthwise_conv2d: weight [{wc}, {one}, {kernel}, {kw}] for {channels} channels"
        );
        assert!(
            height + 2 * padding >= kernel && width + 2 * padding >= kernel && stride > 0,
            "depthwise_conv2d: kernel {kernel} larger than the padded {height}x{width} input"
        );
        let out = |size: usize| (size + 2 * padding - kernel) / stride + 1;
        Self {
            batch,
            channels,
            height,
            width,
            kernel,
            stride,
            padding,
            out_height: out(height),
            out_width: out(width),
        }
    }

    /// The output rows kernel tap `(i, j)` touches: `(oh, ih)` pairs over the columns
    /// `ow_lo..ow_hi`, which read the input from column `iw_lo` on (an empty column range
    /// gives no rows). An iterator, so that each caller's loop body compiles with its vector
    /// extension.
    #[inline(always)]
    fn rows(&self, i: usize, j: usize) -> (impl Iterator<Item = (usize, usize)>, [usize; 3]) {
        let (s, p) = (self.stride, self.padding);
        let (oh_lo, oh_hi) = valid_range(self.out_height, self.height, i, s, p);
        let (ow_lo, ow_hi) = valid_range(self.out_width, self.width, j, s, p);
        let rows = if ow_lo < ow_hi { oh_lo..oh_hi } else { 0..0 };
        let iw_lo = (ow_lo * s + j).saturating_sub(p);
        (
            rows.map(move |oh| (oh, oh * s + i - p)),
            [ow_lo, ow_hi, iw_lo],
        )
    }
}

/// Values per rayon task: about 16 Ki outputs, whole planes.
fn planes_per_task(plane: usize) -> usize {
    (16_384 / plane.max(1)).max(1)
}

impl Depthwise {
    /// Length of one phase of an input row: `ceil(width / stride)`.
    fn phase_len(&self) -> usize {
        self.width.div_ceil(self.stride)
    }

    /// Values of a phased input plane (see [`phase`]).
    fn phased_len(&self) -> usize {
        self.height * self.stride * self.phase_len()
    }
}

/// Splits each row of the input plane `x` into `stride` phases, `x[ih][q + s·t]` going to
/// `out[(ih·s + q)·pw + t]`: a stride-`s` tap then reads contiguous values.
#[inline(always)]
fn phase(x: &[f32], g: &Depthwise, out: &mut [f32]) {
    let (s, pw) = (g.stride, g.phase_len());
    for ih in 0..g.height {
        let row = &x[ih * g.width..][..g.width];
        for q in 0..s {
            let dst = &mut out[(ih * s + q) * pw..][..pw];
            for (d, &v) in dst.iter_mut().zip(row.iter().skip(q).step_by(s)) {
                *d = v;
            }
        }
    }
}

/// The values a tap reads for output columns `ow_lo..` of input row `ih`, starting at input
/// column `iw_lo`: from the plane itself at stride 1, else from its phases.
#[inline(always)]
fn tap_row<'a>(g: &Depthwise, x: &'a [f32], ih: usize, iw_lo: usize, len: usize) -> &'a [f32] {
    if g.stride == 1 {
        &x[ih * g.width + iw_lo..][..len]
    } else {
        let (s, pw) = (g.stride, g.phase_len());
        &x[(ih * s + iw_lo % s) * pw + iw_lo / s..][..len]
    }
}

/// One output plane `y` of input plane `x` (phased into `scratch` at stride > 1) with the
/// channel's `k x k` weights `w`.
#[inline(always)]
fn forward_plane(g: &Depthwise, x: &[f32], w: &[f32], y: &mut [f32], scratch: &mut [f32]) {
    let x = if g.stride == 1 {
        x
    } else {
        phase(x, g, scratch);
        &*scratch
    };
    let k = g.kernel;
    for i in 0..k {
        for j in 0..k {
            let w = w[i * k + j];
            let (rows, [ow_lo, ow_hi, iw_lo]) = g.rows(i, j);
            for (oh, ih) in rows {
                let x = tap_row(g, x, ih, iw_lo, ow_hi - ow_lo);
                let y = &mut y[oh * g.out_width..][ow_lo..ow_hi];
                for (y, &x) in y.iter_mut().zip(x) {
                    *y += w * x;
                }
            }
        }
    }
}

/// The input gradient `dx` of one plane from the output gradient `dy` (accumulated in phases
/// in `scratch` at stride > 1).
#[inline(always)]
fn input_grad_plane(g: &Depthwise, dy: &[f32], w: &[f32], dx: &mut [f32], scratch: &mut [f32]) {
    let (k, s, pw) = (g.kernel, g.stride, g.phase_len());
    if s > 1 {
        scratch.fill(0.0);
    }
    for i in 0..k {
        for j in 0..k {
            let w = w[i * k + j];
            let (rows, [ow_lo, ow_hi, iw_lo]) = g.rows(i, j);
            for (oh, ih) in rows {
                let dy = &dy[oh * g.out_width..][ow_lo..ow_hi];
                let dx = if s == 1 {
                    &mut dx[ih * g.width + iw_lo..][..dy.len()]
                } else {
                    &mut scratch[(ih * s + iw_lo % s) * pw + iw_lo / s..][..dy.len()]
                };
                for (dx, &d) in dx.iter_mut().zip(dy) {
                    *dx += w * d;
                }
            }
        }
    }
    if s > 1 {
        for ih in 0..g.height {
            let row = &mut dx[ih * g.width..][..g.width];
            for q in 0..s {
                let src = &scratch[(ih * s + q) * pw..][..pw];
                for (d, &v) in row.iter_mut().skip(q).step_by(s).zip(src) {
                    *d = v;
                }
            }
        }
    }
}

/// Adds the weight gradient of one plane (input `x`, phased into `scratch` at stride > 1;
/// output gradient `dy`) to the channel's `dw`.
#[inline(always)]
fn weight_grad_plane(g: &Depthwise, x: &[f32], dy: &[f32], dw: &mut [f32], scratch: &mut [f32]) {
    let x = if g.stride == 1 {
        x
    } else {
        phase(x, g, scratch);
        &*scratch
    };
    let k = g.kernel;
    for i in 0..k {
        for j in 0..k {
            let mut sum = 0.0f32;
            let (rows, [ow_lo, ow_hi, iw_lo]) = g.rows(i, j);
            for (oh, ih) in rows {
                let dy = &dy[oh * g.out_width..][ow_lo..ow_hi];
                let x = tap_row(g, x, ih, iw_lo, dy.len());
                // Eight partial sums, so the reduction vectorises.
                let mut acc = [0.0f32; 8];
                let (dy8, dy_rest) = dy.split_at(dy.len() / 8 * 8);
                let (x8, x_rest) = x.split_at(dy8.len());
                for (d, x) in dy8.chunks_exact(8).zip(x8.chunks_exact(8)) {
                    for l in 0..8 {
                        acc[l] += d[l] * x[l];
                    }
                }
                sum += acc.iter().sum::<f32>();
                for (&d, &x) in dy_rest.iter().zip(x_rest) {
                    sum += d * x;
                }
            }
            dw[i * k + j] += sum;
        }
    }
}

dispatch_simd!(forward_simd(g: &Depthwise, x: &[f32], w: &[f32], y: &mut [f32], scratch: &mut [f32]) => forward_plane(g, x, w, y, scratch));
dispatch_simd!(input_grad_simd(g: &Depthwise, dy: &[f32], w: &[f32], dx: &mut [f32], scratch: &mut [f32]) => input_grad_plane(g, dy, w, dx, scratch));
dispatch_simd!(weight_grad_simd(g: &Depthwise, x: &[f32], dy: &[f32], dw: &mut [f32], scratch: &mut [f32]) => weight_grad_plane(g, x, dy, dw, scratch));

/// Whether planes this small run batch-last: their rows are too short to vectorise, while
/// a batch of them makes long vectors (the same sums in the same order either way).
fn batch_last(g: &Depthwise) -> bool {
    g.out_width < 16 && g.batch >= 8
}

/// One channel batch-last: `y [OH·OW][B] += w · x [H·W][B]` tap by tap, in the order the
/// row-wise kernel adds them, so that every output is the same sum.
#[inline(always)]
fn forward_channel(g: &Depthwise, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (k, b) = (g.kernel, g.batch);
    for i in 0..k {
        for j in 0..k {
            let w = w[i * k + j];
            let (rows, [ow_lo, ow_hi, iw_lo]) = g.rows(i, j);
            for (oh, ih) in rows {
                for (n, ow) in (ow_lo..ow_hi).enumerate() {
                    let iw = iw_lo + n * g.stride;
                    let x = &x[(ih * g.width + iw) * b..][..b];
                    let y = &mut y[(oh * g.out_width + ow) * b..][..b];
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y += w * x;
                    }
                }
            }
        }
    }
}

/// One channel's input gradient batch-last: `dx [H·W][B] += w · dy [OH·OW][B]`, in the
/// row-wise kernel's order.
#[inline(always)]
fn input_grad_channel(g: &Depthwise, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (k, b) = (g.kernel, g.batch);
    for i in 0..k {
        for j in 0..k {
            let w = w[i * k + j];
            let (rows, [ow_lo, ow_hi, iw_lo]) = g.rows(i, j);
            for (oh, ih) in rows {
                for (n, ow) in (ow_lo..ow_hi).enumerate() {
                    let iw = iw_lo + n * g.stride;
                    let dy = &dy[(oh * g.out_width + ow) * b..][..b];
                    let dx = &mut dx[(ih * g.width + iw) * b..][..b];
                    for (dx, &d) in dx.iter_mut().zip(dy) {
                        *dx += w * d;
                    }
                }
            }
        }
    }
}

/// One channel's weight gradient batch-last, from its input `x [H·W][B]` and output
/// gradient `dy [OH·OW][B]`: the same sums, in the same order, as the row-wise kernel forms
/// image by image (rows shorter than 16 here: a first block of 8 summed on its own, then one
/// by one), the images' sums added to `dw` in batch order.
#[inline(always)]
fn weight_grad_channel(g: &Depthwise, x: &[f32], dy: &[f32], dw: &mut [f32], sums: &mut [f32]) {
    let (k, b) = (g.kernel, g.batch);
    let product = |sums: &mut [f32], p: usize, q: usize| {
        let (dy, x) = (&dy[p * b..][..b], &x[q * b..][..b]);
        for ((s, &d), &x) in sums.iter_mut().zip(dy).zip(x) {
            *s += d * x;
        }
    };
    let mut block = vec![0.0f32; b];
    for i in 0..k {
        for j in 0..k {
            sums.fill(0.0);
            let (rows, [ow_lo, ow_hi, iw_lo]) = g.rows(i, j);
            for (oh, ih) in rows {
                let cols: Vec<(usize, usize)> = (ow_lo..ow_hi)
                    .enumerate()
                    .map(|(n, ow)| (oh * g.out_width + ow, ih * g.width + iw_lo + n * g.stride))
                    .collect();
                let first = cols.len() / 8 * 8;
                block.fill(0.0);
                for &(p, q) in &cols[..first] {
                    product(&mut block, p, q);
                }
                for (s, &v) in sums.iter_mut().zip(&block) {
                    *s += v;
                }
                for &(p, q) in &cols[first..] {
                    product(sums, p, q);
                }
            }
            for &v in sums.iter() {
                dw[i * k + j] += v;
            }
        }
    }
}

dispatch_simd!(weight_grad_channel_simd(g: &Depthwise, x: &[f32], dy: &[f32], dw: &mut [f32], sums: &mut [f32]) => weight_grad_channel(g, x, dy, dw, sums));
dispatch_simd!(forward_channel_simd(g: &Depthwise, x: &[f32], w: &[f32], y: &mut [f32]) => forward_channel(g, x, w, y));
dispatch_simd!(input_grad_channel_simd(g: &Depthwise, dy: &[f32], w: &[f32], dx: &mut [f32]) => input_grad_channel(g, dy, w, dx));

/// `src`'s planes of channel `c` (`[B, C, plane]`) batch-last: `dst[p·B + b]`.
fn gather_channel(src: &[f32], channels: usize, plane: usize, c: usize, dst: &mut [f32]) {
    let batch = dst.len() / plane;
    for b in 0..batch {
        let from = &src[(b * channels + c) * plane..][..plane];
        for (p, &v) in from.iter().enumerate() {
            dst[p * batch + b] = v;
        }
    }
}

/// The inverse of [`gather_channel`]: channel `c`'s planes of `out` (`[B, C, plane]`),
/// handed to `put(b, plane)`.
fn scatter_channel(src: &[f32], plane: usize, mut put: impl FnMut(usize, &[f32])) {
    let batch = src.len() / plane;
    let mut row = vec![0.0f32; plane];
    for b in 0..batch {
        for (p, v) in row.iter_mut().enumerate() {
            *v = src[p * batch + b];
        }
        put(b, &row);
    }
}

/// A per-channel batch-last pass: `f(c, input of c, output of c)` for every channel, each
/// input gathered from `src` (`[B, C, in_plane]`) and each output scattered into a new
/// `[B, C, out_plane]` buffer.
fn per_channel(
    g: &Depthwise,
    src: &[f32],
    (in_plane, out_plane): (usize, usize),
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let (b, c) = (g.batch, g.channels);
    let outputs: Vec<Vec<f32>> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut input = vec![0.0f32; in_plane * b];
            gather_channel(src, c, in_plane, ch, &mut input);
            let mut output = vec![0.0f32; out_plane * b];
            f(ch, &input, &mut output);
            output
        })
        .collect();
    let mut out = vec![0.0f32; b * c * out_plane];
    for (ch, output) in outputs.iter().enumerate() {
        scatter_channel(output, out_plane, |n, plane| {
            out[(n * c + ch) * out_plane..][..out_plane].copy_from_slice(plane);
        });
    }
    out
}

/// Scratch for phased planes: empty at stride 1.
fn scratch(g: &Depthwise) -> Vec<f32> {
    vec![0.0f32; if g.stride > 1 { g.phased_len() } else { 0 }]
}

fn forward(x: &FlexTensor, weight: &FlexTensor, g: &Depthwise) -> FlexTensor {
    let (x, weight) = (f32_contiguous(x), f32_contiguous(weight));
    let (xs, ws) = (x.storage::<f32>(), weight.storage::<f32>());
    let (plane, out_plane, kk) = (
        g.height * g.width,
        g.out_height * g.out_width,
        g.kernel * g.kernel,
    );
    let dims = [g.batch, g.channels, g.out_height, g.out_width];
    if batch_last(g) {
        let out = per_channel(g, xs, (plane, out_plane), |c, x, y| {
            forward_channel_simd(g, x, &ws[c * kk..][..kk], y)
        });
        return f32_tensor(out, dims);
    }
    let per_task = planes_per_task(out_plane);
    let mut out = vec![0.0f32; g.batch * g.channels * out_plane];
    out.par_chunks_mut(out_plane * per_task)
        .enumerate()
        .for_each(|(task, ys)| {
            let mut scratch = scratch(g);
            for (n, y) in ys.chunks_mut(out_plane).enumerate() {
                let bc = task * per_task + n;
                let c = bc % g.channels;
                let x = &xs[bc * plane..][..plane];
                forward_simd(g, x, &ws[c * kk..][..kk], y, &mut scratch);
            }
        });
    f32_tensor(out, dims)
}

fn backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    g: &Depthwise,
    need_x: bool,
    need_w: bool,
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let (x, weight, grad) = (
        f32_contiguous(x),
        f32_contiguous(weight),
        f32_contiguous(grad),
    );
    let (xs, ws, dys) = (
        x.storage::<f32>(),
        weight.storage::<f32>(),
        grad.storage::<f32>(),
    );
    let (plane, out_plane, kk) = (
        g.height * g.width,
        g.out_height * g.out_width,
        g.kernel * g.kernel,
    );
    let grad_x = need_x.then(|| {
        let dims = [g.batch, g.channels, g.height, g.width];
        if batch_last(g) {
            let dx = per_channel(g, dys, (out_plane, plane), |c, dy, dx| {
                input_grad_channel_simd(g, dy, &ws[c * kk..][..kk], dx)
            });
            return f32_tensor(dx, dims);
        }
        let per_task = planes_per_task(plane);
        let mut dx = vec![0.0f32; g.batch * g.channels * plane];
        dx.par_chunks_mut(plane * per_task)
            .enumerate()
            .for_each(|(task, dxs)| {
                let mut scratch = scratch(g);
                for (n, dx) in dxs.chunks_mut(plane).enumerate() {
                    let bc = task * per_task + n;
                    let c = bc % g.channels;
                    let dy = &dys[bc * out_plane..][..out_plane];
                    input_grad_simd(g, dy, &ws[c * kk..][..kk], dx, &mut scratch);
                }
            });
        f32_tensor(dx, dims)
    });
    let grad_w = need_w.then(|| {
        if batch_last(g) {
            let mut dw = vec![0.0f32; g.channels * kk];
            dw.par_chunks_mut(kk).enumerate().for_each(|(c, dw)| {
                let (mut x, mut dy) = (
                    vec![0.0f32; plane * g.batch],
                    vec![0.0f32; out_plane * g.batch],
                );
                gather_channel(xs, g.channels, plane, c, &mut x);
                gather_channel(dys, g.channels, out_plane, c, &mut dy);
                weight_grad_channel_simd(g, &x, &dy, dw, &mut vec![0.0f32; g.batch]);
            });
            return f32_tensor(dw, [g.channels, 1, g.kernel, g.kernel]);
        }
        // Channels per task: about 16 Ki input values each, over the whole batch.
        let per_task = (16_384 / (plane * g.batch).max(1)).max(1);
        let mut dw = vec![0.0f32; g.channels * kk];
        dw.par_chunks_mut(kk * per_task)
            .enumerate()
            .for_each(|(task, dws)| {
                let mut scratch = scratch(g);
                for (n, dw) in dws.chunks_mut(kk).enumerate() {
                    let c = task * per_task + n;
                    for b in 0..g.batch {
                        let bc = b * g.channels + c;
                        let (x, dy) = (
                            &xs[bc * plane..][..plane],
                            &dys[bc * out_plane..][..out_plane],
                        );
                        weight_grad_simd(g, x, dy, dw, &mut scratch);
                    }
                }
            });
        f32_tensor(dw, [g.channels, 1, g.kernel, g.kernel])
    });
    (grad_x, grad_w)
}

impl DepthwiseConv for Flex {
    fn depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let geometry = Depthwise::new(&x, &weight, stride, padding);
        forward(&x, &weight, &geometry)
    }
}

impl DepthwiseConvKernels for Flex {
    fn depthwise_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        geometry: Depthwise,
        need_x: bool,
        need_w: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        backward(&x, &weight, &grad, &geometry, need_x, need_w)
    }
}

/// [`DepthwiseConvKernels`] as the backward kernel of [`super::autodiff::track`].
#[derive(Debug)]
struct DepthwiseKernel;

impl<B: Backend + DepthwiseConvKernels> ConvBackwardKernel<B> for DepthwiseKernel {
    type Geometry = Depthwise;

    fn backward(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        grad: FloatTensor<B>,
        geometry: Depthwise,
        need_x: bool,
        need_w: bool,
    ) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>) {
        B::depthwise_conv2d_backward(x, weight, grad, geometry, need_x, need_w)
    }
}

impl<B, C> DepthwiseConv for Autodiff<B, C>
where
    B: Backend + DepthwiseConv + DepthwiseConvKernels,
    C: CheckpointStrategy,
{
    fn depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let geometry = Depthwise::new(x.primitive(), weight.primitive(), stride, padding);
        track::<B, C, DepthwiseKernel>(x, weight, geometry, |x, w| {
            B::depthwise_conv2d(x, w, stride, padding)
        })
    }
}
