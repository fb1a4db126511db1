//! Building blocks that MobileNetV3 and EfficientNet share, as torchvision writes them
//! (`torchvision.ops.misc`): convolution + BatchNorm + activation, squeeze-and-excitation,
//! the inverted residual block, and the channel rounding.
//!
//! Burn paths mirror torchvision's state-dict keys except where a name cannot be a field: a
//! `Conv2dNormActivation`'s `0`/`1` are `conv`/`bn` here (each family's key renames say so),
//! and the enums' variant names are left out of PyTorch keys.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use anyhow::{Result, bail};

use super::ModelSpec;
use super::onnx::{Graph, Value};
use crate::ops::Ctx;

/// Both families stride five times by 2: images from 32 pixels give their last stage one.
pub fn check_min_size(spec: &ModelSpec, image_size: usize) -> Result<()> {
    if image_size < 32 {
        bail!(
            "image size {image_size} is too small for {}: use at least 32",
            spec.name
        );
    }
    Ok(())
}

/// torchvision's `_make_divisible(v, 8)`: the nearest multiple of 8, at least 8, and not more
/// than 10% below `v`.
pub fn make_divisible(v: f64) -> usize {
    let rounded = (((v + 4.0) as usize) / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * v {
        rounded + 8
    } else {
        rounded
    }
}

/// The activation after a convolution's BatchNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None (a projection).
    Identity,
    /// `nn.ReLU`.
    Relu,
    /// `nn.Hardswish`.
    Hardswish,
    /// `nn.SiLU`.
    Silu,
}

impl Activation {
    fn apply<const D: usize>(self, x: Tensor<D>, cx: &Ctx) -> Tensor<D> {
        match self {
            Self::Identity => x,
            Self::Relu => burn::tensor::activation::relu(x),
            Self::Hardswish => cx.hardswish(x),
            Self::Silu => cx.silu(x),
        }
    }

    fn to_onnx(self, g: &mut Graph, x: Value) -> Value {
        match self {
            Self::Identity => x,
            Self::Relu => g.relu(&x),
            Self::Hardswish => g.hardswish(&x),
            Self::Silu => g.silu(&x),
        }
    }
}

/// BatchNorm's epsilon and momentum (PyTorch's convention for the momentum).
#[derive(Debug, Clone, Copy)]
pub struct NormSettings {
    /// Added to the variance.
    pub epsilon: f64,
    /// Weight of the batch statistics in the running ones.
    pub momentum: f64,
}

/// torchvision's convolution initialisation: Kaiming normal over the fan-out
/// (`out_channels · k²`, whatever the groups), biases zero.
fn conv(
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    bias: bool,
    device: &Device,
) -> Conv2d {
    let pad = (kernel - 1) / 2;
    let std = (2.0 / (cout * kernel * kernel) as f64).sqrt();
    let mut conv = Conv2dConfig::new([cin, cout], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_groups(groups)
        .with_bias(bias)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device);
    if bias {
        conv.bias = Some(Initializer::Zeros.init([cout], device));
    }
    conv
}

/// A Linear layer with torchvision's initialisation for these families: weights from
/// `weight`, biases zero.
pub fn linear(cin: usize, cout: usize, weight: Initializer, device: &Device) -> Linear {
    let mut layer = LinearConfig::new(cin, cout)
        .with_initializer(weight)
        .init(device);
    layer.bias = Some(Initializer::Zeros.init([cout], device));
    layer
}

/// torchvision's `Conv2dNormActivation`: convolution without bias (padding `(k-1)/2`), then
/// BatchNorm, then the activation.
#[derive(Module, Debug)]
pub struct ConvBnAct {
    /// `0`
    conv: Conv2d,
    /// `1`
    bn: BatchNorm,
    #[module(skip)]
    act: Activation,
}

impl ConvBnAct {
    /// A `kernel x kernel` convolution with `stride` in `groups` groups.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        act: Activation,
        norm: NormSettings,
        device: &Device,
    ) -> Self {
        Self {
            conv: conv(cin, cout, kernel, stride, groups, false, device),
            bn: BatchNormConfig::new(cout)
                .with_epsilon(norm.epsilon)
                .with_momentum(norm.momentum)
                .init(device),
            act,
        }
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.bn.gamma.dims()[0]
    }

    /// `act(bn(conv(x)))` as ONNX nodes, the BatchNorm folded into the convolution.
    pub fn to_onnx(&self, g: &mut Graph, name: &str, x: Value) -> Result<Value> {
        let y = g.conv(&format!("{name}.0"), &x, &self.conv, Some(&self.bn))?;
        Ok(self.act.to_onnx(g, y))
    }

    /// `act(bn(conv(x)))`.
    pub fn forward(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<4> {
        let y = cx.conv2d(&self.conv, x);
        match self.act {
            Activation::Relu => cx.batch_norm_relu(&self.bn, y, None),
            act => act.apply(cx.batch_norm(&self.bn, y), cx),
        }
    }
}

/// The gate of a squeeze-and-excitation block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `nn.Sigmoid` (EfficientNet).
    Sigmoid,
    /// `nn.Hardsigmoid` (MobileNetV3).
    Hardsigmoid,
}

/// torchvision's `SqueezeExcitation`: average pool, 1x1 conv with bias (`fc1`), activation,
/// 1x1 conv with bias (`fc2`), gate, times the input.
#[derive(Module, Debug)]
pub struct SqueezeExcitation {
    fc1: Conv2d,
    fc2: Conv2d,
    #[module(skip)]
    act: Activation,
    #[module(skip)]
    gate: Gate,
}

impl SqueezeExcitation {
    /// `channels` squeezed to `squeeze` and back.
    pub fn new(
        channels: usize,
        squeeze: usize,
        act: Activation,
        gate: Gate,
        device: &Device,
    ) -> Self {
        Self {
            fc1: conv(channels, squeeze, 1, 1, 1, true, device),
            fc2: conv(squeeze, channels, 1, 1, 1, true, device),
            act,
            gate,
        }
    }

    fn to_onnx(&self, g: &mut Graph, name: &str, x: Value) -> Result<Value> {
        let scale = g.global_avg_pool_4d(&x);
        let scale = g.conv(&format!("{name}.fc1"), &scale, &self.fc1, None)?;
        let scale = self.act.to_onnx(g, scale);
        let scale = g.conv(&format!("{name}.fc2"), &scale, &self.fc2, None)?;
        let scale = match self.gate {
            Gate::Sigmoid => g.sigmoid(&scale),
            Gate::Hardsigmoid => g.hardsigmoid(&scale),
        };
        Ok(g.mul(&scale, &x))
    }

    fn forward(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<4> {
        let [b, c, _, _] = x.dims();
        let scale = cx.global_avg_pool(x.clone()).reshape([b, c, 1, 1]);
        let scale = self.act.apply(cx.conv2d(&self.fc1, scale), cx);
        let scale = cx.conv2d(&self.fc2, scale);
        let scale = match self.gate {
            Gate::Sigmoid => cx.sigmoid(scale),
            Gate::Hardsigmoid => cx.hardsigmoid(scale),
        };
        scale * x
    }
}

/// One layer of an inverted residual block.
#[derive(Module, Debug)]
pub enum Layer {
    /// Expansion, depthwise or projection convolution.
    Conv(ConvBnAct),
    /// Squeeze-and-excitation.
    Se(SqueezeExcitation),
}

/// The shape of one inverted residual block.
#[derive(Debug, Clone, Copy)]
pub struct BlockSettings {
    /// Input channels.
    pub cin: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Expanded (depthwise) channels.
    pub expanded: usize,
    /// Output channels.
    pub cout: usize,
    /// Squeeze-and-excitation width, when the block has one.
    pub squeeze: Option<usize>,
    /// Depthwise stride.
    pub stride: usize,
    /// Activation of the expansion and depthwise convolutions.
    pub act: Activation,
    /// Activation inside squeeze-and-excitation.
    pub se_act: Activation,
    /// Gate of squeeze-and-excitation.
    pub gate: Gate,
    /// Stochastic-depth probability of the residual branch (training only).
    pub drop_path: f64,
}

/// torchvision's `InvertedResidual` (MobileNetV3) and `MBConv` (EfficientNet): 1x1
/// expansion (when it widens), depthwise convolution, squeeze-and-excitation (when present),
/// 1x1 projection; the input is added when the shape allows (stride 1, same width), after
/// stochastic depth.
#[derive(Module, Debug)]
pub struct InvertedResidual {
    block: Vec<Layer>,
    #[module(skip)]
    residual: bool,
    #[module(skip)]
    drop_path: f64,
}

impl InvertedResidual {
    /// The block `s` describes.
    pub fn new(s: BlockSettings, norm: NormSettings, device: &Device) -> Self {
        let mut block = Vec::new();
        if s.expanded != s.cin {
            block.push(Layer::Conv(ConvBnAct::new(
                s.cin, s.expanded, 1, 1, 1, s.act, norm, device,
            )));
        }
        block.push(Layer::Conv(ConvBnAct::new(
            s.expanded, s.expanded, s.kernel, s.stride, s.expanded, s.act, norm, device,
        )));
        if let Some(squeeze) = s.squeeze {
            block.push(Layer::Se(SqueezeExcitation::new(
                s.expanded, squeeze, s.se_act, s.gate, device,
            )));
        }
        block.push(Layer::Conv(ConvBnAct::new(
            s.expanded,
            s.cout,
            1,
            1,
            1,
            Activation::Identity,
            norm,
            device,
        )));
        Self {
            block,
            residual: s.stride == 1 && s.cin == s.cout,
            drop_path: s.drop_path,
        }
    }

    /// The block as ONNX nodes (stochastic depth is the identity in inference).
    pub fn to_onnx(&self, g: &mut Graph, name: &str, x: Value) -> Result<Value> {
        let mut y = x.clone();
        for (j, layer) in self.block.iter().enumerate() {
            let name = format!("{name}.block.{j}");
            y = match layer {
                Layer::Conv(c) => c.to_onnx(g, &name, y)?,
                Layer::Se(se) => se.to_onnx(g, &name, y)?,
            };
        }
        Ok(if self.residual { g.add(&y, &x) } else { y })
    }

    /// The block's output.
    pub fn forward(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<4> {
        let mut y = x.clone();
        for layer in &self.block {
            y = match layer {
                Layer::Conv(c) => c.forward(y, cx),
                Layer::Se(se) => se.forward(y, cx),
            };
        }
        if self.residual {
            cx.stochastic_depth(y, self.drop_path) + x
        } else {
            y
        }
    }
}

/// One entry of a torchvision `features` Sequential.
// A handful per network: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Feature {
    /// A `Conv2dNormActivation` (the stem, the last 1x1 convolution).
    Conv(ConvBnAct),
    /// One inverted residual block (MobileNetV3).
    Block(InvertedResidual),
    /// A stage of blocks (EfficientNet).
    Stage(Vec<InvertedResidual>),
}

impl Feature {
    /// The entry as ONNX nodes (`name` is its path, `features.<i>`).
    pub fn to_onnx(&self, g: &mut Graph, name: &str, x: Value) -> Result<Value> {
        match self {
            Self::Conv(c) => c.to_onnx(g, name, x),
            Self::Block(b) => b.to_onnx(g, name, x),
            Self::Stage(blocks) => blocks
                .iter()
                .enumerate()
                .try_fold(x, |x, (k, b)| b.to_onnx(g, &format!("{name}.{k}"), x)),
        }
    }

    /// The entry's output.
    pub fn forward(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<4> {
        match self {
            Self::Conv(c) => c.forward(x, cx),
            Self::Block(b) => b.forward(x, cx),
            Self::Stage(blocks) => blocks.iter().fold(x, |x, b| b.forward(x, cx)),
        }
    }
}

/// A torchvision `features` Sequential and the global average pool after it as ONNX nodes:
/// the pooled features `[batch, channels]` of `x`.
pub fn pooled_features_to_onnx(features: &[Feature], g: &mut Graph, x: Value) -> Result<Value> {
    let x = features
        .iter()
        .enumerate()
        .try_fold(x, |x, (i, f)| f.to_onnx(g, &format!("features.{i}"), x))?;
    Ok(g.global_avg_pool(&x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The README's worked examples of torchvision's rounding.
    #[test]
    fn channel_rounding_follows_torchvision() {
        assert_eq!(make_divisible(16.0 * 0.5), 8);
        assert_eq!(make_divisible(2.0), 8);
        assert_eq!(make_divisible(40.0 * 0.25), 16);
        assert_eq!(make_divisible(1024.0 * 0.5), 512);
        assert_eq!(make_divisible(120.0 * 0.5), 64);
        assert_eq!(make_divisible(72.0 / 4.0), 24);
    }

    /// A block's depthwise convolution, its 1x1 convolutions and its BatchNorms run on kd's CPU
    /// kernels when training on the flex device (the ops layer picks them; the block does not
    /// name them).
    #[test]
    fn block_layers_take_the_fast_cpu_path() {
        use crate::ops::{conv, norm};
        let ad = Device::flex().autodiff();
        let settings = BlockSettings {
            cin: 8,
            kernel: 5,
            expanded: 16,
            cout: 8,
            squeeze: Some(8),
            stride: 2,
            act: Activation::Hardswish,
            se_act: Activation::Relu,
            gate: Gate::Hardsigmoid,
            drop_path: 0.0,
        };
        let norm_settings = NormSettings {
            epsilon: 0.001,
            momentum: 0.01,
        };
        let block = InvertedResidual::new(settings, norm_settings, &ad);
        let mut depthwise = 0;
        for layer in &block.block {
            let Layer::Conv(c) = layer else { continue };
            let channels = c.conv.weight.dims()[1] * c.conv.groups;
            let x = Tensor::<4>::random([2, channels, 8, 8], Distribution::Default, &ad);
            if c.conv.groups > 1 {
                assert!(conv::depthwise_applies(&c.conv, &x));
                depthwise += 1;
            } else {
                assert!(conv::gemm_applies(&c.conv, &x));
            }
            let y = Tensor::<4>::random([2, c.out_channels(), 4, 4], Distribution::Default, &ad);
            assert!(norm::fused_applies(&c.bn, &y));
        }
        assert_eq!(depthwise, 1);
    }
}
