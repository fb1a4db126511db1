//! Autocast for `--precision bf16|f16`: the heavy products (convolutions, linear layers,
//! attention matmuls) cast their operands to the compute dtype and return f32, so that
//! parameters, optimizer state, normalization statistics and losses stay f32.

use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{FloatDType, Tensor};

use super::Precision;

/// `layer.forward(x)`, computed in `precision`.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>, precision: Precision) -> Tensor<D> {
    match precision.compute_dtype() {
        None => layer.forward(x),
        Some(dtype) => burn::tensor::module::linear(
            x.cast(dtype),
            layer.weight.val().cast(dtype),
            layer.bias.as_ref().map(|b| b.val().cast(dtype)),
        )
        .cast(FloatDType::F32),
    }
}

/// `a.matmul(b)`, computed in `precision`.
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>, precision: Precision) -> Tensor<D> {
    match precision.compute_dtype() {
        None => a.matmul(b),
        Some(dtype) => a.cast(dtype).matmul(b.cast(dtype)).cast(FloatDType::F32),
    }
}

/// `conv.forward(x)` in `dtype` with the given symmetric `padding`, returning f32.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>, padding: [usize; 2], dtype: FloatDType) -> Tensor<4> {
    let options = ConvOptions::new(conv.stride, padding, conv.dilation, conv.groups);
    burn::tensor::module::conv2d(
        x.cast(dtype),
        conv.weight.val().cast(dtype),
        conv.bias.as_ref().map(|b| b.val().cast(dtype)),
        options,
    )
    .cast(FloatDType::F32)
}
