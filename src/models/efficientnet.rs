//! EfficientNet-B0 and -B1 with torchvision's structure and state-dict names
//! (`features.<stage>.<block>.block.<j>`, `classifier.1`): SiLU, squeeze-and-excitation with a
//! sigmoid gate, PyTorch's BatchNorm defaults, stochastic depth growing to 0.2 over the blocks,
//! classifier dropout 0.2.

use anyhow::Result;
use burn::module::Module;
use burn::nn::{Initializer, Linear};
use burn::tensor::{Device, Tensor};

use super::blocks::{
    Activation, BlockSettings, ConvBnAct, Feature, Gate, InvertedResidual, NormSettings, linear,
    make_divisible, pooled_features_to_onnx,
};
use super::onnx::{Graph, Value};
use super::{Architecture, ModelSpec, Remap};
use crate::ops::Ctx;

/// torchvision's B0 stage table: expand ratio, kernel, stride, input and output channels,
/// blocks.
const STAGES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
];

/// Shape of an EfficientNet.
#[derive(Debug, Clone, PartialEq)]
pub struct EfficientNetConfig {
    /// torchvision's `width_mult` (B0 and B1: 1).
    pub width_mult: f64,
    /// torchvision's `depth_mult` (B0: 1, B1: 1.1).
    pub depth_mult: f64,
    /// Classifier dropout (training only).
    pub dropout: f64,
    /// Stochastic-depth probability of the last block (training only).
    pub stochastic_depth: f64,
    /// Output classes.
    pub num_classes: usize,
}

impl EfficientNetConfig {
    /// Builds the network with torchvision's initialisation.
    pub fn init(&self, device: &Device) -> EfficientNet {
        let norm = NormSettings {
            epsilon: 1e-5,
            momentum: 0.1,
        };
        let adjust = |c: usize| make_divisible(c as f64 * self.width_mult);
        let layers = |n: usize| (n as f64 * self.depth_mult).ceil() as usize;
        let total: usize = STAGES.iter().map(|s| layers(s.5)).sum();
        let mut features = vec![Feature::Conv(ConvBnAct::new(
            3,
            adjust(STAGES[0].3),
            3,
            2,
            1,
            Activation::Silu,
            norm,
            device,
        ))];
        let mut block_id = 0;
        for &(ratio, kernel, stride, cin, cout, n) in STAGES {
            let (cin, cout) = (adjust(cin), adjust(cout));
            let stage = (0..layers(n))
                .map(|i| {
                    let cin = if i == 0 { cin } else { cout };
                    let settings = BlockSettings {
                        cin,
                        kernel,
                        expanded: make_divisible((cin * ratio) as f64),
                        cout,
                        squeeze: Some((cin / 4).max(1)),
                        stride: if i == 0 { stride } else { 1 },
                        act: Activation::Silu,
                        se_act: Activation::Silu,
                        gate: Gate::Sigmoid,
                        drop_path: self.stochastic_depth * block_id as f64 / total as f64,
                    };
                    block_id += 1;
                    InvertedResidual::new(settings, norm, device)
                })
                .collect();
            features.push(Feature::Stage(stage));
        }
        let last_in = adjust(STAGES[STAGES.len() - 1].4);
        let last_out = 4 * last_in;
        features.push(Feature::Conv(ConvBnAct::new(
            last_in,
            last_out,
            1,
            1,
            1,
            Activation::Silu,
            norm,
            device,
        )));
        let range = 1.0 / (self.num_classes as f64).sqrt();
        let init = Initializer::Uniform {
            min: -range,
            max: range,
        };
        EfficientNet {
            features,
            classifier: linear(last_out, self.num_classes, init, device),
            dropout: self.dropout,
        }
    }
}

/// torchvision-compatible EfficientNet.
#[derive(Module, Debug)]
pub struct EfficientNet {
    features: Vec<Feature>,
    /// `classifier.1`
    classifier: Linear,
    dropout: f64,
}

impl Architecture for EfficientNet {
    const NAMES: &'static [&'static str] = &["efficientnet_b0", "efficientnet_b1"];
    const DESCRIPTION: &'static str = "student (torchvision EfficientNet)";
    const FROM_TORCH: &'static [Remap] = &[
        (r"^classifier\.1\.", "classifier."),
        (r"\.0\.(\w+)$", ".conv.${1}"),
        (r"\.1\.(\w+)$", ".bn.${1}"),
    ];
    const TO_TORCH: &'static [Remap] = &[
        (r"^classifier\.", "classifier.1."),
        (r"\.conv\.(\w+)$", ".0.${1}"),
        (r"\.bn\.(\w+)$", ".1.${1}"),
    ];
    const HEAD: &'static str = "classifier.";

    fn validate(spec: &ModelSpec, image_size: usize) -> Result<()> {
        spec.refuse_stem()?;
        super::blocks::check_min_size(spec, image_size)
    }

    fn build(spec: &ModelSpec, num_classes: usize, _: usize, device: &Device) -> Result<Self> {
        let config = EfficientNetConfig {
            width_mult: spec.width.map_or(1.0, |w| w as f64 / 32.0),
            depth_mult: if spec.name == "efficientnet_b1" {
                1.1
            } else {
                1.0
            },
            dropout: 0.2,
            stochastic_depth: 0.2,
            num_classes,
        };
        Ok(config.init(device))
    }

    fn forward_features(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<2> {
        let x = self.features.iter().fold(x, |x, f| f.forward(x, cx));
        cx.global_avg_pool(x)
    }

    fn forward_head(&self, features: Tensor<2>, cx: &Ctx) -> Tensor<2> {
        cx.linear(&self.classifier, cx.dropout(features, self.dropout))
    }

    fn num_features(&self) -> usize {
        self.classifier.weight.dims()[0]
    }

    fn to_onnx(&self, g: &mut Graph, x: Value, _: usize) -> Result<Value> {
        let features = pooled_features_to_onnx(&self.features, g, x)?;
        g.linear("classifier.1", &features, &self.classifier, 2)
    }
}
