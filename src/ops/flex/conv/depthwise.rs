//! Depthwise 2-D convolution (`groups == channels`, one filter per channel: CoAtNet's MBConv)
//! for the flex backend: direct row-by-row stencils, one rayon task per image plane (per
//! channel for the weight gradient), with its own backward pass.
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
use crate::ops::flex::{f32_contiguous, f32_tensor};

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

    /// Calls `f(oh, ih, ow_lo, ow_hi, iw_lo)` for each output row touched by kernel tap `(i, j)`.
    fn for_each_row(
        &self,
        i: usize,
        j: usize,
        mut f: impl FnMut(usize, usize, usize, usize, usize),
    ) {
        let (s, p) = (self.stride, self.padding);
        let (oh_lo, oh_hi) = valid_range(self.out_height, self.height, i, s, p);
        let (ow_lo, ow_hi) = valid_range(self.out_width, self.width, j, s, p);
        if ow_lo >= ow_hi {
            return;
        }
        let iw_lo = ow_lo * s + j - p;
        for oh in oh_lo..oh_hi {
            f(oh, oh * s + i - p, ow_lo, ow_hi, iw_lo);
        }
    }
}

fn forward(x: &FlexTensor, weight: &FlexTensor, g: &Depthwise) -> FlexTensor {
    let (x, weight) = (f32_contiguous(x), f32_contiguous(weight));
    let (xs, ws) = (x.storage::<f32>(), weight.storage::<f32>());
    let (plane, out_plane, k, s) = (
        g.height * g.width,
        g.out_height * g.out_width,
        g.kernel,
        g.stride,
    );
    let mut out = vec![0.0f32; g.batch * g.channels * out_plane];
    out.par_chunks_mut(out_plane)
        .enumerate()
        .for_each(|(bc, y)| {
            let c = bc % g.channels;
            let x = &xs[bc * plane..][..plane];
            for i in 0..k {
                for j in 0..k {
                    let w = ws[(c * k + i) * k + j];
                    g.for_each_row(i, j, |oh, ih, ow_lo, ow_hi, iw_lo| {
                        let y = &mut y[oh * g.out_width..][ow_lo..ow_hi];
                        let x = &x[ih * g.width..][iw_lo..];
                        if s == 1 {
                            let x = &x[..y.len()];
                            for (y, &x) in y.iter_mut().zip(x) {
                                *y += w * x;
                            }
                        } else {
                            for (y, &x) in y.iter_mut().zip(x.iter().step_by(s)) {
                                *y += w * x;
                            }
                        }
                    });
                }
            }
        });
    f32_tensor(out, [g.batch, g.channels, g.out_height, g.out_width])
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
    let (plane, out_plane, k, s) = (
        g.height * g.width,
        g.out_height * g.out_width,
        g.kernel,
        g.stride,
    );
    let grad_x = need_x.then(|| {
        let mut dx = vec![0.0f32; g.batch * g.channels * plane];
        dx.par_chunks_mut(plane).enumerate().for_each(|(bc, dx)| {
            let c = bc % g.channels;
            let dy = &dys[bc * out_plane..][..out_plane];
            for i in 0..k {
                for j in 0..k {
                    let w = ws[(c * k + i) * k + j];
                    g.for_each_row(i, j, |oh, ih, ow_lo, ow_hi, iw_lo| {
                        let dy = &dy[oh * g.out_width..][ow_lo..ow_hi];
                        let dx = &mut dx[ih * g.width..][iw_lo..];
                        if s == 1 {
                            for (dx, &d) in dx[..dy.len()].iter_mut().zip(dy) {
                                *dx += w * d;
                            }
                        } else {
                            for (dx, &d) in dx.iter_mut().step_by(s).zip(dy) {
                                *dx += w * d;
                            }
                        }
                    });
                }
            }
        });
        f32_tensor(dx, [g.batch, g.channels, g.height, g.width])
    });
    let grad_w = need_w.then(|| {
        let mut dw = vec![0.0f32; g.channels * k * k];
        dw.par_chunks_mut(k * k).enumerate().for_each(|(c, dw)| {
            for b in 0..g.batch {
                let bc = b * g.channels + c;
                let (x, dy) = (
                    &xs[bc * plane..][..plane],
                    &dys[bc * out_plane..][..out_plane],
                );
                for i in 0..k {
                    for j in 0..k {
                        let mut sum = 0.0f32;
                        g.for_each_row(i, j, |oh, ih, ow_lo, ow_hi, iw_lo| {
                            let dy = &dy[oh * g.out_width..][ow_lo..ow_hi];
                            let x = &x[ih * g.width..][iw_lo..];
                            if s == 1 {
                                // Eight partial sums, so the reduction vectorises.
                                let mut acc = [0.0f32; 8];
                                let (dy8, dy_rest) = dy.split_at(dy.len() / 8 * 8);
                                let (x8, x_rest) = x[..dy.len()].split_at(dy8.len());
                                for (d, x) in dy8.chunks_exact(8).zip(x8.chunks_exact(8)) {
                                    for l in 0..8 {
                                        acc[l] += d[l] * x[l];
                                    }
                                }
                                sum += acc.iter().sum::<f32>();
                                for (&d, &x) in dy_rest.iter().zip(x_rest) {
                                    sum += d * x;
                                }
                            } else {
                                for (&d, &x) in dy.iter().zip(x.iter().step_by(s)) {
                                    sum += d * x;
                                }
                            }
                        });
                        dw[i * k + j] += sum;
                    }
                }
            }
        });
        f32_tensor(dw, [g.channels, 1, k, k])
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
