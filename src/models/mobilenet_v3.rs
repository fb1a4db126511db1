//! MobileNetV3-Small and -Large with torchvision's structure and state-dict names
//! (`features.<i>`, `features.<i>.block.<j>`, `classifier.0` / `classifier.3`): BatchNorm
//! with epsilon 0.001 and momentum 0.01, hardswish, squeeze-and-excitation with a
//! hardsigmoid gate, classifier dropout 0.2.

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

/// One row of torchvision's block table at width 1: input, kernel, expanded and output
/// channels, squeeze-and-excitation, hardswish (else ReLU), stride.
type Row = (usize, usize, usize, usize, bool, bool, usize);

const LARGE: &[Row] = &[
    (16, 3, 16, 16, false, false, 1),
    (16, 3, 64, 24, false, false, 2),
    (24, 3, 72, 24, false, false, 1),
    (24, 5, 72, 40, true, false, 2),
    (40, 5, 120, 40, true, false, 1),
    (40, 5, 120, 40, true, false, 1),
    (40, 3, 240, 80, false, true, 2),
    (80, 3, 200, 80, false, true, 1),
    (80, 3, 184, 80, false, true, 1),
    (80, 3, 184, 80, false, true, 1),
    (80, 3, 480, 112, true, true, 1),
    (112, 3, 672, 112, true, true, 1),
    (112, 5, 672, 160, true, true, 2),
    (160, 5, 960, 160, true, true, 1),
    (160, 5, 960, 160, true, true, 1),
];

const SMALL: &[Row] = &[
    (16, 3, 16, 16, true, false, 2),
    (16, 3, 72, 24, false, false, 2),
    (24, 3, 88, 24, false, false, 1),
    (24, 5, 96, 40, true, true, 2),
    (40, 5, 240, 40, true, true, 1),
    (40, 5, 240, 40, true, true, 1),
    (40, 5, 120, 48, true, true, 1),
    (48, 5, 144, 48, true, true, 1),
    (48, 5, 288, 96, true, true, 2),
    (96, 5, 576, 96, true, true, 1),
    (96, 5, 576, 96, true, true, 1),
];

/// Shape of a MobileNetV3.
#[derive(Debug, Clone, PartialEq)]
pub struct MobileNetV3Config {
    /// The large variant (else small).
    pub large: bool,
    /// torchvision's `width_mult`.
    pub width_mult: f64,
    /// Classifier dropout (training only).
    pub dropout: f64,
    /// Output classes.
    pub num_classes: usize,
}

impl MobileNetV3Config {
    /// Builds the network with torchvision's initialisation.
    pub fn init(&self, device: &Device) -> MobileNetV3 {
        let norm = NormSettings {
            epsilon: 0.001,
            momentum: 0.01,
        };
        let adjust = |c: usize| make_divisible(c as f64 * self.width_mult);
        let table = if self.large { LARGE } else { SMALL };
        let stem = adjust(table[0].0);
        let mut features = vec![Feature::Conv(ConvBnAct::new(
            3,
            stem,
            3,
            2,
            1,
            Activation::Hardswish,
            norm,
            device,
        ))];
        for &(cin, kernel, expanded, cout, se, hardswish, stride) in table {
            let expanded = adjust(expanded);
            let settings = BlockSettings {
                cin: adjust(cin),
                kernel,
                expanded,
                cout: adjust(cout),
                squeeze: se.then(|| make_divisible((expanded / 4) as f64)),
                stride,
                act: if hardswish {
                    Activation::Hardswish
                } else {
                    Activation::Relu
                },
                se_act: Activation::Relu,
                gate: Gate::Hardsigmoid,
                drop_path: 0.0,
            };
            features.push(Feature::Block(InvertedResidual::new(settings, norm, device)));
        }
        let last_in = adjust(table[table.len() - 1].3);
        let last_out = 6 * last_in;
        features.push(Feature::Conv(ConvBnAct::new(
            last_in,
            last_out,
            1,
            1,
            1,
            Activation::Hardswish,
            norm,
            device,
        )));
        let hidden = adjust(if self.large { 1280 } else { 1024 });
        let init = || Initializer::Normal {
            mean: 0.0,
            std: 0.01,
        };
        MobileNetV3 {
            features,
            classifier_hidden: linear(last_out, hidden, init(), device),
            classifier_out: linear(hidden, self.num_classes, init(), device),
            dropout: self.dropout,
        }
    }
}

/// torchvision-compatible MobileNetV3.
#[derive(Module, Debug)]
pub struct MobileNetV3 {
    features: Vec<Feature>,
    /// `classifier.0`
    classifier_hidden: Linear,
    /// `classifier.3`
    classifier_out: Linear,
    dropout: f64,
}

impl Architecture for MobileNetV3 {
    const NAMES: &'static [&'static str] = &["mobilenet_v3_small", "mobilenet_v3_large"];
    const DESCRIPTION: &'static str = "student (torchvision MobileNetV3)";
    const FROM_TORCH: &'static [Remap] = &[
        (r"^classifier\.0\.", "classifier_hidden."),
        (r"^classifier\.3\.", "classifier_out."),
        (r"\.0\.(\w+)$", ".conv.${1}"),
        (r"\.1\.(\w+)$", ".bn.${1}"),
    ];
    const TO_TORCH: &'static [Remap] = &[
        (r"^classifier_hidden\.", "classifier.0."),
        (r"^classifier_out\.", "classifier.3."),
        (r"\.conv\.(\w+)$", ".0.${1}"),
        (r"\.bn\.(\w+)$", ".1.${1}"),
    ];
    const HEAD: &'static str = "classifier_out.";

    fn validate(spec: &ModelSpec, image_size: usize) -> Result<()> {
        spec.refuse_stem()?;
        super::blocks::check_min_size(spec, image_size)
    }

    fn build(spec: &ModelSpec, num_classes: usize, _: usize, device: &Device) -> Result<Self> {
        let config = MobileNetV3Config {
            large: spec.name == "mobilenet_v3_large",
            width_mult: spec.width.map_or(1.0, |w| w as f64 / 16.0),
            dropout: 0.2,
            num_classes,
        };
        Ok(config.init(device))
    }

    fn forward_features(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<2> {
        let x = self.features.iter().fold(x, |x, f| f.forward(x, cx));
        cx.global_avg_pool(x)
    }

    fn forward_head(&self, features: Tensor<2>, cx: &Ctx) -> Tensor<2> {
        let x = cx.hardswish(cx.linear(&self.classifier_hidden, features));
        cx.linear(&self.classifier_out, cx.dropout(x, self.dropout))
    }

    fn num_features(&self) -> usize {
        self.classifier_hidden.weight.dims()[0]
    }

    fn to_onnx(&self, g: &mut Graph, x: Value, _: usize) -> Result<Value> {
        let features = pooled_features_to_onnx(&self.features, g, x)?;
        let x = g.linear("classifier.0", &features, &self.classifier_hidden, 2)?;
        let x = g.hardswish(&x);
        g.linear("classifier.3", &x, &self.classifier_out, 2)
    }
}
