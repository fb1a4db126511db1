//! Training-mode BatchNorm for the CPU (`flex`) backend in two passes over each channel.
//!
//! Burn 0.22.1 builds `batch_norm_train` and its backward from generic tensor ops: each
//! swaps the batch and channel axes (a full copy) before every reduction and runs a dozen
//! elementwise passes. Here one rayon task per channel computes the batch mean, the biased
//! variance (two-pass, as Burn) and the output while the channel's values are in cache, and
//! the backward pass needs one reduction pass and one write pass. The statistics, running
//! averages and formulas are Burn's, so checkpoints and results do not change.
//!
//! Inference folds the running statistics into one scale and shift per channel
//! ([`scale_shift`], one pass). [`crate::ops::norm`] decides when these kernels run and keeps
//! PyTorch's running-statistics rule; this module only computes.

mod inference;
mod kernels;

use inference::ScaleShift;
use kernels::ReluGrad;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;

/// BatchNorm over axis 1 of `x [B, C, ...]` with batch statistics, alone or followed by a
/// ReLU (with a residual added before it, as in ResNet's blocks).
#[backend_extension(Flex, Autodiff)]
pub trait FusedBatchNorm: Backend {
    /// `(output, batch mean [C], biased batch variance [C])`.
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `relu(bn(x))` and the batch statistics.
    fn fused_batch_norm_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `relu(bn(x) + residual)` and the batch statistics.
    fn fused_batch_norm_add_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The backward kernel an inner (non-autodiff) backend provides for [`FusedBatchNorm`].
pub trait FusedBatchNormKernels: Backend {
    /// Gradients of `x`, `gamma` and `beta` given the output gradient `grad`.
    fn fused_batch_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients of `x`, `gamma` and `beta`, and (for a `residual`) the gradient that passed
    /// the ReLU, given the gradient `grad` of the ReLU's `output`.
    #[allow(clippy::too_many_arguments)]
    fn fused_batch_norm_relu_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
        output: FloatTensor<Self>,
        residual: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
    );
}

impl FusedBatchNorm for Flex {
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        kernels::forward(&x, &gamma, &beta, kernels::Epilogue::None, epsilon)
    }

    fn fused_batch_norm_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        kernels::forward(&x, &gamma, &beta, kernels::Epilogue::Relu, epsilon)
    }

    fn fused_batch_norm_add_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        kernels::forward(
            &x,
            &gamma,
            &beta,
            kernels::Epilogue::AddRelu(&residual),
            epsilon,
        )
    }
}

impl FusedBatchNormKernels for Flex {
    fn fused_batch_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (gx, ggamma, gbeta, _) =
            kernels::backward(&x, &gamma, &mean, &variance, epsilon, &grad, None);
        (gx, ggamma, gbeta)
    }

    fn fused_batch_norm_relu_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
        output: FloatTensor<Self>,
        residual: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
    ) {
        let relu = ReluGrad {
            output: &output,
            keep_passed: residual,
        };
        kernels::backward(&x, &gamma, &mean, &variance, epsilon, &grad, Some(relu))
    }
}

#[derive(Debug)]
struct FusedBatchNormBackward;

impl<B: Backend + FusedBatchNormKernels> Backward<B, 3> for FusedBatchNormBackward {
    type State = (
        NodeId,
        NodeId,
        B::FloatTensorPrimitive,
        B::FloatTensorPrimitive,
        f64,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, gamma_state, mean, variance, epsilon) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let gamma = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gamma_state);
        let (gx, ggamma, gbeta) =
            B::fused_batch_norm_backward(x, gamma, mean, variance, epsilon, grad);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, gx);
        }
        if let Some(node) = node_gamma {
            grads.register::<B>(node.id, ggamma);
        }
        if let Some(node) = node_beta {
            grads.register::<B>(node.id, gbeta);
        }
    }
}

/// The state both ReLU variants keep for their backward pass: the input and gamma nodes, the
/// batch statistics, epsilon and the output (its sign is the ReLU's mask; the next layer
/// keeps the same tensor as its input, so this costs no memory).
type ReluState<T> = (NodeId, NodeId, T, T, f64, T);

/// Backward of `relu(bn(x))` (`N` = 3 parents: x, gamma, beta) and of
/// `relu(bn(x) + residual)` (`N` = 4: x, gamma, beta, residual).
#[derive(Debug)]
struct BatchNormReluBackward<const N: usize>;

/// The gradients of a ReLU variant: `[x, gamma, beta]` and, for a `residual`, the residual's.
fn relu_variant_grads<B: Backend + FusedBatchNormKernels>(
    grad: FloatTensor<B>,
    state: ReluState<B::FloatTensorPrimitive>,
    checkpointer: &mut Checkpointer,
    residual: bool,
) -> Vec<FloatTensor<B>> {
    let (x_state, gamma_state, mean, variance, epsilon, output) = state;
    let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
    let gamma = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gamma_state);
    let (gx, ggamma, gbeta, passed) = B::fused_batch_norm_relu_backward(
        x, gamma, mean, variance, epsilon, grad, output, residual,
    );
    [gx, ggamma, gbeta].into_iter().chain(passed).collect()
}

impl<B: Backend + FusedBatchNormKernels, const N: usize> Backward<B, N>
    for BatchNormReluBackward<N>
{
    type State = ReluState<B::FloatTensorPrimitive>;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let grads_out = relu_variant_grads::<B>(grad, ops.state, checkpointer, N == 4);
        for (parent, grad) in ops.parents.into_iter().zip(grads_out) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// The output and the batch statistics on the autodiff backend.
type Outputs<B, C> = (
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
);

/// Runs `forward` on the inner tensors of `inputs` (`x`, `gamma`, then the others) and, when
/// any of them is tracked, records `backward` with the state that `state` builds from the
/// checkpoints of `x` and `gamma`, the batch statistics and the output.
fn track<B, C, BO, const N: usize>(
    backward: BO,
    inputs: [FloatTensor<Autodiff<B, C>>; N],
    forward: impl FnOnce([FloatTensor<B>; N]) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
    state: impl FnOnce(NodeId, NodeId, &FloatTensor<B>, &FloatTensor<B>, &FloatTensor<B>) -> BO::State,
) -> Outputs<B, C>
where
    B: Backend,
    C: CheckpointStrategy,
    BO: Backward<B, N>,
{
    let nodes = inputs.each_ref().map(|t| t.node());
    let stats = |mean, variance| {
        (
            FloatTensor::<Autodiff<B, C>>::new(mean),
            FloatTensor::<Autodiff<B, C>>::new(variance),
        )
    };
    match backward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let (x_state, gamma_state) = (prep.checkpoint(&inputs[0]), prep.checkpoint(&inputs[1]));
            let (out, mean, variance) = forward(inputs.map(|t| t.into_primitive()));
            let state = state(x_state, gamma_state, &mean, &variance, &out);
            let (mean, variance) = stats(mean, variance);
            (prep.finish(state, out), mean, variance)
        }
        OpsKind::UnTracked(prep) => {
            let (out, mean, variance) = forward(inputs.map(|t| t.into_primitive()));
            let (mean, variance) = stats(mean, variance);
            (prep.finish(out), mean, variance)
        }
    }
}

impl<B, C> FusedBatchNorm for Autodiff<B, C>
where
    B: Backend + FusedBatchNorm + FusedBatchNormKernels,
    C: CheckpointStrategy,
{
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        track::<B, C, _, _>(
            FusedBatchNormBackward,
            [x, gamma, beta],
            |[x, gamma, beta]| B::fused_batch_norm_train(x, gamma, beta, epsilon),
            |x, gamma, mean, variance, _| (x, gamma, mean.clone(), variance.clone(), epsilon),
        )
    }

    fn fused_batch_norm_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        track::<B, C, _, _>(
            BatchNormReluBackward::<3>,
            [x, gamma, beta],
            |[x, gamma, beta]| B::fused_batch_norm_relu_train(x, gamma, beta, epsilon),
            |x, gamma, mean, variance, out| relu_state(x, gamma, mean, variance, epsilon, out),
        )
    }

    fn fused_batch_norm_add_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        track::<B, C, _, _>(
            BatchNormReluBackward::<4>,
            [x, gamma, beta, residual],
            |[x, gamma, beta, residual]| {
                B::fused_batch_norm_add_relu_train(x, gamma, beta, residual, epsilon)
            },
            |x, gamma, mean, variance, out| relu_state(x, gamma, mean, variance, epsilon, out),
        )
    }
}

/// The state of a ReLU variant.
fn relu_state<T: Clone>(
    x: NodeId,
    gamma: NodeId,
    mean: &T,
    variance: &T,
    epsilon: f64,
    out: &T,
) -> ReluState<T> {
    (
        x,
        gamma,
        mean.clone(),
        variance.clone(),
        epsilon,
        out.clone(),
    )
}

/// What the fused kernels apply after the normalization.
// Built and consumed in one call: its size costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Epilogue<const D: usize> {
    /// Nothing.
    None,
    /// A ReLU.
    Relu,
    /// The residual is added, then a ReLU.
    AddRelu(Tensor<D>),
}

/// Training-mode BatchNorm of `x [B, C, ...]` with batch statistics and `epilogue`, in the
/// fused kernel: `(output, batch mean [C], biased batch variance [C])`. Every tensor must be
/// f32 on the flex device (with or without autodiff).
pub fn batch_norm_train<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
    epilogue: Epilogue<D>,
) -> (Tensor<D>, Tensor<1>, Tensor<1>) {
    let (x, gamma, beta) = (
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
    );
    let (out, mean, variance) = match epilogue {
        Epilogue::None => {
            <Dispatch as FusedBatchNorm>::fused_batch_norm_train(x, gamma, beta, epsilon)
        }
        Epilogue::Relu => {
            <Dispatch as FusedBatchNorm>::fused_batch_norm_relu_train(x, gamma, beta, epsilon)
        }
        Epilogue::AddRelu(r) => <Dispatch as FusedBatchNorm>::fused_batch_norm_add_relu_train(
            x,
            gamma,
            beta,
            r.into_dispatch(),
            epsilon,
        ),
    };
    (
        Tensor::from_dispatch(out),
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(variance),
    )
}

/// `x · scale + shift` per channel of `x [B, C, ...]`, then `epilogue`, in one pass
/// (inference: no autodiff). Every tensor must be f32 on the flex device.
pub fn scale_shift<const D: usize>(
    x: Tensor<D>,
    scale: Tensor<1>,
    shift: Tensor<1>,
    epilogue: Epilogue<D>,
) -> Tensor<D> {
    let (x, scale, shift) = (
        x.into_dispatch(),
        scale.into_dispatch(),
        shift.into_dispatch(),
    );
    Tensor::from_dispatch(match epilogue {
        Epilogue::AddRelu(r) => {
            <Dispatch as ScaleShift>::scale_shift_add_relu(x, scale, shift, r.into_dispatch())
        }
        Epilogue::Relu => <Dispatch as ScaleShift>::scale_shift(x, scale, shift, true),
        Epilogue::None => <Dispatch as ScaleShift>::scale_shift(x, scale, shift, false),
    })
}
