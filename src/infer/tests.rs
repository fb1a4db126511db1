//! The inference plan's kernels against Burn's operations: convolutions (Winograd, im2col
//! GEMM, the few-rows product, 1x1 read in place by the narrow product or the GEMM, direct
//! on few channels) with bias, residual and ReLU; depthwise convolutions with each kind of
//! activation; max pooling. Odd sizes, strides, paddings, batches of several images.

use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Distribution, Tensor};

use super::conv::Conv;
use super::depthwise::Depthwise;
use super::pointwise::Act;
use super::pool::MaxPool;
use super::window::Window;

fn random<const D: usize>(dims: [usize; D]) -> Tensor<D> {
    Tensor::random(dims, Distribution::Normal(0.0, 1.0), &Device::flex())
}

fn floats<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    crate::models::onnx::floats(t.clone()).unwrap()
}

/// `[b, c, h, w]` (NCHW) values as NHWC.
fn nhwc(t: &Tensor<4>) -> Vec<f32> {
    floats(&t.clone().permute([0, 2, 3, 1]))
}

fn assert_close(expected: &[f32], actual: &[f32], what: &str) {
    assert_eq!(expected.len(), actual.len(), "{what}: sizes");
    let diff = crate::run::onnx::max_difference(expected, actual);
    assert!(diff < 1e-5, "{what}: differs by {diff} (relative)");
}

/// (batch, in, out, height, width, kernel, stride, padding, residual)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize, bool);

#[test]
fn convolutions_match_burn() {
    let cases: &[Case] = &[
        (3, 8, 16, 9, 7, 3, 1, 1, true), // Winograd, odd sizes, partial tiles, residual
        (2, 16, 24, 14, 14, 3, 1, 1, false), // Winograd, several blocks
        (1, 4, 8, 3, 3, 3, 1, 1, true),  // 3x3 below Winograd's tiles: im2col
        (2, 3, 16, 20, 20, 7, 2, 3, false), // a stem: three channels, direct (AVX-512)
        (2, 3, 24, 17, 19, 3, 2, 1, false), // direct, two masked vectors, odd sizes
        (1, 3, 40, 9, 9, 3, 2, 1, false), // too many outputs for the direct path: im2col
        (4, 8, 12, 6, 6, 1, 2, 0, true), // 1x1 downsample, stride 2
        (5, 6, 70, 8, 10, 3, 2, 1, false), // stride 2 on odd widths, masked columns
        (1, 24, 40, 13, 13, 1, 1, 0, true), // 1x1 read in place, few rows
        (2, 16, 32, 40, 40, 1, 1, 0, false), // 1x1 read in place, narrow (AVX-512) or GEMM
        (3, 24, 72, 11, 9, 1, 1, 0, true), // narrow: 3 + 2 vectors, residual, partial tiles
        (1, 2050, 16, 10, 10, 1, 1, 0, true), // 1x1 too deep for the narrow product: GEMM
        (1, 160, 200, 7, 7, 1, 1, 0, false), // one image's last map: columns split
        (3, 40, 70, 7, 7, 1, 1, 0, true), // small maps, many rows: panels, prepared
        (2, 2, 3, 5, 5, 5, 1, 0, false), // kernel as large as the image
    ];
    for &(b, c, o, h, w, k, s, p, with_residual) in cases {
        let what = format!("{b}x{c}x{h}x{w} -> {o}, k{k} s{s} p{p}");
        let (x, weight, bias) = (random([b, c, h, w]), random([o, c, k, k]), random([o]));
        let options = ConvOptions::new([s, s], [p, p], [1, 1], 1);
        let mut expected = conv2d(x.clone(), weight.clone(), Some(bias.clone()), options);
        let residual = with_residual.then(|| random(expected.dims()));
        if let Some(r) = &residual {
            expected = expected + r.clone();
        }
        let expected = nhwc(&burn::tensor::activation::relu(expected));
        let mut conv = Conv::from_oihw(
            &floats(&weight),
            [o, c, k, k],
            Some(&floats(&bias)),
            [s, s],
            [p; 4],
        );
        conv.act = Act::Relu;
        let residual = residual.map(|r| nhwc(&r));
        // As built, then as the plan prepares it for its output size (small maps: the
        // weights in column panels, every batch through the few-rows product).
        for prepared in [false, true] {
            if prepared {
                let [ho, wo] = conv.out_size(h, w);
                conv.for_output(ho * wo);
            }
            let mut out = vec![f32::NAN; expected.len()];
            conv.run(&nhwc(&x), [b, h, w], residual.as_deref(), &mut out);
            assert_close(&expected, &out, &format!("{what}, prepared {prepared}"));
        }
    }
}

#[test]
fn linear_layers_match_burn() {
    for (b, i, o) in [(1, 960, 1280), (5, 30, 7), (70, 64, 10)] {
        let (x, weight, bias) = (random([b, i]), random([i, o]), random([o]));
        let expected = floats(&(x.clone().matmul(weight.clone()) + bias.clone().unsqueeze()));
        let mut layer = Conv::linear(&floats(&weight), [i, o], Some(&floats(&bias)));
        for prepared in [false, true] {
            if prepared {
                layer.for_output(1);
            }
            let mut out = vec![f32::NAN; b * o];
            layer.run(&floats(&x), [b, 1, 1], None, &mut out);
            let what = format!("linear {b}x{i} -> {o}, prepared {prepared}");
            assert_close(&expected, &out, &what);
        }
    }
}

#[test]
fn depthwise_convolutions_match_burn() {
    // (batch, channels, height, width, kernel, stride)
    for (case, (b, c, h, w, k, s)) in [
        (2, 16, 11, 9, 3, 1),
        (3, 24, 12, 12, 5, 2),
        (1, 8, 7, 7, 5, 1),
        (2, 5, 6, 9, 3, 2),
        (1, 40, 5, 29, 3, 1), // eight pixels at a time, a masked block
        (2, 72, 9, 30, 5, 2),
        (2, 24, 6, 18, 5, 1), // stride 1, 5 wide: inside groups of 8, 4 and 2
    ]
    .into_iter()
    .enumerate()
    {
        let (x, weight, bias) = (random([b, c, h, w]), random([c, 1, k, k]), random([c]));
        let p = k / 2;
        let options = ConvOptions::new([s, s], [p, p], [1, 1], c);
        let y = conv2d(x.clone(), weight.clone(), Some(bias.clone()), options);
        // Each activation in turn: in registers (ReLU, hardswish, none) or after the store
        // (sigmoid).
        use burn::tensor::activation::{hard_swish, relu, sigmoid};
        let (act, expected) = match case % 4 {
            0 => (Act::Relu, relu(y)),
            1 => (Act::Hardswish, hard_swish(y)),
            2 => (Act::Sigmoid, sigmoid(y)),
            _ => (Act::Identity, y),
        };
        let expected = nhwc(&expected);
        let mut conv = Depthwise::from_oihw(
            &floats(&weight),
            [c, 1, k, k],
            Some(&floats(&bias)),
            [s, s],
            [p; 4],
        );
        conv.act = act;
        let what = format!("depthwise {b}x{c}x{h}x{w} k{k} s{s} {act:?}");
        let mut out = vec![f32::NAN; expected.len()];
        conv.run(&nhwc(&x), [b, h, w], &mut out);
        assert_close(&expected, &out, &what);
        let mut out = vec![f32::NAN; expected.len()];
        conv.run_portable(&nhwc(&x), [b, h, w], &mut out);
        assert_close(&expected, &out, &format!("{what}, portable"));
        // With the weights laid out along the rows (stride 1).
        conv.lay_out_along(conv.out_size(h, w)[1]);
        let mut out = vec![f32::NAN; expected.len()];
        conv.run_portable(&nhwc(&x), [b, h, w], &mut out);
        assert_close(&expected, &out, &format!("{what}, along rows"));
    }
}

#[test]
fn max_pooling_matches_burn() {
    // (height, width, kernel, stride, padding, ceil)
    for (h, w, k, s, p, ceil) in [
        (112, 112, 3, 2, 1, false),
        (9, 7, 3, 2, 1, false),
        (9, 7, 3, 2, 0, true),
        (6, 6, 2, 2, 0, false),
    ] {
        let x = random([2, 5, h, w]);
        let options = MaxPoolOptions::new([k, k])
            .with_stride([s, s])
            .with_padding([p, p])
            .with_ceil_mode(ceil);
        let expected = nhwc(&max_pool2d(x.clone(), options));
        let pool = MaxPool {
            window: Window {
                kernel: [k, k],
                stride: [s, s],
                pads: [p; 4],
            },
            ceil,
        };
        let mut out = vec![f32::NAN; expected.len()];
        pool.run(&nhwc(&x), [2, h, w, 5], &mut out);
        assert_close(
            &expected,
            &out,
            &format!("max pool {h}x{w} k{k} s{s} p{p} ceil {ceil}"),
        );
    }
}
