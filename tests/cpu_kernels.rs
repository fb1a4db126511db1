//! kd's own CPU kernels against Burn's generic implementations.
//!
//! - The batch-wide GEMM convolution (`kd::conv`) against Burn's `conv2d`: outputs and the
//!   gradients of input, weight and bias, over strides, paddings, kernel sizes, non-square
//!   images and batches that run as one image per chunk or several images per chunk.
//! - The direct depthwise convolution (`kd::conv`, groups = channels) against Burn's grouped
//!   `conv2d`: outputs and the gradients of input, weight and bias.
//! - The fused training BatchNorm (`kd::norm`) against Burn's `BatchNorm`: outputs, running
//!   statistics and the gradients of input, gamma and beta.
//! - The vectorised GELU (`kd::gelu`) against Burn's `gelu`: outputs and input gradients.

mod common;

use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::{Device, Distribution, Tensor};
use common::{rel_err, values};

/// (batch, in, out, height, width, kernel, stride, padding)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

const CASES: &[Case] = &[
    (3, 4, 8, 9, 7, 3, 1, 1),    // several images per chunk, odd sizes
    (2, 3, 16, 20, 20, 7, 2, 3), // ResNet stem, stride 2
    (4, 8, 12, 6, 6, 1, 2, 0),   // 1x1 downsample, stride 2
    (5, 6, 4, 8, 10, 3, 2, 1),   // stride 2 on odd widths
    (2, 16, 8, 64, 64, 3, 1, 1), // one image per chunk (im2col above the chunk size)
    (1, 2, 3, 5, 5, 5, 1, 0),    // kernel as large as the image
    (2, 3, 5, 7, 7, 3, 3, 2),    // stride 3, padding 2
    (1, 2, 3, 6, 1, 5, 1, 2),    // width 1: kernel columns that only see padding
    (1, 2, 3, 2, 2, 7, 1, 3),    // 7x7 kernel on a 2x2 image
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
fn depthwise_convolution_matches_burn_forward_and_backward() {
    let device = Device::flex().autodiff();
    // (batch, channels, height, width, kernel, stride, padding)
    for (b, c, h, w, k, s, p) in [
        (2, 6, 9, 7, 3, 1, 1),
        (3, 4, 10, 11, 3, 2, 1),
        (2, 5, 8, 8, 5, 1, 2),
        (1, 3, 6, 6, 3, 1, 0),
        (2, 8, 28, 28, 3, 1, 1),
    ] {
        let conv = Conv2dConfig::new([c, c], [k, k])
            .with_groups(c)
            .with_stride([s, s])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .init(&device);
        let x: Tensor<4> =
            Tensor::random([b, c, h, w], Distribution::Normal(0.0, 1.0), &device).require_grad();
        assert!(
            kd::conv::depthwise_applies(&conv, &x),
            "not routed to the depthwise kernel"
        );
        assert!(!kd::conv::gemm_applies(&conv, &x));
        let out = [b, c, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1];
        let probe: Tensor<4> = Tensor::random(out, Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let y = if ours {
                kd::conv::conv2d(&conv, x.clone())
            } else {
                conv.forward(x.clone())
            };
            let grads = (y.clone() * probe.clone()).sum().backward();
            [
                values(y),
                values(x.grad(&grads).unwrap()),
                values(conv.weight.val().grad(&grads).unwrap()),
                values(conv.bias.as_ref().unwrap().val().grad(&grads).unwrap()),
            ]
        };
        let (burn, ours) = (run(false), run(true));
        for (what, (burn, ours)) in ["output", "input grad", "weight grad", "bias grad"]
            .iter()
            .zip(burn.iter().zip(&ours))
        {
            let err = rel_err(ours, burn);
            assert!(
                err < 1e-5,
                "depthwise {what} differs ({err:.1e}) for b{b} c{c} {h}x{w} k{k} s{s} p{p}"
            );
        }
    }
}

#[test]
fn same_padded_and_grouped_convolutions_stay_on_burn() {
    let device = Device::flex();
    let x: Tensor<4> = Tensor::zeros([1, 4, 8, 8], &device);
    let grouped = Conv2dConfig::new([4, 4], [3, 3])
        .with_groups(2)
        .init(&device);
    let same = Conv2dConfig::new([4, 4], [3, 3])
        .with_padding(PaddingConfig2d::Same)
        .init(&device);
    for conv in [&grouped, &same] {
        assert!(!kd::conv::gemm_applies(conv, &x));
        assert!(!kd::conv::depthwise_applies(conv, &x));
    }
    assert_eq!(kd::conv::conv2d(&same, x.clone()).dims(), [1, 4, 8, 8]);
    assert_eq!(kd::conv::conv2d(&grouped, x).dims(), [1, 4, 6, 6]);
}

/// Output, running mean/var after the step, and gradients of x, gamma and beta.
fn batch_norm_results(
    bn: &BatchNorm,
    x: &Tensor<4>,
    probe: &Tensor<4>,
    ours: bool,
) -> [Vec<f64>; 6] {
    let y = if ours {
        kd::norm::batch_norm(bn, x.clone())
    } else {
        bn.forward(x.clone())
    };
    let grads = (y.clone() * probe.clone()).sum().backward();
    [
        values(y),
        values(bn.running_mean.value()),
        values(bn.running_var.value()),
        values(x.grad(&grads).unwrap()),
        values(bn.gamma.val().grad(&grads).unwrap()),
        values(bn.beta.val().grad(&grads).unwrap()),
    ]
}

#[test]
fn fused_batch_norm_matches_burn_forward_backward_and_running_stats() {
    let device = Device::flex().autodiff();
    // (With 2 values per channel the input gradient is exactly 0 and only rounding is left.)
    for [b, c, h, w] in [[4, 3, 5, 7], [16, 8, 8, 8], [3, 5, 2, 1]] {
        let x: Tensor<4> =
            Tensor::random([b, c, h, w], Distribution::Normal(1.5, 2.0), &device).require_grad();
        let probe: Tensor<4> =
            Tensor::random([b, c, h, w], Distribution::Normal(0.0, 1.0), &device);
        let gamma: Tensor<1> = Tensor::random([c], Distribution::Normal(1.0, 0.3), &device);
        let beta: Tensor<1> = Tensor::random([c], Distribution::Normal(0.0, 0.3), &device);
        let fresh = || {
            let mut bn: BatchNorm = BatchNormConfig::new(c).init(&device);
            bn.gamma = bn.gamma.map(|_| gamma.clone().require_grad());
            bn.beta = bn.beta.map(|_| beta.clone().require_grad());
            bn
        };
        let (burn_bn, our_bn) = (fresh(), fresh());
        assert!(
            kd::norm::fused_applies(&our_bn, &x),
            "not routed to the fused kernel"
        );
        let burn = batch_norm_results(&burn_bn, &x, &probe, false);
        let ours = batch_norm_results(&our_bn, &x, &probe, true);
        let names = [
            "output",
            "running mean",
            "running var",
            "input grad",
            "gamma grad",
            "beta grad",
        ];
        for (what, (burn, ours)) in names.iter().zip(burn.iter().zip(&ours)) {
            let err = rel_err(ours, burn);
            assert!(
                err < 1e-5,
                "{what} differs (rel. error {err:.1e}) for {b}x{c}x{h}x{w}"
            );
        }
    }
}

#[test]
fn batch_norm_inference_matches_burn() {
    let device = Device::flex().autodiff();
    let bn: BatchNorm = BatchNormConfig::new(3).init(&device);
    // One training step gives the running statistics non-trivial values.
    let x: Tensor<4> = Tensor::random([4, 3, 5, 5], Distribution::Normal(2.0, 3.0), &device);
    let _ = kd::norm::batch_norm(&bn, x.clone());
    let bn = bn.valid();
    let x = x.inner();
    assert!(!kd::norm::fused_applies(&bn, &x));
    let err = rel_err(
        &values(kd::norm::batch_norm(&bn, x.clone())),
        &values(bn.forward(x)),
    );
    assert!(err < 1e-6, "inference batch norm differs: {err:.1e}");
}

#[test]
fn vectorised_gelu_matches_burn() {
    let device = Device::flex().autodiff();
    let x: Tensor<3> =
        Tensor::random([4, 33, 65], Distribution::Normal(0.0, 3.0), &device).require_grad();
    let probe: Tensor<3> = Tensor::random([4, 33, 65], Distribution::Normal(0.0, 1.0), &device);
    assert!(kd::gelu::fast_applies(&x));
    let run = |ours: bool| {
        let y = if ours {
            kd::gelu::gelu(x.clone())
        } else {
            burn::tensor::activation::gelu(x.clone())
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        (values(y), values(x.grad(&grads).unwrap()))
    };
    let ((y_burn, g_burn), (y_ours, g_ours)) = (run(false), run(true));
    let (ey, eg) = (rel_err(&y_ours, &y_burn), rel_err(&g_ours, &g_burn));
    assert!(
        ey < 1e-6 && eg < 1e-6,
        "gelu differs: output {ey:.1e}, gradient {eg:.1e}"
    );
}
