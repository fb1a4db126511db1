//! Activations with PyTorch's formulas: GELU, and the sigmoid, SiLU, hardswish and
//! hardsigmoid of MobileNetV3 and EfficientNet; through kd's vectorised kernels on the CPU in
//! f32, Burn's operations elsewhere.

use burn::tensor::Tensor;

use super::flex;
use super::flex::activation::Pointwise;

/// `kind(x)`: kd's kernel on the flex device in f32, else `burn`.
fn pointwise<const D: usize>(
    x: Tensor<D>,
    kind: Pointwise,
    burn: impl FnOnce(Tensor<D>) -> Tensor<D>,
) -> Tensor<D> {
    if flex::is_flex_f32(&x) {
        flex::activation::pointwise(x, kind)
    } else {
        burn(x)
    }
}

/// Whether [`gelu`] runs on `x` through kd's vectorised kernel.
pub fn fast_gelu_applies<const D: usize>(x: &Tensor<D>) -> bool {
    flex::is_flex_f32(x)
}

/// Exact GELU, `x·Φ(x)` (PyTorch's `nn.GELU()`, Burn's `gelu`).
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if fast_gelu_applies(&x) {
        flex::gelu::gelu(x)
    } else {
        burn::tensor::activation::gelu(x)
    }
}

/// `min(max(x + 3, 0), 6) / 6` (PyTorch's `nn.Hardsigmoid`: a division, not `· (1/6)`).
pub fn hardsigmoid<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    pointwise(x, Pointwise::Hardsigmoid, |x| {
        x.add_scalar(3.0).clamp(0.0, 6.0).div_scalar(6.0)
    })
}

/// `x · min(max(x + 3, 0), 6) / 6`, evaluated as `(x · clamp) / 6` as PyTorch's
/// `nn.Hardswish` does (bit for bit).
pub fn hardswish<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    pointwise(x, Pointwise::Hardswish, |x| {
        let gate = x.clone().add_scalar(3.0).clamp(0.0, 6.0);
        (x * gate).div_scalar(6.0)
    })
}

/// `x · sigmoid(x)` (PyTorch's `nn.SiLU`).
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    pointwise(x, Pointwise::Silu, burn::tensor::activation::silu)
}

/// `1 / (1 + e^−x)`.
pub fn sigmoid<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    pointwise(x, Pointwise::Sigmoid, burn::tensor::activation::sigmoid)
}
