//! BatchNorm of a Burn `BatchNorm` module with PyTorch's running-statistics rule, on every
//! device: kd's fused kernels on the CPU in f32, Burn's operations elsewhere (the GPU path).

use burn::nn::BatchNorm;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use super::flex::{self, norm::Epilogue};

/// Whether `bn` normalises `x` with batch statistics (training on an autodiff device, the
/// layer not frozen), as Burn's `BatchNorm::forward` decides.
fn training<const D: usize>(bn: &BatchNorm, x: &Tensor<D>) -> bool {
    x.device().is_autodiff() && bn.training.is_enabled()
}

/// Whether [`batch_norm`] runs `bn` on `x` through kd's fused training kernel.
pub fn fused_applies<const D: usize>(bn: &BatchNorm, x: &Tensor<D>) -> bool {
    training(bn, x) && flex::is_flex_f32(x)
}

/// `bn.forward(x)`. Training updates the running statistics as PyTorch does (`momentum`, the
/// batch's unbiased variance; Burn's `BatchNorm` takes the biased one). In inference the
/// running statistics fold into one scale and shift per channel.
pub fn batch_norm<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    forward(bn, x, Epilogue::None)
}

/// `relu(bn.forward(x) + residual)` (no residual: `relu(bn.forward(x))`); on the CPU in f32
/// the ReLU and the addition cost no passes of their own, forward or backward.
pub fn batch_norm_relu<const D: usize>(
    bn: &BatchNorm,
    x: Tensor<D>,
    residual: Option<Tensor<D>>,
) -> Tensor<D> {
    let epilogue = match residual {
        Some(r) => Epilogue::AddRelu(r),
        None => Epilogue::Relu,
    };
    forward(bn, x, epilogue)
}

/// Whether kd's one-pass kernels can apply `epilogue` to an output shaped like `x`.
fn kernel_takes<const D: usize>(epilogue: &Epilogue<D>, x: &Tensor<D>) -> bool {
    match epilogue {
        Epilogue::AddRelu(r) => flex::is_flex_f32(r) && r.dims() == x.dims(),
        _ => true,
    }
}

/// `epilogue` with Burn's operations.
fn apply<const D: usize>(out: Tensor<D>, epilogue: Epilogue<D>) -> Tensor<D> {
    match epilogue {
        Epilogue::None => out,
        Epilogue::Relu => relu(out),
        Epilogue::AddRelu(r) => relu(out + r),
    }
}

fn forward<const D: usize>(bn: &BatchNorm, x: Tensor<D>, epilogue: Epilogue<D>) -> Tensor<D> {
    if !training(bn, &x) {
        return if flex::is_flex_f32(&x) {
            inference(bn, x, epilogue)
        } else {
            apply(bn.forward(x), epilogue)
        };
    }
    if !flex::is_flex_f32(&x) {
        return apply(train_with_burn_ops(bn, x), epilogue);
    }
    // The residual's addition and the ReLU run in the kernel when it can take them.
    let (fused, after) = if kernel_takes(&epilogue, &x) {
        (epilogue, Epilogue::None)
    } else {
        (Epilogue::None, epilogue)
    };
    let count = values_per_channel(&x);
    let (out, mean, variance) =
        flex::norm::batch_norm_train(x, bn.gamma.val(), bn.beta.val(), bn.epsilon, fused);
    update_running_stats(bn, mean, variance, count);
    apply(out, after)
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

/// BatchNorm in inference as one `scale` and `shift` per channel, on `device`:
/// `scale = γ / √(σ² + ε)`, `shift = β − μ · scale` (also what folds it into a convolution).
pub fn inference_scale_shift(bn: &BatchNorm, device: &Device) -> (Tensor<1>, Tensor<1>) {
    let inv_std = bn
        .running_var
        .value()
        .to_device(device)
        .add_scalar(bn.epsilon)
        .sqrt()
        .recip();
    let scale = bn.gamma.val() * inv_std;
    let shift = bn.beta.val() - bn.running_mean.value().to_device(device) * scale.clone();
    (scale, shift)
}

/// `γ · (x − μ) / √(σ² + ε) + β` with the running statistics of an f32 `x` on the CPU, as
/// `x · scale + shift` (one pass without autodiff, else Burn's operations), then `epilogue`.
fn inference<const D: usize>(bn: &BatchNorm, x: Tensor<D>, epilogue: Epilogue<D>) -> Tensor<D> {
    let device = x.device();
    let (scale, shift) = inference_scale_shift(bn, &device);
    if !device.is_autodiff() && kernel_takes(&epilogue, &x) {
        return flex::norm::scale_shift(x, scale, shift, epilogue);
    }
    let channels = bn.gamma.dims()[0];
    let mut dims = [1; D];
    dims[1] = channels;
    apply(x * scale.reshape(dims) + shift.reshape(dims), epilogue)
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
