//! 2-D convolution of a Burn `Conv2d` module: kd's batch-wide GEMM or depthwise kernel on the
//! CPU in f32, the autocast precision where it is not f32, Burn's `conv2d` everywhere else.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

use super::flex::{self, conv as kernels};
use super::{Precision, autocast};

/// Symmetric padding of `conv` as `[pad_h, pad_w]`, when it has one.
fn symmetric_padding(conv: &Conv2d) -> Option<[usize; 2]> {
    match conv.padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some([top, left])
        }
        _ => None,
    }
}

/// Whether [`conv2d`] runs `conv` on `x` through the batch-wide GEMM convolution (flex device,
/// f32, no groups or dilation, symmetric padding) rather than Burn's `conv2d`.
pub fn gemm_applies(conv: &Conv2d, x: &Tensor<4>) -> bool {
    conv.groups == 1
        && conv.dilation == [1, 1]
        && symmetric_padding(conv).is_some()
        && flex::is_flex_f32(x)
}

/// Whether [`conv2d`] runs `conv` on `x` through the direct depthwise kernel: one filter per
/// channel (`groups` = input = output channels), square kernel, stride and padding.
pub fn depthwise_applies(conv: &Conv2d, x: &Tensor<4>) -> bool {
    let [out_channels, per_group, kh, kw] = conv.weight.dims();
    let channels = x.dims()[1];
    conv.groups == channels
        && out_channels == channels
        && per_group == 1
        && kh == kw
        && conv.dilation == [1, 1]
        && conv.stride[0] == conv.stride[1]
        && matches!(symmetric_padding(conv), Some([p, q]) if p == q)
        && flex::is_flex_f32(x)
}

/// `conv.forward(x)` in `precision`: through kd's kernels where they apply (f32 on the flex
/// device), in the autocast dtype when `precision` is not f32.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>, precision: Precision) -> Tensor<4> {
    if let Some(dtype) = precision.compute_dtype() {
        return match symmetric_padding(conv) {
            Some(padding) => autocast::conv2d(conv, x, padding, dtype),
            None => conv.forward(x),
        };
    }
    let out = if depthwise_applies(conv, &x) {
        let [padding, _] = symmetric_padding(conv).expect("checked by depthwise_applies");
        kernels::depthwise_conv2d(x, conv.weight.val(), conv.stride[0], padding)
    } else if let Some(padding) = symmetric_padding(conv).filter(|_| gemm_applies(conv, &x)) {
        kernels::gemm_conv2d(x, conv.weight.val(), conv.stride, padding)
    } else {
        return conv.forward(x);
    };
    match &conv.bias {
        Some(bias) => {
            let channels = bias.dims()[0];
            out + bias.val().reshape([1, channels, 1, 1])
        }
        None => out,
    }
}
