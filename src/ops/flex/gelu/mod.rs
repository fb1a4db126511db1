//! Exact GELU (`x·Φ(x)`, as `torch.nn.GELU()` and Burn's `gelu`) for the CPU (`flex`)
//! backend, vectorised, with its own backward pass. See [`kernels`] for the math.
//!
//! [`crate::ops`] routes f32 tensors on the flex device here and everything else to Burn's
//! `gelu`.

mod kernels;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;

/// Exact GELU as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait FastGelu: Backend {
    /// `x·Φ(x)` elementwise.
    fn fast_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The backward kernel an inner (non-autodiff) backend provides for [`FastGelu`].
pub trait FastGeluKernels: Backend {
    /// `grad·(Φ(x) + x·φ(x))`.
    fn fast_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl FastGelu for Flex {
    fn fast_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        kernels::forward(&x)
    }
}

impl FastGeluKernels for Flex {
    fn fast_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        kernels::backward(&x, &grad)
    }
}

#[derive(Debug)]
struct FastGeluBackward;

impl<B: Backend + FastGeluKernels> Backward<B, 1> for FastGeluBackward {
    type State = NodeId;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(ops.state);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::fast_gelu_backward(x, grad));
        }
    }
}

impl<B, C> FastGelu for Autodiff<B, C>
where
    B: Backend + FastGelu + FastGeluKernels,
    C: CheckpointStrategy,
{
    fn fast_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match FastGeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, B::fast_gelu(x.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_gelu(x.into_primitive())),
        }
    }
}

/// `x·Φ(x)` through the vectorised kernel; `x` must be an f32 tensor on the flex device.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FastGelu>::fast_gelu(x.into_dispatch()))
}
