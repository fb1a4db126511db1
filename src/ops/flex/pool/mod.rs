//! 2-D max pooling for the CPU (`flex`) backend, with its own backward pass.
//!
//! Burn 0.22.1's flex `max_pool2d_with_indices` (what `MaxPool2d` runs under autodiff) goes
//! through its generic 3-D pooling and took 17 ms for ResNet-18's stem pool at batch 64 x 64
//! (a sixth of the forward pass); this kernel reads each plane once and keeps a `u32` offset
//! of each maximum for the backward pass. [`crate::ops::pool`] routes a `MaxPool2d` module
//! here on the flex device in f32 without dilation or ceil mode; everything else uses Burn's
//! pooling.

mod kernels;

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::Tensor;

pub use kernels::PoolGeometry;

/// Max pooling as a backend operation (floor mode, no dilation, symmetric padding).
#[backend_extension(Flex, Autodiff)]
pub trait FastMaxPool: Backend {
    /// Max of each `kernel_h x kernel_w` window of `x [B, C, H, W]`.
    fn fast_max_pool2d(
        x: FloatTensor<Self>,
        kernel_h: usize,
        kernel_w: usize,
        stride_h: usize,
        stride_w: usize,
        pad_h: usize,
        pad_w: usize,
    ) -> FloatTensor<Self>;
}

/// The kernels an inner (non-autodiff) backend provides for [`FastMaxPool`]'s backward pass.
pub trait FastMaxPoolKernels: Backend {
    /// The pooled output and the in-plane offset of each maximum.
    fn fast_max_pool2d_with_indices(
        x: FloatTensor<Self>,
        geometry: PoolGeometry,
    ) -> (FloatTensor<Self>, Vec<u32>);

    /// The input gradient given the output gradient and the offsets of the maxima.
    fn fast_max_pool2d_backward(
        grad: FloatTensor<Self>,
        indices: &[u32],
        geometry: PoolGeometry,
    ) -> FloatTensor<Self>;
}

/// The geometry of pooling `x` (any tensor with a `[B, C, H, W]` shape).
fn geometry<T: TensorMetadata>(
    x: &T,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> PoolGeometry {
    PoolGeometry {
        input: x.shape().dims(),
        kernel,
        stride,
        padding,
    }
}

impl FastMaxPool for Flex {
    fn fast_max_pool2d(
        x: FloatTensor<Self>,
        kernel_h: usize,
        kernel_w: usize,
        stride_h: usize,
        stride_w: usize,
        pad_h: usize,
        pad_w: usize,
    ) -> FloatTensor<Self> {
        let g = geometry(
            &x,
            [kernel_h, kernel_w],
            [stride_h, stride_w],
            [pad_h, pad_w],
        );
        kernels::forward(&x, &g, false).0
    }
}

impl FastMaxPoolKernels for Flex {
    fn fast_max_pool2d_with_indices(
        x: FloatTensor<Self>,
        geometry: PoolGeometry,
    ) -> (FloatTensor<Self>, Vec<u32>) {
        kernels::forward(&x, &geometry, true)
    }

    fn fast_max_pool2d_backward(
        grad: FloatTensor<Self>,
        indices: &[u32],
        geometry: PoolGeometry,
    ) -> FloatTensor<Self> {
        kernels::backward(&grad, indices, &geometry)
    }
}

#[derive(Debug)]
struct MaxPoolBackward;

impl<B: Backend + FastMaxPoolKernels> Backward<B, 1> for MaxPoolBackward {
    type State = (Arc<Vec<u32>>, PoolGeometry);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (indices, geometry) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(
                node.id,
                B::fast_max_pool2d_backward(grad, &indices, geometry),
            );
        }
    }
}

impl<B, C> FastMaxPool for Autodiff<B, C>
where
    B: Backend + FastMaxPool + FastMaxPoolKernels,
    C: CheckpointStrategy,
{
    fn fast_max_pool2d(
        x: FloatTensor<Self>,
        kernel_h: usize,
        kernel_w: usize,
        stride_h: usize,
        stride_w: usize,
        pad_h: usize,
        pad_w: usize,
    ) -> FloatTensor<Self> {
        let (kernel, stride, padding) =
            ([kernel_h, kernel_w], [stride_h, stride_w], [pad_h, pad_w]);
        match MaxPoolBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let g = geometry(x.primitive(), kernel, stride, padding);
                let (out, indices) = B::fast_max_pool2d_with_indices(x.into_primitive(), g);
                prep.finish((Arc::new(indices), g), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_max_pool2d(
                x.into_primitive(),
                kernel_h,
                kernel_w,
                stride_h,
                stride_w,
                pad_h,
                pad_w,
            )),
        }
    }
}

/// The max of each `kernel` window of `x [B, C, H, W]` (floor mode, no dilation, symmetric
/// `padding` of at most half the kernel), through the fast kernel; `x` must be an f32 tensor
/// on the flex device.
pub fn max_pool2d(
    x: Tensor<4>,
    [kernel_h, kernel_w]: [usize; 2],
    [stride_h, stride_w]: [usize; 2],
    [pad_h, pad_w]: [usize; 2],
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FastMaxPool>::fast_max_pool2d(
        x.into_dispatch(),
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
    ))
}
