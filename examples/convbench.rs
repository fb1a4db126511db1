use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::{Device, Distribution, Tensor};
use std::time::Instant;

fn main() {
    let dev = Device::flex().autodiff();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (b, img) = (args[0], args[1]);
    let s1 = img / 4;
    // (cin, cout, h, stride, k, pad, count in resnet18)
    let shapes = [
        (3, 64, img, 2, 7, 3, 1),
        (64, 64, s1, 1, 3, 1, 4),
        (64, 128, s1, 2, 3, 1, 1),
        (128, 128, s1 / 2, 1, 3, 1, 3),
        (64, 128, s1, 2, 1, 0, 1),
        (128, 256, s1 / 2, 2, 3, 1, 1),
        (256, 256, s1 / 4, 1, 3, 1, 3),
        (128, 256, s1 / 2, 2, 1, 0, 1),
        (256, 512, s1 / 4, 2, 3, 1, 1),
        (512, 512, s1 / 8, 1, 3, 1, 3),
        (256, 512, s1 / 4, 2, 1, 0, 1),
    ];
    let mut total = 0.0;
    for (ci, co, h, st, k, pad, count) in shapes {
        let conv = Conv2dConfig::new([ci, co], [k, k])
            .with_stride([st, st])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_bias(false)
            .init(&dev);
        let x: Tensor<4> =
            Tensor::random([b, ci, h, h], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let ho = (h + 2 * pad - k) / st + 1;
        let mut best_f = f64::MAX;
        let mut best_b = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let y = kd::conv::conv2d(&conv, x.clone());
            let _ = y
                .clone()
                .slice([0..1, 0..1, 0..1, 0..1])
                .into_scalar::<f32>();
            let tf = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let g = y.sum().backward();
            let gw = conv.weight.val().grad(&g).unwrap();
            let _ = gw.slice([0..1, 0..1, 0..1, 0..1]).into_scalar::<f32>();
            let tb = t.elapsed().as_secs_f64();
            best_f = best_f.min(tf);
            best_b = best_b.min(tb);
        }
        let flop = 2.0 * (b * ho * ho) as f64 * (ci * k * k) as f64 * co as f64;
        let need_x = ci != 3;
        let bflop = flop * if need_x { 2.0 } else { 1.0 };
        total += (best_f + best_b) * count as f64;
        println!(
            "{ci:4}->{co:4} {h:3}px k{k} s{st} x{count}: fwd {:6.2} ms {:5.0} GF/s | bwd {:6.2} ms {:5.0} GF/s",
            best_f * 1e3,
            flop / best_f / 1e9,
            best_b * 1e3,
            bflop / best_b / 1e9
        );
    }
    println!("total conv time per step: {:.1} ms", total * 1e3);
}
