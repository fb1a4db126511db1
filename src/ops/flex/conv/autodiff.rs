//! The autodiff side shared by kd's two convolutions (GEMM and depthwise): record the
//! operation on the forward pass, and compute both gradients with one kernel call on the way
//! back.

use std::fmt::Debug;
use std::marker::PhantomData;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend};

/// A convolution's backward kernel on the inner backend `B`.
pub trait ConvBackwardKernel<B: Backend>: Debug + Send + Sync + 'static {
    /// Shapes, stride and padding the kernel needs.
    type Geometry: Clone + Debug + Send + Sync + 'static;

    /// Gradients of the input (when `need_x`) and of the weight (when `need_w`).
    fn backward(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        grad: FloatTensor<B>,
        geometry: Self::Geometry,
        need_x: bool,
        need_w: bool,
    ) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>);
}

/// The backward step of a convolution whose kernel is `K`.
#[derive(Debug)]
struct ConvBackward<K>(PhantomData<K>);

impl<B: Backend, K: ConvBackwardKernel<B>> Backward<B, 2> for ConvBackward<K> {
    type State = (NodeId, NodeId, K::Geometry);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, w_state, geometry) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let w = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(w_state);
        let (gx, gw) = K::backward(x, w, grad, geometry, node_x.is_some(), node_w.is_some());
        if let (Some(node), Some(gx)) = (node_x, gx) {
            grads.register::<B>(node.id, gx);
        }
        if let (Some(node), Some(gw)) = (node_w, gw) {
            grads.register::<B>(node.id, gw);
        }
    }
}

/// Runs `forward` on the inner tensors of `x` and `weight` and, when either is tracked,
/// records the operation so that `K` computes the gradients.
pub fn track<B, C, K>(
    x: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    geometry: K::Geometry,
    forward: impl FnOnce(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend,
    C: CheckpointStrategy,
    K: ConvBackwardKernel<B>,
{
    match ConvBackward::<K>(PhantomData)
        .prepare::<C>([x.node(), weight.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let x_state = prep.checkpoint(&x);
            let w_state = prep.checkpoint(&weight);
            let out = forward(x.into_primitive(), weight.into_primitive());
            prep.finish((x_state, w_state, geometry), out)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward(x.into_primitive(), weight.into_primitive()))
        }
    }
}
