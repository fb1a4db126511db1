//! Sigmoid, SiLU, hardswish and hardsigmoid for the CPU (`flex`) backend, vectorised, with
//! their own backward pass. See [`kernels`] for the formulas. [`crate::ops`] routes f32
//! tensors on the flex device here and everything else to Burn's operations.

mod kernels;

pub(crate) use kernels::{relu6_shifted, sigmoid};

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;

/// The activations this kernel computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointwise {
    /// `1 / (1 + e^−x)`.
    Sigmoid,
    /// `x · sigmoid(x)`.
    Silu,
    /// `x · min(max(x + 3, 0), 6) / 6`.
    Hardswish,
    /// `min(max(x + 3, 0), 6) / 6`.
    Hardsigmoid,
}

/// An elementwise activation as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait FastPointwise: Backend {
    /// `kind(x)` elementwise.
    fn fast_pointwise(x: FloatTensor<Self>, kind: Pointwise) -> FloatTensor<Self>;
}

/// The backward kernel an inner (non-autodiff) backend provides for [`FastPointwise`].
pub trait FastPointwiseKernels: Backend {
    /// `grad · kind'(x)`.
    fn fast_pointwise_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kind: Pointwise,
    ) -> FloatTensor<Self>;
}

impl FastPointwise for Flex {
    fn fast_pointwise(x: FloatTensor<Self>, kind: Pointwise) -> FloatTensor<Self> {
        kernels::forward(&x, kind)
    }
}

impl FastPointwiseKernels for Flex {
    fn fast_pointwise_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kind: Pointwise,
    ) -> FloatTensor<Self> {
        kernels::backward(&x, &grad, kind)
    }
}

#[derive(Debug)]
struct PointwiseBackward;

impl<B: Backend + FastPointwiseKernels> Backward<B, 1> for PointwiseBackward {
    type State = (NodeId, Pointwise);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, kind) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::fast_pointwise_backward(x, grad, kind));
        }
    }
}

impl<B, C> FastPointwise for Autodiff<B, C>
where
    B: Backend + FastPointwise + FastPointwiseKernels,
    C: CheckpointStrategy,
{
    fn fast_pointwise(x: FloatTensor<Self>, kind: Pointwise) -> FloatTensor<Self> {
        match PointwiseBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish((state, kind), B::fast_pointwise(x.into_primitive(), kind))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_pointwise(x.into_primitive(), kind)),
        }
    }
}

/// `kind(x)` through the vectorised kernel; `x` must be an f32 tensor on the flex device.
pub fn pointwise<const D: usize>(x: Tensor<D>, kind: Pointwise) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FastPointwise>::fast_pointwise(
        x.into_dispatch(),
        kind,
    ))
}
