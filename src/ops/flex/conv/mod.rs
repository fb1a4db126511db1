//! 2-D convolution for the CPU (`flex`) backend, lowered to large GEMMs over chunks of images.
//!
//! Burn 0.22.1's flex convolution runs one small GEMM per image and per tile of 512 output
//! pixels, and computes the weight gradient as a convolution whose "kernel" is the output
//! gradient, i.e. a GEMM whose narrow side is the 3x3 kernel (9 columns). Both shapes keep the
//! GEMM microkernels on edge tiles, so ResNet-18 training ran at about a third of what the same
//! GEMM library reaches on large products. Here each pass over a chunk of whole images (about
//! 1 MiB of im2col) is one large product:
//!
//! - forward: `col[C·kh·kw, n·Ho·Wo]` (im2col of the chunk), `y = W · col`;
//! - weight gradient: `dW += dY · colᵀ`;
//! - input gradient: `dcol = Wᵀ · dY`, scattered back with col2im.
//!
//! Depthwise convolutions (one filter per channel, CoAtNet's MBConv) use direct stencils
//! instead (`depthwise.rs`). Both are Burn backend extensions (`#[backend_extension]`) with
//! hand-written backward passes on `Autodiff<Flex>`. The ops layer routes a `Conv2d` module to
//! them when the tensor lives on the flex device in f32 with a plain geometry (no dilation,
//! symmetric padding, no groups or one group per channel); everything else (CUDA, bf16 autocast,
//! other grouped convolutions) uses Burn's own `conv2d`. The choice is made in
//! [`crate::ops::conv`]; this module only computes.

mod autodiff;
mod depthwise;
mod gemm;
mod geometry;
mod im2col;
mod kernels;
mod transpose;

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;

pub use depthwise::{Depthwise, DepthwiseConv, DepthwiseConvKernels};
pub use geometry::Geometry;

/// The batch-wide GEMM convolution as a backend operation (no bias, no groups, no dilation).
#[backend_extension(Flex, Autodiff)]
pub trait GemmConv: Backend {
    /// `x [B, C, H, W]` convolved with `weight [O, C, kh, kw]`; returns `[B, O, Ho, Wo]`.
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride_h: usize,
        stride_w: usize,
        pad_h: usize,
        pad_w: usize,
    ) -> FloatTensor<Self>;
}

/// The kernels an inner (non-autodiff) backend provides for [`GemmConv`]'s backward pass.
pub trait GemmConvKernels: Backend {
    /// Gradients of the input (when `need_x`) and of the weight (when `need_w`).
    fn gemm_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        geometry: Geometry,
        need_x: bool,
        need_w: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>);
}

impl GemmConv for Flex {
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride_h: usize,
        stride_w: usize,
        pad_h: usize,
        pad_w: usize,
    ) -> FloatTensor<Self> {
        let geometry = Geometry::new(&x, &weight, [stride_h, stride_w], [pad_h, pad_w]);
        kernels::forward(&x, &weight, &geometry)
    }
}

impl GemmConvKernels for Flex {
    fn gemm_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        geometry: Geometry,
        need_x: bool,
        need_w: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        kernels::backward(&x, &weight, &grad, &geometry, need_x, need_w)
    }
}

/// [`GemmConvKernels`] as the backward kernel of [`autodiff::track`].
#[derive(Debug)]
struct GemmKernel;

impl<B: Backend + GemmConvKernels> autodiff::ConvBackwardKernel<B> for GemmKernel {
    type Geometry = Geometry;

    fn backward(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        grad: FloatTensor<B>,
        geometry: Geometry,
        need_x: bool,
        need_w: bool,
    ) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>) {
        B::gemm_conv2d_backward(x, weight, grad, geometry, need_x, need_w)
    }
}

impl<B: Backend + GemmConv + GemmConvKernels, C: CheckpointStrategy> GemmConv for Autodiff<B, C> {
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride_h: usize,
        stride_w: usize,
        pad_h: usize,
        pad_w: usize,
    ) -> FloatTensor<Self> {
        let geometry = Geometry::new(
            x.primitive(),
            weight.primitive(),
            [stride_h, stride_w],
            [pad_h, pad_w],
        );
        autodiff::track::<B, C, GemmKernel>(x, weight, geometry, |x, w| {
            B::gemm_conv2d(x, w, stride_h, stride_w, pad_h, pad_w)
        })
    }
}

/// `x [B, C, H, W]` convolved with `weight [O, C, kh, kw]` (no bias, groups or dilation)
/// through the batch-wide GEMM kernel; `x` must be an f32 tensor on the flex device.
pub fn gemm_conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    [stride_h, stride_w]: [usize; 2],
    [pad_h, pad_w]: [usize; 2],
) -> Tensor<4> {
    Tensor::<4>::from_dispatch(<Dispatch as GemmConv>::gemm_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        stride_h,
        stride_w,
        pad_h,
        pad_w,
    ))
}

/// `x [B, C, H, W]` convolved channel by channel with `weight [C, 1, k, k]` (no bias)
/// through the direct depthwise kernel; `x` must be an f32 tensor on the flex device.
pub fn depthwise_conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    stride: usize,
    padding: usize,
) -> Tensor<4> {
    Tensor::<4>::from_dispatch(<Dispatch as DepthwiseConv>::depthwise_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        stride,
        padding,
    ))
}
