//! CoAtNet-0..4 (convolution + attention) with the structure of the reference PyTorch
//! implementation that the original tutorial imports as `model.coatnet`: a convolutional
//! stem `s0`, two MBConv stages `s1`, `s2`, two relative-attention Transformer stages `s3`,
//! `s4`, global average pooling and a linear head `fc`.
//!
//! Field names are Burn-style (`s1.0.expand_conv`, `s3.1.attn.to_qkv`, ...); the regex
//! tables of its [`Architecture`] implementation translate them to and from the reference's state-dict keys
//! (`s1.0.conv.fn.0`, `s3.1.attn.1.fn.to_qkv`, ...).

use anyhow::{Result, bail};
use burn::module::{Module, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
    PaddingConfig2d,
};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::onnx::{Graph, Value, floats};
use super::{Architecture, ModelSpec, Remap};
use crate::ops::Ctx;

/// Image sides must be multiples of this (five stride-2 stages).
pub const SIZE_MULTIPLE: usize = 32;

/// Shape of a CoAtNet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoAtNetConfig {
    /// Blocks in stages s0..s4.
    pub num_blocks: [usize; 5],
    /// Output channels of stages s0..s4.
    pub channels: [usize; 5],
    /// Input image (height, width); both multiples of 32. The relative-position tables
    /// of the attention stages depend on it.
    pub image_size: (usize, usize),
    /// Output classes.
    pub num_classes: usize,
    /// Whether `fc` has a bias: the tutorial's replacement head does, the reference's
    /// 1000-class head does not.
    pub head_bias: bool,
    /// Attention heads (8 in the reference).
    pub heads: usize,
    /// Width of each head (32 in the reference); the attention's inner width is
    /// `heads * dim_head` whatever the stage width.
    pub dim_head: usize,
}

impl CoAtNetConfig {
    fn reference(num_blocks: [usize; 5], channels: [usize; 5]) -> Self {
        Self {
            num_blocks,
            channels,
            image_size: (224, 224),
            num_classes: 1000,
            head_bias: false,
            heads: 8,
            dim_head: 32,
        }
    }

    /// The reference `coatnet_0()`: 224x224, 1000 classes, head without bias.
    pub fn coatnet_0() -> Self {
        Self::reference([2, 2, 3, 5, 2], [64, 96, 192, 384, 768])
    }

    /// The reference `coatnet_1()`.
    pub fn coatnet_1() -> Self {
        Self::reference([2, 2, 6, 14, 2], [64, 96, 192, 384, 768])
    }

    /// The reference `coatnet_2()` (its last stage really has 1026 channels).
    pub fn coatnet_2() -> Self {
        Self::reference([2, 2, 6, 14, 2], [128, 128, 256, 512, 1026])
    }

    /// The reference `coatnet_3()`.
    pub fn coatnet_3() -> Self {
        Self::reference([2, 2, 6, 14, 2], [192, 192, 384, 768, 1536])
    }

    /// The reference `coatnet_4()`.
    pub fn coatnet_4() -> Self {
        Self::reference([2, 2, 12, 28, 2], [192, 192, 384, 768, 1536])
    }

    /// `coatnet_<variant>()` for variant 0..=4.
    pub fn variant(variant: usize) -> Option<Self> {
        Some(match variant {
            0 => Self::coatnet_0(),
            1 => Self::coatnet_1(),
            2 => Self::coatnet_2(),
            3 => Self::coatnet_3(),
            4 => Self::coatnet_4(),
            _ => return None,
        })
    }

    /// Replaces the head, as the tutorial does (`model.fc = nn.Linear(c, n)` has a bias).
    pub fn with_head(mut self, num_classes: usize, bias: bool) -> Self {
        self.num_classes = num_classes;
        self.head_bias = bias;
        self
    }

    /// Sets the input image size `(height, width)`.
    pub fn with_image_size(mut self, height: usize, width: usize) -> Self {
        self.image_size = (height, width);
        self
    }

    /// Checks the shape: image sides multiples of 32, no empty stage or zero width.
    pub fn validate(&self) -> Result<()> {
        let (h, w) = self.image_size;
        let sides: &[(&str, usize)] = if h == w {
            &[("image size", h)]
        } else {
            &[("image height", h), ("image width", w)]
        };
        for &(what, side) in sides {
            check_side(what, side)?;
        }
        if let Some(s) = self.num_blocks.iter().position(|&n| n == 0) {
            bail!("CoAtNet stage s{s} has no block: use at least 1");
        }
        if self.channels.contains(&0) || self.heads == 0 || self.dim_head == 0 {
            bail!("CoAtNet channels, heads and dim_head must be at least 1");
        }
        if self.num_classes == 0 {
            bail!("a classifier needs at least 1 class");
        }
        Ok(())
    }

    /// Feature-map size `(h, w)` of stage `s<stage>`: the image divided by `2^(stage+1)`.
    pub fn stage_size(&self, stage: usize) -> (usize, usize) {
        let f = 1 << (stage + 1);
        (self.image_size.0 / f, self.image_size.1 / f)
    }

    /// Builds the network with PyTorch's default initialisation (relative-position bias
    /// tables start at zero, as in the reference).
    ///
    /// # Panics
    /// If the configuration is invalid (see [`Self::validate`]); use [`Self::try_init`]
    /// for an error instead.
    pub fn init(&self, device: &Device) -> CoAtNet {
        self.try_init(device).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Builds the network, or says why the configuration is invalid.
    pub fn try_init(&self, device: &Device) -> Result<CoAtNet> {
        self.validate()?;
        let c = self.channels;
        let n = self.num_blocks;
        let mut s0 = Vec::new();
        for i in 0..n[0] {
            let (cin, stride) = if i == 0 { (3, 2) } else { (c[0], 1) };
            s0.push(ConvBn::new(cin, c[0], stride, device));
        }
        let mbconv_stage = |k: usize| -> Vec<MbConv> {
            (0..n[k])
                .map(|i| {
                    let cin = if i == 0 { c[k - 1] } else { c[k] };
                    MbConv::new(cin, c[k], i == 0, device)
                })
                .collect()
        };
        let attn_stage = |k: usize| -> Vec<TransformerBlock> {
            (0..n[k])
                .map(|i| {
                    let cin = if i == 0 { c[k - 1] } else { c[k] };
                    TransformerBlock::new(cin, c[k], self.stage_size(k), i == 0, self, device)
                })
                .collect()
        };
        Ok(CoAtNet {
            s0,
            s1: mbconv_stage(1),
            s2: mbconv_stage(2),
            s3: attn_stage(3),
            s4: attn_stage(4),
            fc: LinearConfig::new(c[4], self.num_classes)
                .with_bias(self.head_bias)
                .init(device),
        })
    }
}

fn check_side(what: &str, side: usize) -> Result<()> {
    if side == 0 || !side.is_multiple_of(SIZE_MULTIPLE) {
        let below = side / SIZE_MULTIPLE * SIZE_MULTIPLE;
        let above = below + SIZE_MULTIPLE;
        if below == 0 {
            bail!("{what} {side} is not a multiple of {SIZE_MULTIPLE}: use {above}");
        }
        bail!("{what} {side} is not a multiple of {SIZE_MULTIPLE}: use {below} or {above}");
    }
    Ok(())
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
    device: &Device,
) -> Conv2d {
    let pad = k / 2;
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_groups(groups)
        .with_bias(false)
        .init(device)
}

fn max_pool() -> MaxPool2d {
    MaxPool2dConfig::new([3, 3])
        .with_strides([2, 2])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init()
}

fn linear(cin: usize, cout: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(cin, cout).with_bias(bias).init(device)
}

/// `[b, c, h, w]` -> `[b, h*w, c]` (the reference's `b c ih iw -> b (ih iw) c`).
fn to_tokens(x: Tensor<4>) -> Tensor<3> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h * w]).swap_dims(1, 2)
}

/// `[b, h*w, c]` -> `[b, c, h, w]`.
fn to_map(x: Tensor<3>, h: usize, w: usize) -> Tensor<4> {
    let [b, _, c] = x.dims();
    x.swap_dims(1, 2).reshape([b, c, h, w])
}

/// Stem block: 3x3 conv (no bias) + BatchNorm + GELU; reference `s0.<i>.0` / `s0.<i>.1`.
#[derive(Module, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(cin: usize, cout: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv: conv(cin, cout, 3, stride, 1, device),
            bn: BatchNormConfig::new(cout).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<4> {
        cx.gelu(cx.batch_norm(&self.bn, cx.conv2d(&self.conv, x)))
    }

    fn to_onnx(&self, g: &mut Graph, name: &str, x: Value) -> Result<Value> {
        let y = g.conv(&format!("{name}.0"), &x, &self.conv, Some(&self.bn))?;
        Ok(g.gelu(&y))
    }
}

/// Squeeze-and-excitation without biases; reference `conv.fn.6.fc.0` / `fc.2`.
#[derive(Module, Debug)]
pub struct SqueezeExcite {
    reduce: Linear,
    expand: Linear,
}

impl SqueezeExcite {
    fn to_onnx(&self, g: &mut Graph, name: &str, x: Value) -> Result<Value> {
        let y = g.global_avg_pool(&x);
        let y = g.linear(&format!("{name}.fc.0"), &y, &self.reduce, 2)?;
        let y = g.gelu(&y);
        let y = g.linear(&format!("{name}.fc.2"), &y, &self.expand, 2)?;
        let y = g.sigmoid(&y);
        let y = g.reshape(&y, &[0, 0, 1, 1]);
        Ok(g.mul(&x, &y))
    }

    fn forward(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<4> {
        let [b, c, _, _] = x.dims();
        let y = cx.global_avg_pool(x.clone());
        let y = sigmoid(self.expand.forward(cx.gelu(self.reduce.forward(y))));
        x * y.reshape([b, c, 1, 1])
    }
}

/// MBConv block with BatchNorm pre-norm (stages s1, s2).
#[derive(Module, Debug)]
pub struct MbConv {
    /// Shortcut of a downsampling block: max pool then this 1x1 conv (`proj`).
    proj: Option<Conv2d>,
    pool: Option<MaxPool2d>,
    /// `conv.norm`
    pre_norm: BatchNorm,
    /// `conv.fn.0`, 1x1, carries the stride when downsampling.
    expand_conv: Conv2d,
    /// `conv.fn.1`
    expand_bn: BatchNorm,
    /// `conv.fn.3`, depthwise 3x3.
    dw_conv: Conv2d,
    /// `conv.fn.4`
    dw_bn: BatchNorm,
    /// `conv.fn.6`
    se: SqueezeExcite,
    /// `conv.fn.7`, 1x1.
    project_conv: Conv2d,
    /// `conv.fn.8`
    project_bn: BatchNorm,
}

impl MbConv {
    fn new(cin: usize, cout: usize, downsample: bool, device: &Device) -> Self {
        let hidden = cin * 4;
        let stride = if downsample { 2 } else { 1 };
        let se_hidden = cin / 4; // int(0.25 * inp)
        Self {
            proj: downsample.then(|| conv(cin, cout, 1, 1, 1, device)),
            pool: downsample.then(max_pool),
            pre_norm: BatchNormConfig::new(cin).init(device),
            expand_conv: conv(cin, hidden, 1, stride, 1, device),
            expand_bn: BatchNormConfig::new(hidden).init(device),
            dw_conv: conv(hidden, hidden, 3, 1, hidden, device),
            dw_bn: BatchNormConfig::new(hidden).init(device),
            se: SqueezeExcite {
                reduce: linear(hidden, se_hidden, false, device),
                expand: linear(se_hidden, hidden, false, device),
            },
            project_conv: conv(hidden, cout, 1, 1, 1, device),
            project_bn: BatchNormConfig::new(cout).init(device),
        }
    }

    fn to_onnx(&self, g: &mut Graph, name: &str, x: Value) -> Result<Value> {
        let shortcut = match (&self.pool, &self.proj) {
            (Some(pool), Some(proj)) => {
                let pooled = g.max_pool(&x, pool)?;
                g.conv(&format!("{name}.proj"), &pooled, proj, None)?
            }
            _ => x.clone(),
        };
        let f = format!("{name}.conv.fn");
        let y = g.batch_norm(&format!("{name}.conv.norm"), &x, &self.pre_norm)?;
        let y = g.conv(&format!("{f}.0"), &y, &self.expand_conv, Some(&self.expand_bn))?;
        let y = g.gelu(&y);
        let y = g.conv(&format!("{f}.3"), &y, &self.dw_conv, Some(&self.dw_bn))?;
        let y = g.gelu(&y);
        let y = self.se.to_onnx(g, &format!("{f}.6"), y)?;
        let y = g.conv(&format!("{f}.7"), &y, &self.project_conv, Some(&self.project_bn))?;
        Ok(g.add(&shortcut, &y))
    }

    fn forward(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<4> {
        let shortcut = match (&self.pool, &self.proj) {
            (Some(pool), Some(proj)) => cx.conv2d(proj, cx.max_pool2d(pool, x.clone())),
            _ => x.clone(),
        };
        let y = cx.batch_norm(&self.pre_norm, x);
        let y = cx.gelu(cx.batch_norm(&self.expand_bn, cx.conv2d(&self.expand_conv, y)));
        let y = cx.gelu(cx.batch_norm(&self.dw_bn, cx.conv2d(&self.dw_conv, y)));
        let y = self.se.forward(y, cx);
        let y = cx.batch_norm(&self.project_bn, cx.conv2d(&self.project_conv, y));
        shortcut + y
    }
}

/// Multi-head self-attention with a learned relative-position bias; reference `attn.1.fn`.
#[derive(Module, Debug)]
pub struct Attention {
    /// `[(2h-1)(2w-1), heads]`
    relative_bias_table: Param<Tensor<2>>,
    /// The reference's int64 buffer `[(h*w)^2, 1]`: for query `a` and key `b` (row-major
    /// positions), the row of `relative_bias_table` for their offset. Derived from the
    /// map size; kept (and saved) so exports carry every key of the reference.
    relative_index: Param<Tensor<2, Int>>,
    to_qkv: Linear,
    /// `to_out.0`
    to_out: Linear,
    heads: usize,
    dim_head: usize,
}

/// The reference's `relative_index` for an `h x w` map, flattened:
/// entry `a*(h*w) + b` is `(ia - ib + h - 1) * (2w - 1) + (ja - jb + w - 1)`.
pub fn relative_index(h: usize, w: usize) -> Vec<i64> {
    let n = h * w;
    let mut out = Vec::with_capacity(n * n);
    for a in 0..n {
        let (ia, ja) = ((a / w) as i64, (a % w) as i64);
        for b in 0..n {
            let (ib, jb) = ((b / w) as i64, (b % w) as i64);
            out.push((ia - ib + h as i64 - 1) * (2 * w as i64 - 1) + (ja - jb + w as i64 - 1));
        }
    }
    out
}

impl Attention {
    fn new(
        cin: usize,
        cout: usize,
        (h, w): (usize, usize),
        cfg: &CoAtNetConfig,
        device: &Device,
    ) -> Self {
        let inner = cfg.heads * cfg.dim_head;
        let n = h * w;
        // Made when first used: n² entries (34 GB for a 4096x4096 image's third stage) that
        // counting the parameters must not allocate.
        let index = Param::uninitialized(
            ParamId::new(),
            move |device: &Device, _| {
                Tensor::<2, Int>::from_data(
                    TensorData::new(relative_index(h, w), [n * n, 1]),
                    (device, DType::I64),
                )
            },
            device.clone(),
            false,
            [n * n, 1].into(),
        );
        Self {
            relative_bias_table: Initializer::Zeros
                .init([(2 * h - 1) * (2 * w - 1), cfg.heads], device),
            relative_index: index,
            to_qkv: linear(cin, inner * 3, false, device),
            to_out: linear(inner, cout, true, device),
            heads: cfg.heads,
            dim_head: cfg.dim_head,
        }
    }

    /// The relative-position bias of every query-key pair of `n` positions,
    /// `[heads, n, n]`.
    fn bias(&self, n: usize) -> Tensor<3> {
        let index = self.relative_index.val().reshape([n * n]);
        self.relative_bias_table
            .val()
            .select(0, index)
            .reshape([n, n, self.heads])
            .permute([2, 0, 1])
    }

    /// `[b, n, cin]` -> `[b, n, cout]` as ONNX nodes; the relative-position bias, which
    /// depends on the weights only, is one constant `[1, heads, n, n]`.
    fn to_onnx(&self, g: &mut Graph, name: &str, x: Value) -> Result<Value> {
        let (heads, d) = (self.heads, self.dim_head);
        let n = self.relative_index.lazy_shape().num_elements().isqrt();
        let qkv = g.linear(&format!("{name}.to_qkv"), &x, &self.to_qkv, 3)?;
        // [b, n, 3·heads·d] -> [3, b, heads, n, d]
        let qkv = g.reshape(&qkv, &[0, 0, 3, heads as i64, d as i64]);
        let qkv = g.transpose(&qkv, &[2, 0, 3, 1, 4]);
        let (q, k, v) = (g.gather(&qkv, 0, 0), g.gather(&qkv, 0, 1), g.gather(&qkv, 0, 2));
        let kt = g.transpose(&k, &[0, 1, 3, 2]);
        let dots = g.matmul(&q, &kt);
        let scale = g.scalar((d as f64).powf(-0.5) as f32);
        let dots = g.mul(&dots, &scale);
        let bias = g.constant(
            &format!("{name}.relative_bias"),
            &[1, heads, n, n],
            &floats(self.bias(n))?,
        );
        let dots = g.add(&dots, &bias);
        let attn = g.softmax(&dots, -1);
        let out = g.matmul(&attn, &v);
        let out = g.transpose(&out, &[0, 2, 1, 3]);
        let out = g.reshape(&out, &[0, 0, (heads * d) as i64]);
        g.linear(&format!("{name}.to_out.0"), &out, &self.to_out, 3)
    }

    /// `[b, n, cin]` -> `[b, n, cout]`.
    fn forward(&self, x: Tensor<3>, cx: &Ctx) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let (heads, d) = (self.heads, self.dim_head);
        let split = |t: Tensor<3>| t.reshape([b, n, heads, d]).swap_dims(1, 2);
        let mut qkv = cx
            .linear(&self.to_qkv, x)
            .chunk(3, 2)
            .into_iter()
            .map(split);
        let (q, k, v) = (
            qkv.next().expect("q"),
            qkv.next().expect("k"),
            qkv.next().expect("v"),
        );
        let dots = cx.matmul(q, k.swap_dims(2, 3)) * (d as f64).powf(-0.5);
        let bias = self.bias(n).unsqueeze_dim::<4>(0);
        let attn = softmax(dots + bias, 3);
        let out = cx
            .matmul(attn, v)
            .swap_dims(1, 2)
            .reshape([b, n, heads * d]);
        cx.linear(&self.to_out, out)
    }
}

/// Feed-forward `Linear + GELU + Linear`; reference `ff.1.fn.net.0` / `net.3`.
#[derive(Module, Debug)]
pub struct FeedForward {
    fc1: Linear,
    fc2: Linear,
}

/// Transformer block with LayerNorm pre-norm (stages s3, s4).
#[derive(Module, Debug)]
pub struct TransformerBlock {
    /// Shortcut of a downsampling block: max pool then this 1x1 conv (`proj`).
    proj: Option<Conv2d>,
    /// Max pool of a downsampling block (the reference has two identical ones).
    pool: Option<MaxPool2d>,
    /// `attn.1.norm`
    attn_norm: LayerNorm,
    /// `attn.1.fn`
    attn: Attention,
    /// `ff.1.norm`
    ff_norm: LayerNorm,
    /// `ff.1.fn`
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(
        cin: usize,
        cout: usize,
        size: (usize, usize),
        downsample: bool,
        cfg: &CoAtNetConfig,
        device: &Device,
    ) -> Self {
        let hidden = cin * 4;
        Self {
            proj: downsample.then(|| conv(cin, cout, 1, 1, 1, device)),
            pool: downsample.then(max_pool),
            attn_norm: LayerNormConfig::new(cin).init(device),
            attn: Attention::new(cin, cout, size, cfg, device),
            ff_norm: LayerNormConfig::new(cout).init(device),
            ff: FeedForward {
                fc1: linear(cout, hidden, true, device),
                fc2: linear(hidden, cout, true, device),
            },
        }
    }

    /// The block as ONNX nodes on maps of side `side` (after its pooling).
    fn to_onnx(&self, g: &mut Graph, name: &str, x: Value, side: usize) -> Result<Value> {
        let (shortcut, x) = match (&self.pool, &self.proj) {
            (Some(pool), Some(proj)) => {
                let pooled = g.max_pool(&x, pool)?;
                (g.conv(&format!("{name}.proj"), &pooled, proj, None)?, pooled)
            }
            _ => (x.clone(), x),
        };
        let tokens = |g: &mut Graph, x: &str| {
            let flat = g.reshape(x, &[0, 0, -1]);
            g.transpose(&flat, &[0, 2, 1])
        };
        let map = |g: &mut Graph, t: &str| {
            let t = g.transpose(t, &[0, 2, 1]);
            g.reshape(&t, &[0, 0, side as i64, side as i64])
        };
        // The map's tokens, layer-normed by `norm` (built with LayerNormConfig's epsilon).
        let normed = |g: &mut Graph, x: &str, part: &str, norm: &LayerNorm| {
            let t = tokens(g, x);
            let epsilon = LayerNormConfig::new(norm.gamma.dims()[0]).epsilon;
            g.layer_norm(&format!("{name}.{part}.1.norm"), &t, norm, epsilon)
        };
        let t = normed(g, &x, "attn", &self.attn_norm)?;
        let attn = self.attn.to_onnx(g, &format!("{name}.attn.1.fn"), t)?;
        let attn = map(g, &attn);
        let x = g.add(&shortcut, &attn);
        let t = normed(g, &x, "ff", &self.ff_norm)?;
        let t = g.linear(&format!("{name}.ff.1.fn.net.0"), &t, &self.ff.fc1, 3)?;
        let t = g.gelu(&t);
        let t = g.linear(&format!("{name}.ff.1.fn.net.3"), &t, &self.ff.fc2, 3)?;
        let y = map(g, &t);
        Ok(g.add(&x, &y))
    }

    fn forward(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<4> {
        let (shortcut, x) = match (&self.pool, &self.proj) {
            (Some(pool), Some(proj)) => {
                let pooled = cx.max_pool2d(pool, x);
                (cx.conv2d(proj, pooled.clone()), pooled)
            }
            _ => (x.clone(), x),
        };
        let [_, _, h, w] = x.dims();
        let attn = self.attn.forward(self.attn_norm.forward(to_tokens(x)), cx);
        let x = shortcut + to_map(attn, h, w);
        let y = self.ff_norm.forward(to_tokens(x.clone()));
        let y = cx.linear(&self.ff.fc2, cx.gelu(cx.linear(&self.ff.fc1, y)));
        x + to_map(y, h, w)
    }
}

/// Reference-compatible CoAtNet.
#[derive(Module, Debug)]
pub struct CoAtNet {
    s0: Vec<ConvBn>,
    s1: Vec<MbConv>,
    s2: Vec<MbConv>,
    s3: Vec<TransformerBlock>,
    s4: Vec<TransformerBlock>,
    fc: Linear,
}

/// The variant number of a `coatnet_<n>` name.
fn variant(name: &str) -> Result<usize> {
    name.strip_prefix("coatnet_")
        .and_then(|n| n.parse().ok())
        .filter(|&n| n <= 4)
        .ok_or_else(|| anyhow::anyhow!("{name} is not a CoAtNet"))
}

/// The CoAtNet a spec builds for `num_classes` classes and square images of side
/// `image_size`: the reference variant with the tutorial's head (with bias) and the width
/// override applied. The size is not checked here.
pub fn config(spec: &ModelSpec, num_classes: usize, image_size: usize) -> Result<CoAtNetConfig> {
    let mut cfg = CoAtNetConfig::variant(variant(&spec.name)?)
        .expect("known variant")
        .with_head(num_classes, true)
        .with_image_size(image_size, image_size);
    if let Some(w) = spec.width {
        cfg.channels = [w, w, 2 * w, 4 * w, 8 * w];
    }
    Ok(cfg)
}

impl Architecture for CoAtNet {
    const NAMES: &'static [&'static str] = &[
        "coatnet_0",
        "coatnet_1",
        "coatnet_2",
        "coatnet_3",
        "coatnet_4",
    ];
    const DESCRIPTION: &'static str = "teacher (CoAtNet; image size a multiple of 32)";
    /// The reference's numbered Sequentials and `PreNorm` wrappers.
    const FROM_TORCH: &'static [Remap] = &[
        // conv_3x3_bn: Sequential(conv, bn, gelu)
        (r"^s0\.(\d+)\.0\.", "s0.${1}.conv."),
        (r"^s0\.(\d+)\.1\.", "s0.${1}.bn."),
        // MBConv: PreNorm(BatchNorm, Sequential(...))
        (r"\.conv\.norm\.", ".pre_norm."),
        (r"\.conv\.fn\.0\.", ".expand_conv."),
        (r"\.conv\.fn\.1\.", ".expand_bn."),
        (r"\.conv\.fn\.3\.", ".dw_conv."),
        (r"\.conv\.fn\.4\.", ".dw_bn."),
        (r"\.conv\.fn\.6\.fc\.0\.", ".se.reduce."),
        (r"\.conv\.fn\.6\.fc\.2\.", ".se.expand."),
        (r"\.conv\.fn\.7\.", ".project_conv."),
        (r"\.conv\.fn\.8\.", ".project_bn."),
        // Transformer: Sequential(Rearrange, PreNorm(LayerNorm, fn), Rearrange)
        (r"\.attn\.1\.norm\.", ".attn_norm."),
        (r"\.attn\.1\.fn\.to_out\.0\.", ".attn.to_out."),
        (r"\.attn\.1\.fn\.", ".attn."),
        (r"\.ff\.1\.norm\.", ".ff_norm."),
        (r"\.ff\.1\.fn\.net\.0\.", ".ff.fc1."),
        (r"\.ff\.1\.fn\.net\.3\.", ".ff.fc2."),
    ];
    const TO_TORCH: &'static [Remap] = &[
        (r"^s0\.(\d+)\.conv\.", "s0.${1}.0."),
        (r"^s0\.(\d+)\.bn\.", "s0.${1}.1."),
        (r"\.pre_norm\.", ".conv.norm."),
        (r"\.expand_conv\.", ".conv.fn.0."),
        (r"\.expand_bn\.", ".conv.fn.1."),
        (r"\.dw_conv\.", ".conv.fn.3."),
        (r"\.dw_bn\.", ".conv.fn.4."),
        (r"\.se\.reduce\.", ".conv.fn.6.fc.0."),
        (r"\.se\.expand\.", ".conv.fn.6.fc.2."),
        (r"\.project_conv\.", ".conv.fn.7."),
        (r"\.project_bn\.", ".conv.fn.8."),
        (r"\.attn_norm\.", ".attn.1.norm."),
        (r"\.attn\.to_out\.", ".attn.1.fn.to_out.0."),
        (
            r"\.attn\.(to_qkv|relative_bias_table|relative_index)",
            ".attn.1.fn.${1}",
        ),
        (r"\.ff_norm\.", ".ff.1.norm."),
        (r"\.ff\.fc1\.", ".ff.1.fn.net.0."),
        (r"\.ff\.fc2\.", ".ff.1.fn.net.3."),
    ];
    const HEAD: &'static str = "fc.";
    const SIZE_DEPENDENT: bool = true;

    fn validate(spec: &ModelSpec, image_size: usize) -> Result<()> {
        spec.refuse_stem()?;
        config(spec, 2, image_size)?.validate()
    }

    fn build(
        spec: &ModelSpec,
        num_classes: usize,
        image_size: usize,
        device: &Device,
    ) -> Result<Self> {
        config(spec, num_classes, image_size)?.try_init(device)
    }

    fn forward_features(&self, x: Tensor<4>, cx: &Ctx) -> Tensor<2> {
        let mut x = x;
        for block in &self.s0 {
            x = block.forward(x, cx);
        }
        for block in self.s1.iter().chain(&self.s2) {
            x = block.forward(x, cx);
        }
        for block in self.s3.iter().chain(&self.s4) {
            x = block.forward(x, cx);
        }
        cx.global_avg_pool(x)
    }

    fn forward_head(&self, features: Tensor<2>, _: &Ctx) -> Tensor<2> {
        self.fc.forward(features)
    }

    fn num_features(&self) -> usize {
        self.fc.weight.dims()[0]
    }

    fn to_onnx(&self, g: &mut Graph, x: Value, image_size: usize) -> Result<Value> {
        // Every stride-2 step (a stride-2 convolution or a padded 3x3 max pool) halves the
        // side, rounding up.
        let halve = |side: usize| side.div_ceil(2);
        let (mut x, mut side) = (x, image_size);
        for (i, block) in self.s0.iter().enumerate() {
            x = block.to_onnx(g, &format!("s0.{i}"), x)?;
            side = side.div_ceil(block.conv.stride[0]);
        }
        for (s, blocks) in [(1, &self.s1), (2, &self.s2)] {
            for (i, block) in blocks.iter().enumerate() {
                x = block.to_onnx(g, &format!("s{s}.{i}"), x)?;
                if block.pool.is_some() {
                    side = halve(side);
                }
            }
        }
        for (s, blocks) in [(3, &self.s3), (4, &self.s4)] {
            for (i, block) in blocks.iter().enumerate() {
                if block.pool.is_some() {
                    side = halve(side);
                }
                x = block.to_onnx(g, &format!("s{s}.{i}"), x, side)?;
            }
        }
        let features = g.global_avg_pool(&x);
        g.linear("fc", &features, &self.fc, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_index_matches_reference_layout() {
        // 2x3 map: position a = i*3 + j.
        let idx = relative_index(2, 3);
        assert_eq!(idx.len(), 36);
        // Same position: centre of the (3 x 5) table.
        assert_eq!(idx[0], 5 + 2);
        // a = (0,0), b = (1,2): offset (-1, -2) -> (0, 0).
        assert_eq!(idx[5], 0);
        // a = (1,2), b = (0,0): offset (1, 2) -> (2, 4).
        assert_eq!(idx[5 * 6], 2 * 5 + 4);
    }

    #[test]
    fn sizes_must_be_multiples_of_32() {
        let cfg = CoAtNetConfig::coatnet_0().with_image_size(100, 100);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("image size 100") && err.contains("use 96 or 128"),
            "{err}"
        );
        let err = cfg
            .with_image_size(96, 20)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("image width 20") && err.contains("use 32"),
            "{err}"
        );
        assert!(
            CoAtNetConfig::coatnet_0()
                .with_image_size(64, 96)
                .validate()
                .is_ok()
        );
    }
}
