//! kd's own CPU kernels against Burn's generic implementations.
//!
//! - The batch-wide GEMM convolution (`kd::ops::conv`) against Burn's `conv2d`: outputs and the
//!   gradients of input, weight and bias, over strides, paddings, kernel sizes, non-square
//!   images and batches that run as one image per chunk or several images per chunk.
//! - The direct depthwise convolution (`kd::ops::conv`, groups = channels) against Burn's grouped
//!   `conv2d`: outputs and the gradients of input, weight and bias.
//! - The fused training BatchNorm (`kd::ops::norm`) against Burn's `BatchNorm`: outputs, running
//!   statistics and the gradients of input, gamma and beta.
//! - The vectorised GELU (`kd::ops::activation`) against Burn's `gelu`: outputs and input gradients.
//! - The max pooling (`kd::ops::pool`) against Burn's `MaxPool2d`: outputs and input gradients.
//! - The fused Adam (`kd::ops::FusedAdam`) against Burn's `Adam`: parameters after several steps.

mod common;

use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{BatchNorm, BatchNormConfig, LinearConfig, PaddingConfig2d};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor};
use common::{assert_all_close, rel_err, values};
use kd::ops::Precision::F32;

/// What the convolution tests compare, in order.
const CONV_RESULTS: [&str; 4] = ["output", "input grad", "weight grad", "bias grad"];

/// What the BatchNorm tests compare, in order (the residual's gradient only with one).
const BN_RESULTS: [&str; 7] = [
    "output",
    "running mean",
    "running var",
    "input grad",
    "gamma grad",
    "beta grad",
    "residual grad",
];

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
    (12, 8, 8, 8, 8, 3, 1, 1),   // weight gradient in two chunks of several images
    (3, 4, 64, 4, 4, 3, 1, 1),   // few pixels per output channel: channel-major input grad
    (2, 128, 8, 5, 5, 3, 1, 1),  // wide input: weight gradient one GEMM per kernel tap
    (3, 128, 16, 6, 6, 3, 2, 1), // wide input, stride 2
    (4, 8, 8, 1, 1, 3, 1, 1),    // 1x1 image: only the kernel's centre sees the input
    (3, 8, 16, 2, 2, 3, 2, 1),   // 2x2 -> 1x1 with stride 2: a 2x2 live window
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
            kd::ops::conv::gemm_applies(&conv, &x),
            "not routed to the GEMM path"
        );
        let mut results = Vec::new();
        for ours in [false, true] {
            let y = if ours {
                kd::ops::conv::conv2d(&conv, x.clone(), F32)
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
        let case = format!("b{b} {cin}->{cout} {h}x{w} k{k} s{s} p{p}");
        assert_all_close(&CONV_RESULTS, &results[0], &results[1], 1e-5, &case);
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
    assert!(kd::ops::conv::gemm_applies(&conv, &x));
    let err = rel_err(
        &values(kd::ops::conv::conv2d(&conv, x.clone(), F32)),
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
        (2, 6, 9, 9, 5, 2, 2),   // MobileNetV3's 5x5/2 on odd sides
        (3, 4, 7, 10, 3, 3, 1),  // stride 3: three phases per row
        (2, 300, 2, 2, 5, 1, 2), // tiny planes, many per task (last stage)
        (64, 40, 3, 3, 3, 2, 1), // planes grouped per task, weight gradient over a batch
    ] {
        let conv = Conv2dConfig::new([c, c], [k, k])
            .with_groups(c)
            .with_stride([s, s])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .init(&device);
        let x: Tensor<4> =
            Tensor::random([b, c, h, w], Distribution::Normal(0.0, 1.0), &device).require_grad();
        assert!(
            kd::ops::conv::depthwise_applies(&conv, &x),
            "not routed to the depthwise kernel"
        );
        assert!(!kd::ops::conv::gemm_applies(&conv, &x));
        let out = [b, c, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1];
        let probe: Tensor<4> = Tensor::random(out, Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let y = if ours {
                kd::ops::conv::conv2d(&conv, x.clone(), F32)
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
        let case = format!("depthwise b{b} c{c} {h}x{w} k{k} s{s} p{p}");
        assert_all_close(&CONV_RESULTS, &burn, &ours, 1e-5, &case);
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
        assert!(!kd::ops::conv::gemm_applies(conv, &x));
        assert!(!kd::ops::conv::depthwise_applies(conv, &x));
    }
    assert_eq!(
        kd::ops::conv::conv2d(&same, x.clone(), F32).dims(),
        [1, 4, 8, 8]
    );
    assert_eq!(kd::ops::conv::conv2d(&grouped, x, F32).dims(), [1, 4, 6, 6]);
}

/// Turns the running variance Burn's `BatchNorm` keeps after one step from a fresh layer
/// (`0.9 + 0.1 · biased variance`) into PyTorch's (unbiased, over `count` values), which
/// kd keeps.
fn pytorch_running_var(running_var: &mut [f64], count: usize) {
    let unbiased = count as f64 / (count - 1) as f64;
    for v in running_var {
        *v = 0.9 + (*v - 0.9) * unbiased;
    }
}

/// Output, running mean/var after the step, and gradients of x, gamma and beta.
fn batch_norm_results(
    bn: &BatchNorm,
    x: &Tensor<4>,
    probe: &Tensor<4>,
    ours: bool,
) -> [Vec<f64>; 6] {
    let y = if ours {
        kd::ops::norm::batch_norm(bn, x.clone())
    } else {
        bn.forward(x.clone())
    };
    let grads = (y.clone() * probe.clone()).sum().backward();
    [
        values(y),
        values(bn.running_mean.value_sync()),
        values(bn.running_var.value_sync()),
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
            kd::ops::norm::fused_applies(&our_bn, &x),
            "not routed to the fused kernel"
        );
        let mut burn = batch_norm_results(&burn_bn, &x, &probe, false);
        pytorch_running_var(&mut burn[2], b * h * w);
        let ours = batch_norm_results(&our_bn, &x, &probe, true);
        assert_all_close(&BN_RESULTS, &burn, &ours, 1e-5, &format!("{b}x{c}x{h}x{w}"));
    }
}

#[test]
fn fused_batch_norm_relu_and_residual_match_burn() {
    let device = Device::flex().autodiff();
    for [b, c, h, w] in [[4, 3, 5, 7], [8, 16, 4, 4]] {
        let shape = [b, c, h, w];
        let x: Tensor<4> =
            Tensor::random(shape, Distribution::Normal(0.5, 2.0), &device).require_grad();
        let residual: Tensor<4> =
            Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
        let probe: Tensor<4> = Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device);
        for with_residual in [false, true] {
            let run = |ours: bool| {
                let bn: BatchNorm = BatchNormConfig::new(c).init(&device);
                let r = with_residual.then(|| residual.clone());
                let y = if ours {
                    assert!(kd::ops::norm::fused_applies(&bn, &x));
                    kd::ops::norm::batch_norm_relu(&bn, x.clone(), r)
                } else {
                    let out = bn.forward(x.clone());
                    burn::tensor::activation::relu(match r {
                        Some(r) => out + r,
                        None => out,
                    })
                };
                let grads = (y.clone() * probe.clone()).sum().backward();
                let mut results = vec![
                    values(y),
                    values(bn.running_mean.value_sync()),
                    values(bn.running_var.value_sync()),
                    values(x.grad(&grads).unwrap()),
                    values(bn.gamma.val().grad(&grads).unwrap()),
                    values(bn.beta.val().grad(&grads).unwrap()),
                ];
                if with_residual {
                    results.push(values(residual.grad(&grads).unwrap()));
                }
                results
            };
            let (mut burn, ours) = (run(false), run(true));
            pytorch_running_var(&mut burn[2], b * h * w);
            let case = format!("{b}x{c}x{h}x{w}, residual {with_residual}");
            assert_all_close(&BN_RESULTS, &burn, &ours, 1e-5, &case);
        }
    }
}

#[test]
fn batch_norm_inference_matches_burn() {
    let device = Device::flex().autodiff();
    let bn: BatchNorm = BatchNormConfig::new(3).init(&device);
    // One training step gives the running statistics non-trivial values.
    let x: Tensor<4> = Tensor::random([4, 3, 5, 5], Distribution::Normal(2.0, 3.0), &device);
    let _ = kd::ops::norm::batch_norm(&bn, x.clone());
    let bn = bn.valid();
    let x = x.inner();
    assert!(!kd::ops::norm::fused_applies(&bn, &x));
    let err = rel_err(
        &values(kd::ops::norm::batch_norm(&bn, x.clone())),
        &values(bn.forward(x)),
    );
    assert!(err < 1e-6, "inference batch norm differs: {err:.1e}");
}

#[test]
fn batch_norm_relu_inference_matches_burn() {
    let device = Device::flex().autodiff();
    let bn: BatchNorm = BatchNormConfig::new(5).init(&device);
    let x: Tensor<4> = Tensor::random([3, 5, 4, 6], Distribution::Normal(1.0, 2.0), &device);
    let _ = kd::ops::norm::batch_norm(&bn, x.clone()); // non-trivial running statistics
    let (bn, x) = (bn.valid(), x.inner());
    let residual = Tensor::random([3, 5, 4, 6], Distribution::Normal(0.0, 1.0), &x.device());
    for r in [None, Some(residual)] {
        let burn = burn::tensor::activation::relu(match r.clone() {
            Some(r) => bn.forward(x.clone()) + r,
            None => bn.forward(x.clone()),
        });
        let ours = kd::ops::norm::batch_norm_relu(&bn, x.clone(), r.clone());
        let err = rel_err(&values(ours), &values(burn));
        assert!(
            err < 1e-6,
            "inference bn+relu differs ({err:.1e}), residual {}",
            r.is_some()
        );
    }
}

#[test]
fn vectorised_gelu_matches_burn() {
    let device = Device::flex().autodiff();
    let x: Tensor<3> =
        Tensor::random([4, 33, 65], Distribution::Normal(0.0, 3.0), &device).require_grad();
    let probe: Tensor<3> = Tensor::random([4, 33, 65], Distribution::Normal(0.0, 1.0), &device);
    assert!(kd::ops::activation::fast_gelu_applies(&x));
    let run = |ours: bool| {
        let y = if ours {
            kd::ops::activation::gelu(x.clone())
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

/// Sigmoid, SiLU, hardswish and hardsigmoid against Burn's operations (PyTorch's formulas
/// written with them, as off the CPU): outputs and input gradients.
#[test]
fn vectorised_activations_match_burn() {
    use kd::ops::activation::{hardsigmoid, hardswish, sigmoid, silu};
    let device = Device::flex().autodiff();
    let x: Tensor<3> =
        Tensor::random([4, 33, 65], Distribution::Normal(0.0, 4.0), &device).require_grad();
    let probe: Tensor<3> = Tensor::random([4, 33, 65], Distribution::Normal(0.0, 1.0), &device);
    type Activation = fn(Tensor<3>) -> Tensor<3>;
    let cases: [(&str, Activation, Activation); 4] = [
        ("sigmoid", sigmoid, burn::tensor::activation::sigmoid),
        ("silu", silu, burn::tensor::activation::silu),
        ("hardswish", hardswish, |x| {
            (x.clone() * x.add_scalar(3.0).clamp(0.0, 6.0)).div_scalar(6.0)
        }),
        ("hardsigmoid", hardsigmoid, |x| {
            x.add_scalar(3.0).clamp(0.0, 6.0).div_scalar(6.0)
        }),
    ];
    for (name, ours, reference) in cases {
        let run = |f: Activation| {
            let y = f(x.clone());
            let grads = (y.clone() * probe.clone()).sum().backward();
            (values(y), values(x.grad(&grads).unwrap()))
        };
        let ((y_burn, g_burn), (y_ours, g_ours)) = (run(reference), run(ours));
        let (ey, eg) = (rel_err(&y_ours, &y_burn), rel_err(&g_ours, &g_burn));
        assert!(
            ey < 1e-6 && eg < 1e-6,
            "{name} differs: output {ey:.1e}, gradient {eg:.1e}"
        );
    }
}

#[test]
fn max_pool_matches_burn_forward_and_backward() {
    let device = Device::flex().autodiff();
    // (batch, channels, height, width, kernel, stride, padding)
    let cases = [
        (2, 3, 32, 32, 3, 2, 1), // ResNet's stem pool
        (3, 2, 9, 7, 3, 2, 1),   // odd sizes
        (1, 4, 8, 8, 2, 2, 0),   // 2x2, no padding
        (2, 2, 7, 9, 3, 1, 1),   // stride 1: overlapping windows
        (1, 1, 5, 6, 5, 3, 2),   // windows mostly padding
    ];
    for (b, c, h, w, k, s, p) in cases {
        let pool = MaxPool2dConfig::new([k, k])
            .with_strides([s, s])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .init();
        let x: Tensor<4> =
            Tensor::random([b, c, h, w], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let out_dims = pool.forward(x.clone().detach()).dims();
        let probe: Tensor<4> = Tensor::random(out_dims, Distribution::Default, &device);
        let run = |ours: bool| {
            let y = if ours {
                kd::ops::pool::max_pool2d(&pool, x.clone())
            } else {
                pool.forward(x.clone())
            };
            let grads = (y.clone() * probe.clone()).sum().backward();
            (values(y), values(x.grad(&grads).unwrap()))
        };
        let ((y_burn, g_burn), (y_ours, g_ours)) = (run(false), run(true));
        let case = format!("{b}x{c}x{h}x{w} k{k} s{s} p{p}");
        // Maxima are picked, not computed: both must agree exactly.
        assert!(y_ours == y_burn, "pool output differs for {case}");
        assert!(g_ours == g_burn, "pool gradient differs for {case}");
    }
}

#[test]
fn max_pool_propagates_nan_and_runs_without_autodiff() {
    let device = Device::flex();
    let pool = MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init();
    let mut data = vec![1.0f32; 16];
    data[5] = f32::NAN; // in the top-left window
    let x = Tensor::<4>::from_data(burn::tensor::TensorData::new(data, [1, 1, 4, 4]), &device);
    let y = values(kd::ops::pool::max_pool2d(&pool, x));
    assert!(
        y[0].is_nan(),
        "NaN must win its window, as in PyTorch: {y:?}"
    );
    assert_eq!(&y[1..], &[1.0, 1.0, 1.0]);
}

#[test]
fn fused_adam_matches_burn_adam() {
    let device = Device::flex().autodiff();
    device.seed(3);
    let start = LinearConfig::new(37, 5).init(&device);
    let x: Tensor<2> = Tensor::random([8, 37], Distribution::Normal(0.0, 1.0), &device);
    let target: Tensor<2> = Tensor::random([8, 5], Distribution::Normal(0.0, 1.0), &device);
    let train = |fused: bool| {
        let mut model = start.clone();
        let mut optim = if fused {
            kd::ops::FusedAdam::new(1e-8).init()
        } else {
            AdamConfig::new().with_epsilon(1e-8).init()
        };
        for step in 0..6 {
            let loss = (model.forward(x.clone()) - target.clone())
                .powi_scalar(2)
                .mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-2 / (step + 1) as f64, model, grads);
        }
        (
            values(model.weight.val()),
            values(model.bias.unwrap().val()),
        )
    };
    let ((w_burn, b_burn), (w_ours, b_ours)) = (train(false), train(true));
    assert_ne!(
        w_ours,
        values(start.weight.val()),
        "the weights did not move"
    );
    assert_eq!(w_ours, w_burn, "weights differ from Burn's Adam");
    assert_eq!(b_ours, b_burn, "biases differ from Burn's Adam");
}
