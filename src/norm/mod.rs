//! Training-mode BatchNorm for the CPU (`flex`) backend in two passes over each channel.
//!
//! Burn 0.22.1 builds `batch_norm_train` and its backward from generic tensor ops: each
//! swaps the batch and channel axes (a full copy) before every reduction and runs a dozen
//! elementwise passes. Here one rayon task per channel computes the batch mean, the biased
//! variance (two-pass, as Burn) and the output while the channel's values are in cache, and
//! the backward pass needs one reduction pass and one write pass. The statistics, running
//! averages and formulas are Burn's, so checkpoints and results do not change.
//!
//! [`batch_norm`] routes a `BatchNorm` module here when it trains on the flex device in f32;
//! inference and other devices use Burn's `BatchNorm::forward`.

mod kernels;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::BatchNorm;
use burn::tensor::Tensor;

/// BatchNorm over axis 1 of `x [B, C, ...]` with batch statistics.
#[backend_extension(Flex, Autodiff)]
pub trait FusedBatchNorm: Backend {
    /// `(output, batch mean [C], biased batch variance [C])`.
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
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
}

impl FusedBatchNorm for Flex {
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        kernels::forward(&x, &gamma, &beta, epsilon)
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
        kernels::backward(&x, &gamma, &mean, &variance, epsilon, &grad)
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
        let prepared = FusedBatchNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        match prepared {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let gamma_state = prep.checkpoint(&gamma);
                let (out, mean, variance) = B::fused_batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                let state = (
                    x_state,
                    gamma_state,
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                );
                let out = prep.finish(state, out);
                (
                    out,
                    <FloatTensor<Self>>::new(mean),
                    <FloatTensor<Self>>::new(variance),
                )
            }
            OpsKind::UnTracked(prep) => {
                let (out, mean, variance) = B::fused_batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                (
                    prep.finish(out),
                    <FloatTensor<Self>>::new(mean),
                    <FloatTensor<Self>>::new(variance),
                )
            }
        }
    }
}

/// Whether [`batch_norm`] runs `bn` on `x` through the fused training kernel.
pub fn fused_applies<const D: usize>(bn: &BatchNorm, x: &Tensor<D>) -> bool {
    x.device().is_autodiff() && bn.training.is_enabled() && crate::flex::is_flex_f32(x)
}

/// `bn.forward(x)`, through the fused kernel when training on the flex device in f32.
/// Updates the running statistics exactly as Burn's `BatchNorm` does. In inference the
/// running statistics fold into one scale and shift per channel (two passes over `x`
/// instead of Burn's four).
pub fn batch_norm<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    if !fused_applies(bn, &x) {
        let training = x.device().is_autodiff() && bn.training.is_enabled();
        return if training || !crate::flex::is_flex_f32(&x) {
            bn.forward(x)
        } else {
            inference(bn, x)
        };
    }
    let device = x.device();
    let (out, mean, variance) = <Dispatch as FusedBatchNorm>::fused_batch_norm_train(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        bn.epsilon,
    );
    let (mean, variance) = (
        Tensor::<1>::from_dispatch(mean),
        Tensor::<1>::from_dispatch(variance),
    );
    let momentum = bn.momentum;
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
    let running_mean = running_mean
        .mul_scalar(1.0 - momentum)
        .add(mean.detach().mul_scalar(momentum));
    let running_var = running_var
        .mul_scalar(1.0 - momentum)
        .add(variance.detach().mul_scalar(momentum));
    bn.running_mean.update(running_mean.detach());
    bn.running_var.update(running_var.detach());
    Tensor::<D>::from_dispatch(out)
}

/// `γ · (x − μ) / √(σ² + ε) + β` with the running statistics, as `x · scale + shift`.
fn inference<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    let channels = bn.gamma.dims()[0];
    let mut dims = [1; D];
    dims[1] = channels;
    let inv_std = bn
        .running_var
        .value()
        .to_device(&device)
        .add_scalar(bn.epsilon)
        .sqrt()
        .recip();
    let scale = bn.gamma.val() * inv_std;
    let shift = bn.beta.val() - bn.running_mean.value().to_device(&device) * scale.clone();
    x * scale.reshape(dims) + shift.reshape(dims)
}
