//! The batch-wide GEMM convolution (`kd::conv`) against Burn's own `conv2d`: outputs and the
//! gradients of input, weight and bias, over strides, paddings, kernel sizes, non-square images
//! and batches that run as one image per chunk or several images per chunk.

mod common;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::{Device, Distribution, Tensor};
use common::{rel_err, values};

/// (batch, in, out, height, width, kernel, stride, padding)
const CASES: &[(usize, usize, usize, usize, usize, usize, usize, usize)] = &[
    (3, 4, 8, 9, 7, 3, 1, 1),    // several images per chunk, odd sizes
    (2, 3, 16, 20, 20, 7, 2, 3), // ResNet stem, stride 2
    (4, 8, 12, 6, 6, 1, 2, 0),   // 1x1 downsample, stride 2
    (5, 6, 4, 8, 10, 3, 2, 1),   // stride 2 on odd widths
    (2, 16, 8, 64, 64, 3, 1, 1), // one image per chunk (im2col above the chunk size)
    (1, 2, 3, 5, 5, 5, 1, 0),    // kernel as large as the image
    (2, 3, 5, 7, 7, 3, 3, 2),    // stride 3, padding 2
];

#[test]
fn gemm_convolution_matches_burn_forward_and_backward() {
    let device = Device::flex().autodiff();
    for &(b, cin, cout, h, w, k, s, p) in CASES {
        let conv = Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([s, s])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .init(&device);
        let x: Tensor<4> =
            Tensor::random([b, cin, h, w], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let probe: Tensor<4> = Tensor::random(
            [b, cout, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1],
            Distribution::Normal(0.0, 1.0),
            &device,
        );

        assert!(
            kd::conv::gemm_applies(&conv, &x),
            "not routed to the GEMM path"
        );
        let mut results = Vec::new();
        for ours in [false, true] {
            let y = if ours {
                kd::conv::conv2d(&conv, x.clone())
            } else {
                conv.forward(x.clone())
            };
            let grads = (y.clone() * probe.clone()).sum().backward();
            let weight = conv.weight.val();
            let bias = conv.bias.as_ref().unwrap().val();
            results.push([
                values(y),
                values(x.grad(&grads).unwrap()),
                values(weight.grad(&grads).unwrap()),
                values(bias.grad(&grads).unwrap()),
            ]);
        }
        for (what, (burn, ours)) in ["output", "input grad", "weight grad", "bias grad"]
            .iter()
            .zip(results[0].iter().zip(&results[1]))
        {
            let err = rel_err(ours, burn);
            assert!(
                err < 1e-5,
                "{what} differs (rel. error {err:.1e}) for b{b} {cin}->{cout} {h}x{w} k{k} s{s} p{p}"
            );
        }
    }
}

#[test]
fn gemm_convolution_without_autodiff_matches_burn() {
    let device = Device::flex();
    let conv = Conv2dConfig::new([3, 6], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(&device);
    let x: Tensor<4> = Tensor::random([2, 3, 11, 11], Distribution::Normal(0.0, 1.0), &device);
    assert!(kd::conv::gemm_applies(&conv, &x));
    let err = rel_err(
        &values(kd::conv::conv2d(&conv, x.clone())),
        &values(conv.forward(x)),
    );
    assert!(err < 1e-5, "rel. error {err:.1e}");
}

#[test]
fn depthwise_and_same_padded_convolutions_stay_on_burn() {
    let device = Device::flex();
    let x: Tensor<4> = Tensor::zeros([1, 4, 8, 8], &device);
    let depthwise = Conv2dConfig::new([4, 4], [3, 3])
        .with_groups(4)
        .init(&device);
    let same = Conv2dConfig::new([4, 4], [3, 3])
        .with_padding(PaddingConfig2d::Same)
        .init(&device);
    assert!(!kd::conv::gemm_applies(&depthwise, &x));
    assert!(!kd::conv::gemm_applies(&same, &x));
    assert_eq!(kd::conv::conv2d(&same, x).dims(), [1, 4, 8, 8]);
}
