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

mod inference;
mod kernels;

use inference::ScaleShift;
use kernels::{Epilogue, ReluGrad};

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::BatchNorm;
use burn::tensor::Tensor;
use burn::tensor::activation::relu;

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
        kernels::forward(&x, &gamma, &beta, Epilogue::None, epsilon)
    }

    fn fused_batch_norm_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        kernels::forward(&x, &gamma, &beta, Epilogue::Relu, epsilon)
    }

    fn fused_batch_norm_add_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        kernels::forward(&x, &gamma, &beta, Epilogue::AddRelu(&residual), epsilon)
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

/// Whether [`batch_norm`] runs `bn` on `x` through the fused training kernel.
pub fn fused_applies<const D: usize>(bn: &BatchNorm, x: &Tensor<D>) -> bool {
    x.device().is_autodiff() && bn.training.is_enabled() && crate::flex::is_flex_f32(x)
}

/// `bn.forward(x)`, through the fused kernel when training on the flex device in f32.
/// Training updates the running statistics as PyTorch does (momentum 0.1, the batch's
/// unbiased variance; Burn's `BatchNorm` takes the biased one). In inference the running
/// statistics fold into one scale and shift per channel (two passes over `x` instead of
/// Burn's four).
pub fn batch_norm<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    if !fused_applies(bn, &x) {
        let training = x.device().is_autodiff() && bn.training.is_enabled();
        return if training {
            train_with_burn_ops(bn, x)
        } else if crate::flex::is_flex_f32(&x) {
            inference(bn, x, None)
        } else {
            bn.forward(x)
        };
    }
    let count = values_per_channel(&x);
    let (out, mean, variance) = <Dispatch as FusedBatchNorm>::fused_batch_norm_train(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        bn.epsilon,
    );
    update_running_stats(
        bn,
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(variance),
        count,
    );
    Tensor::<D>::from_dispatch(out)
}

/// Training-mode BatchNorm through Burn's operations (the GPU path), with PyTorch's running
/// statistics.
fn train_with_burn_ops<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    let count = values_per_channel(&x);
    let result =
        burn::tensor::module::batch_norm_train(x, bn.gamma.val(), bn.beta.val(), bn.epsilon);
    update_running_stats(bn, result.mean, result.variance, count);
    result.output
}

/// How many values each channel's statistics are taken over (all dimensions but the 2nd).
fn values_per_channel<const D: usize>(x: &Tensor<D>) -> usize {
    let dims = x.dims();
    dims[0] * dims[2..].iter().product::<usize>()
}

/// `relu(bn.forward(x) + residual)` (no residual: `relu(bn.forward(x))`), in one fused
/// kernel when training on the flex device in f32 (the ReLU and the addition cost no passes
/// of their own, forward or backward), else as separate Burn operations.
pub fn batch_norm_relu<const D: usize>(
    bn: &BatchNorm,
    x: Tensor<D>,
    residual: Option<Tensor<D>>,
) -> Tensor<D> {
    let fused = fused_applies(bn, &x)
        && residual
            .as_ref()
            .is_none_or(|r| crate::flex::is_flex_f32(r) && r.dims() == x.dims());
    if !fused {
        let training = x.device().is_autodiff() && bn.training.is_enabled();
        if !training && crate::flex::is_flex_f32(&x) {
            return inference(bn, x, Some(residual));
        }
        let out = batch_norm(bn, x);
        return relu(match residual {
            Some(r) => out + r,
            None => out,
        });
    }
    let count = values_per_channel(&x);
    let (x, gamma, beta) = (
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
    );
    let (out, mean, variance) = match residual {
        Some(r) => <Dispatch as FusedBatchNorm>::fused_batch_norm_add_relu_train(
            x,
            gamma,
            beta,
            r.into_dispatch(),
            bn.epsilon,
        ),
        None => {
            <Dispatch as FusedBatchNorm>::fused_batch_norm_relu_train(x, gamma, beta, bn.epsilon)
        }
    };
    update_running_stats(
        bn,
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(variance),
        count,
    );
    Tensor::<D>::from_dispatch(out)
}

/// Moves `bn`'s running statistics towards the batch's, as PyTorch's `BatchNorm` does:
/// `r ← (1 − m)·r + m·s`, with the variance of the batch's `count` values per channel
/// made unbiased (`· count / (count − 1)`).
fn update_running_stats(bn: &BatchNorm, mean: Tensor<1>, variance: Tensor<1>, count: usize) {
    let device = mean.device();
    let momentum = bn.momentum;
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
    let running_mean = running_mean
        .mul_scalar(1.0 - momentum)
        .add(mean.detach().mul_scalar(momentum));
    let unbiased = if count > 1 {
        count as f64 / (count - 1) as f64
    } else {
        1.0
    };
    let running_var = running_var
        .mul_scalar(1.0 - momentum)
        .add(variance.detach().mul_scalar(momentum * unbiased));
    bn.running_mean.update(running_mean.detach());
    bn.running_var.update(running_var.detach());
}

/// `γ · (x − μ) / √(σ² + ε) + β` with the running statistics, as `x · scale + shift` (one
/// pass on the flex device in f32, else Burn's operations), then `relu(· + residual)` when
/// `epilogue` asks for it.
fn inference<const D: usize>(
    bn: &BatchNorm,
    x: Tensor<D>,
    epilogue: Option<Option<Tensor<D>>>,
) -> Tensor<D> {
    let device = x.device();
    let inv_std = bn
        .running_var
        .value()
        .to_device(&device)
        .add_scalar(bn.epsilon)
        .sqrt()
        .recip();
    let scale = bn.gamma.val() * inv_std;
    let shift = bn.beta.val() - bn.running_mean.value().to_device(&device) * scale.clone();
    let one_pass = !device.is_autodiff()
        && crate::flex::is_flex_f32(&x)
        && epilogue
            .as_ref()
            .and_then(Option::as_ref)
            .is_none_or(|r| crate::flex::is_flex_f32(r) && r.dims() == x.dims());
    if one_pass {
        let (x, scale, shift) = (
            x.into_dispatch(),
            scale.into_dispatch(),
            shift.into_dispatch(),
        );
        return Tensor::from_dispatch(match epilogue {
            Some(Some(r)) => {
                <Dispatch as ScaleShift>::scale_shift_add_relu(x, scale, shift, r.into_dispatch())
            }
            relu => <Dispatch as ScaleShift>::scale_shift(x, scale, shift, relu.is_some()),
        });
    }
    let channels = bn.gamma.dims()[0];
    let mut dims = [1; D];
    dims[1] = channels;
    let out = x * scale.reshape(dims) + shift.reshape(dims);
    match epilogue {
        None => out,
        Some(None) => relu(out),
        Some(Some(r)) => relu(out + r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::BatchNormConfig;
    use burn::tensor::{Device, Distribution};

    fn floats<const D: usize>(t: Tensor<D>) -> Vec<f64> {
        let v = t.into_data().try_to_vec::<f32>().expect("f32 tensor");
        v.into_iter().map(f64::from).collect()
    }

    /// After one training step from a fresh layer PyTorch holds `0.9 · 0 + 0.1 · mean` and
    /// `0.9 · 1 + 0.1 · var` with the unbiased variance, on the fused (CPU) and the Burn
    /// operations (GPU) path alike.
    #[test]
    fn running_statistics_follow_pytorch_on_both_paths() {
        let device = Device::flex().autodiff();
        let [b, c, h, w] = [3, 2, 4, 5];
        let x: Tensor<4> = Tensor::random([b, c, h, w], Distribution::Normal(1.0, 2.0), &device);
        let values = floats(x.clone());
        let channel = |ch: usize| -> Vec<f64> {
            (0..b)
                .flat_map(|i| (0..h * w).map(move |p| (i * c + ch) * h * w + p))
                .map(|k| values[k])
                .collect()
        };
        let mut expected = (Vec::new(), Vec::new());
        for ch in 0..c {
            let v = channel(ch);
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
            expected.0.push(0.1 * mean);
            expected.1.push(0.9 + 0.1 * var);
        }
        for fused in [true, false] {
            let bn: BatchNorm = BatchNormConfig::new(c).init(&device);
            assert!(fused_applies(&bn, &x));
            let _ = if fused {
                batch_norm(&bn, x.clone())
            } else {
                train_with_burn_ops(&bn, x.clone())
            };
            for (got, want) in [
                (floats(bn.running_mean.value_sync()), &expected.0),
                (floats(bn.running_var.value_sync()), &expected.1),
            ] {
                for (g, e) in got.iter().zip(want) {
                    assert!((g - e).abs() < 1e-5, "fused {fused}: {got:?} vs {want:?}");
                }
            }
        }
    }
}
