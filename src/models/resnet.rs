//! ResNet-18/34/50 with torchvision's structure and parameter names (`conv1`, `bn1`,
//! `layer1.0.conv1`, `layer2.0.downsample.0`, `fc`, ...), any class count, configurable
//! stem and widths.

use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::onnx::{Graph, Value};
use super::{Architecture, ModelSpec, Remap};
use crate::ops::Ctx;

/// Residual block kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34).
    Basic,
    /// 1x1, 3x3, 1x1 with expansion 4 (ResNet-50).
    Bottleneck,
}

impl BlockKind {
    /// Output channels per unit of width.
    pub fn expansion(self) -> usize {
        match self {
            Self::Basic => 1,
            Self::Bottleneck => 4,
        }
    }
}

/// The network's first layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// torchvision's: 7x7 stride-2 convolution and 3x3 stride-2 max pool (input / 4);
    /// images from 32x32.
    Imagenet,
    /// For small images (e.g. 32x32): 3x3 stride-1 convolution, no pool; images from 8x8.
    Small,
}

/// Shape of a ResNet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Block kind.
    pub block: BlockKind,
    /// Blocks per stage.
    pub layers: [usize; 4],
    /// Width of each stage (before expansion); torchvision uses 64/128/256/512.
    pub widths: [usize; 4],
    /// Stem variant.
    pub stem: Stem,
    /// Output classes.
    pub num_classes: usize,
}

impl ResNetConfig {
    /// torchvision's ResNet of the given depth (18, 34 or 50).
    pub fn torchvision(depth: usize, num_classes: usize) -> Option<Self> {
        let (block, layers) = match depth {
            18 => (BlockKind::Basic, [2, 2, 2, 2]),
            34 => (BlockKind::Basic, [3, 4, 6, 3]),
            50 => (BlockKind::Bottleneck, [3, 4, 6, 3]),
            _ => return None,
        };
        Some(Self {
            block,
            layers,
            widths: [64, 128, 256, 512],
            stem: Stem::Imagenet,
            num_classes,
        })
    }

    /// Builds the network with torchvision's initialisation (Kaiming normal, fan-out).
    pub fn init(&self, device: &Device) -> ResNet {
        let stem_width = self.widths[0];
        let conv1 = match self.stem {
            Stem::Imagenet => conv(3, stem_width, 7, 2, 3, device),
            Stem::Small => conv(3, stem_width, 3, 1, 1, device),
        };
        let mut in_ch = stem_width;
        let mut stages = Vec::new();
        for (s, (&n, &w)) in self.layers.iter().zip(&self.widths).enumerate() {
            let stride = if s == 0 { 1 } else { 2 };
            let mut blocks = Vec::new();
            for b in 0..n {
                let st = if b == 0 { stride } else { 1 };
                blocks.push(Block::new(self.block, in_ch, w, st, device));
                in_ch = w * self.block.expansion();
            }
            stages.push(blocks);
        }
        let [layer1, layer2, layer3, layer4]: [Vec<Block>; 4] =
            stages.try_into().expect("four stages");
        ResNet {
            conv1,
            bn1: BatchNormConfig::new(stem_width).init(device),
            maxpool: (self.stem == Stem::Imagenet).then(|| {
                MaxPool2dConfig::new([3, 3])
                    .with_strides([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init()
            }),
            layer1,
            layer2,
            layer3,
            layer4,
            avgpool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(in_ch, self.num_classes).init(device),
        }
    }
}

fn conv(cin: usize, cout: usize, k: usize, stride: usize, pad: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .with_initializer(Initializer::KaimingNormal {
            gain: 2.0f64.sqrt(),
            fan_out_only: true,
        })
        .init(device)
}

/// 1x1 convolution + BatchNorm shortcut; torchvision's `downsample.0` / `downsample.1`.
#[derive(Module, Debug)]
pub struct Downsample {
    /// `downsample.0`
    pub conv: Conv2d,
    /// `downsample.1`
    pub bn: BatchNorm,
}

/// A residual block (basic when `conv3` is absent, bottleneck otherwise).
#[derive(Module, Debug)]
pub struct Block {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Option<Conv2d>,
    bn3: Option<BatchNorm>,
    downsample: Option<Downsample>,
}

impl Block {
    fn new(kind: BlockKind, cin: usize, width: usize, stride: usize, device: &Device) -> Self {
        let cout = width * kind.expansion();
        let downsample = (stride != 1 || cin != cout).then(|| Downsample {
            conv: conv(cin, cout, 1, stride, 0, device),
            bn: BatchNormConfig::new(cout).init(device),
        });
        match kind {
            BlockKind::Basic => Self {
                conv1: conv(cin, width, 3, stride, 1, device),
                bn1: BatchNormConfig::new(width).init(device),
                conv2: conv(width, width, 3, 1, 1, device),
                bn2: BatchNormConfig::new(width).init(device),
                conv3: None,
                bn3: None,
                downsample,
            },
            BlockKind::Bottleneck => Self {
                conv1: conv(cin, width, 1, 1, 0, device),
                bn1: BatchNormConfig::new(width).init(device),
                conv2: conv(width, width, 3, stride, 1, device),
                bn2: BatchNormConfig::new(width).init(device),
                conv3: Some(conv(width, cout, 1, 1, 0, device)),
                bn3: Some(BatchNormConfig::new(cout).init(device)),
                downsample,
            },
        }
    }

    /// The block as ONNX nodes (`name` is its parameter path).
    fn to_onnx(&self, g: &mut Graph, name: &str, x: Value) -> Result<Value> {
        let identity = match &self.downsample {
            Some(d) => g.conv(&format!("{name}.downsample.0"), &x, &d.conv, Some(&d.bn))?,
            None => x.clone(),
        };
        let out = g.conv(&format!("{name}.conv1"), &x, &self.conv1, Some(&self.bn1))?;
        let mut out = g.relu(&out);
        let last = match (&self.conv3, &self.bn3) {
            (Some(conv3), Some(bn3)) => {
                let y = g.conv(&format!("{name}.conv2"), &out, &self.conv2, Some(&self.bn2))?;
                out = g.relu(&y);
                g.conv(&format!("{name}.conv3"), &out, conv3, Some(bn3))?
            }
            _ => g.conv(&format!("{name}.conv2"), &out, &self.conv2, Some(&self.bn2))?,
        };
        let sum = g.add(&last, &identity);
        Ok(g.relu(&sum))
    }

    fn forward(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(d) => cx.batch_norm(&d.bn, cx.conv2d(&d.conv, x.clone())),
            None => x.clone(),
        };
        let out = cx.batch_norm_relu(&self.bn1, cx.conv2d(&self.conv1, x), None);
        match (&self.conv3, &self.bn3) {
            (Some(conv3), Some(bn3)) => {
                let out = cx.batch_norm_relu(&self.bn2, cx.conv2d(&self.conv2, out), None);
                cx.batch_norm_relu(bn3, cx.conv2d(conv3, out), Some(identity))
            }
            _ => cx.batch_norm_relu(&self.bn2, cx.conv2d(&self.conv2, out), Some(identity)),
        }
    }
}

/// torchvision-compatible ResNet.
#[derive(Module, Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    maxpool: Option<MaxPool2d>,
    layer1: Vec<Block>,
    layer2: Vec<Block>,
    layer3: Vec<Block>,
    layer4: Vec<Block>,
    avgpool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl Architecture for ResNet {
    const NAMES: &'static [&'static str] = &["resnet18", "resnet34", "resnet50"];
    const DESCRIPTION: &'static str = "student/teacher (torchvision ResNet)";
    /// torchvision's numbered `downsample` Sequential.
    const FROM_TORCH: &'static [Remap] = &[
        (r"\.downsample\.0\.", ".downsample.conv."),
        (r"\.downsample\.1\.", ".downsample.bn."),
    ];
    const TO_TORCH: &'static [Remap] = &[
        (r"\.downsample\.conv\.", ".downsample.0."),
        (r"\.downsample\.bn\.", ".downsample.1."),
    ];
    const HEAD: &'static str = "fc.";

    /// The last stage must see at least one pixel that is not padding: images from 32 with
    /// torchvision's stem, from 8 with the small one.
    fn validate(spec: &ModelSpec, image_size: usize) -> Result<()> {
        let (min, stem) = match spec.stem.unwrap_or(Stem::Imagenet) {
            Stem::Imagenet => (32, "imagenet"),
            Stem::Small => (8, "small"),
        };
        if image_size < min {
            bail!(
                "image size {image_size} is too small for {} with the {stem} stem: use at least {min}{}",
                spec.name,
                if min > 8 {
                    " (or --stem small, from 8)"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    fn build(spec: &ModelSpec, num_classes: usize, _: usize, device: &Device) -> Result<Self> {
        let depth = spec.name.trim_start_matches("resnet").parse().unwrap_or(0);
        let mut cfg = ResNetConfig::torchvision(depth, num_classes)
            .ok_or_else(|| anyhow::anyhow!("{} is not a ResNet", spec.name))?;
        if let Some(w) = spec.width {
            cfg.widths = [w, 2 * w, 4 * w, 8 * w];
        }
        if let Some(stem) = spec.stem {
            cfg.stem = stem;
        }
        Ok(cfg.init(device))
    }

    fn forward_features(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<2> {
        let mut x = cx.batch_norm_relu(&self.bn1, cx.conv2d(&self.conv1, x), None);
        if let Some(pool) = &self.maxpool {
            x = cx.max_pool2d(pool, x);
        }
        for block in self
            .layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
        {
            x = block.forward(x, cx);
        }
        self.avgpool.forward(x).flatten(1, 3)
    }

    fn forward_head(&self, features: Tensor<2>, _: &Ctx) -> Tensor<2> {
        self.fc.forward(features)
    }

    fn num_features(&self) -> usize {
        self.fc.weight.dims()[0]
    }

    fn to_onnx(&self, g: &mut Graph, x: Value, _: usize) -> Result<Value> {
        let y = g.conv("conv1", &x, &self.conv1, Some(&self.bn1))?;
        let mut x = g.relu(&y);
        if let Some(pool) = &self.maxpool {
            x = g.max_pool(&x, pool)?;
        }
        let stages = [&self.layer1, &self.layer2, &self.layer3, &self.layer4];
        for (s, blocks) in stages.into_iter().enumerate() {
            for (i, block) in blocks.iter().enumerate() {
                x = block.to_onnx(g, &format!("layer{}.{i}", s + 1), x)?;
            }
        }
        let features = g.global_avg_pool(&x);
        g.linear("fc", &features, &self.fc, 2)
    }
}
