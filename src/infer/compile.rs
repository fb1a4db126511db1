//! From a network's ONNX graph (the one `kd export` writes, BatchNorm already folded into
//! the convolutions) to the inference plan's steps: each node lowered to an NHWC kernel,
//! a convolution fused with the residual addition and the activation that follow it, and
//! every value given a buffer that later values reuse once it is dead.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{AttributeProto, NodeProto, TensorProto};

use super::conv::Conv;
use super::depthwise::Depthwise;
use super::pointwise::Act;
use super::pool::MaxPool;
use super::window::Window;
use crate::models::onnx::Graph;

/// What a step computes.
#[derive(Debug, Clone)]
pub enum Op {
    /// A convolution or linear layer; a second input is its fused residual.
    Conv(Conv),
    /// A depthwise convolution.
    Depthwise(Depthwise),
    /// Max pooling.
    MaxPool(MaxPool),
    /// The mean over the pixels.
    GlobalAvgPool,
    /// An activation on its own.
    Act(Act),
    /// `act(a + b)`.
    Add(Act),
    /// `x · scale` with `scale` one value per channel (squeeze-and-excitation).
    ScaleChannels,
}

/// One step: `op` on the buffers `inputs`, written to `output`.
#[derive(Debug, Clone)]
pub struct Step {
    /// What it computes.
    pub op: Op,
    /// Buffers read.
    pub inputs: Vec<usize>,
    /// Buffer written (never one of `inputs`).
    pub output: usize,
    /// `[h, w, c]` of the first input, per image.
    pub input_shape: [usize; 3],
    /// `[h, w, c]` of the output, per image.
    pub output_shape: [usize; 3],
}

impl Step {
    /// What the step computes, for a profile: e.g. `conv 3x3/2 3->16 224x224->112x112
    /// hardswish`.
    pub fn describe(&self) -> String {
        let [ih, iw, ic] = self.input_shape;
        let [oh, ow, oc] = self.output_shape;
        let window = |w: &Window| {
            let ([kh, kw], [sh, sw]) = (w.kernel, w.stride);
            let stride = if sh == sw {
                sh.to_string()
            } else {
                format!("{sh}x{sw}")
            };
            format!("{kh}x{kw}/{stride}")
        };
        let act = |act: &Act| match act {
            Act::Identity => String::new(),
            Act::Hardsigmoid { .. } => " hardsigmoid".into(),
            a => format!(" {a:?}").to_lowercase(),
        };
        let sizes = format!("{ih}x{iw}->{oh}x{ow}");
        match &self.op {
            Op::Conv(c) => {
                let residual = if self.inputs.len() > 1 {
                    " +residual"
                } else {
                    ""
                };
                let what = if [ih, iw] == [1, 1] && c.window.kernel == [1, 1] {
                    "linear".to_string()
                } else {
                    format!("conv {}", window(&c.window))
                };
                format!("{what} {ic}->{oc} {sizes}{residual}{}", act(&c.act))
            }
            Op::Depthwise(d) => format!(
                "depthwise {} {ic} {sizes}{}",
                window(&d.window),
                act(&d.act)
            ),
            Op::MaxPool(p) => format!("max pool {} {ic} {sizes}", window(&p.window)),
            Op::GlobalAvgPool => format!("global average pool {ic} {sizes}"),
            Op::Act(a) => format!("{} {ic} {sizes}", act(a).trim()),
            Op::Add(a) => format!("add {ic} {sizes}{}", act(a)),
            Op::ScaleChannels => format!("scale channels {ic} {sizes}"),
        }
    }
}

/// The steps of a network, with the buffers they use.
#[derive(Debug, Clone)]
pub struct Program {
    /// In order.
    pub steps: Vec<Step>,
    /// How many buffers the steps use.
    pub buffers: usize,
    /// Buffer of the input images (NHWC).
    pub input: usize,
    /// Buffer of the logits.
    pub output: usize,
    /// `[h, w, c]` of the input, per image.
    pub input_shape: [usize; 3],
    /// Logits per image.
    pub classes: usize,
    /// Bytes of the weights.
    pub weight_bytes: usize,
}

/// A step over values (before buffers are assigned).
struct Lowered {
    op: Op,
    inputs: Vec<usize>,
    output: usize,
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn ints(node: &NodeProto, name: &str) -> Result<Option<Vec<usize>>> {
    let Some(a) = attr(node, name) else {
        return Ok(None);
    };
    a.ints
        .iter()
        .map(|&v| usize::try_from(v).map_err(|_| anyhow::anyhow!("{name} {:?}", a.ints)))
        .collect::<Result<_>>()
        .map(Some)
}

fn pair(node: &NodeProto, name: &str, default: usize) -> Result<[usize; 2]> {
    match ints(node, name)? {
        None => Ok([default; 2]),
        Some(v) if v.len() == 2 && v.iter().all(|&d| d > 0) => Ok([v[0], v[1]]),
        Some(v) => bail!("{name} {v:?} is not 2-D and positive"),
    }
}

fn pads(node: &NodeProto) -> Result<[usize; 4]> {
    if attr(node, "auto_pad").is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET") {
        bail!("auto_pad is not supported");
    }
    match ints(node, "pads")? {
        None => Ok([0; 4]),
        Some(v) if v.len() == 4 => Ok([v[0], v[1], v[2], v[3]]),
        Some(v) => bail!("pads {v:?} are not 2-D"),
    }
}

/// A window over an input of `h` × `w`, checked to fit it.
fn window(
    kernel: [usize; 2],
    stride: [usize; 2],
    pads: [usize; 4],
    [h, w]: [usize; 2],
) -> Result<Window> {
    let [t, l, b, r] = pads;
    if kernel[0] > h + t + b || kernel[1] > w + l + r {
        bail!("a {kernel:?} kernel does not fit a {h}x{w} input padded by {pads:?}");
    }
    Ok(Window {
        kernel,
        stride,
        pads,
    })
}

/// The float values and dimensions of an initializer.
fn floats(t: &TensorProto) -> Result<(Vec<usize>, Vec<f32>)> {
    if t.data_type != DataType::Float as i32 || (t.raw_data.is_empty() && !t.float_data.is_empty())
    {
        bail!("{} is not a float tensor in raw data", t.name);
    }
    let values = t
        .raw_data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((t.dims.iter().map(|&d| d as usize).collect(), values))
}

/// The activation node `node` applies to `x`, if it is one.
fn activation(node: &NodeProto, x: &str) -> Option<Act> {
    if node.input.first().map(String::as_str) != Some(x) {
        return None;
    }
    let float = |name: &str, default: f32| attr(node, name).map_or(default, |a| a.f);
    match node.op_type.as_str() {
        "Relu" => Some(Act::Relu),
        "HardSwish" => Some(Act::Hardswish),
        "HardSigmoid" => Some(Act::Hardsigmoid {
            alpha: float("alpha", 0.2),
            beta: float("beta", 0.5),
        }),
        "Sigmoid" => Some(Act::Sigmoid),
        _ => None,
    }
}

struct Lowering<'g> {
    nodes: &'g [NodeProto],
    weights: HashMap<&'g str, &'g TensorProto>,
    /// Readers of each value (nodes, and the graph output).
    uses: HashMap<&'g str, usize>,
    /// Value id of each name.
    values: HashMap<String, usize>,
    /// `[h, w, c]` of each value id, per image.
    shapes: Vec<[usize; 3]>,
    steps: Vec<Lowered>,
}

impl<'g> Lowering<'g> {
    fn value(&self, name: &str) -> Result<usize> {
        if self.weights.contains_key(name) {
            bail!("{name} is a constant where the plan takes a computed value");
        }
        self.values
            .get(name)
            .copied()
            .with_context(|| format!("the graph reads {name} before it is computed"))
    }

    fn weight(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        floats(
            self.weights
                .get(name)
                .with_context(|| format!("{name} is not a constant"))?,
        )
    }

    fn uses(&self, name: &str) -> usize {
        self.uses.get(name).copied().unwrap_or(0)
    }

    /// A new value `name` of `shape`, written by `op` from `inputs`.
    fn push(&mut self, name: &str, shape: [usize; 3], op: Op, inputs: Vec<usize>) {
        let output = self.shapes.len();
        self.shapes.push(shape);
        self.values.insert(name.to_string(), output);
        self.steps.push(Lowered { op, inputs, output });
    }

    /// The activation applied to `y` by the nodes from `next` on, when `y` has no other
    /// reader: how many nodes it takes, the activation and the name of its result.
    fn fused_activation(&self, next: usize, y: &'g str) -> (usize, Act, &'g str) {
        let Some(node) = self.nodes.get(next) else {
            return (0, Act::Identity, y);
        };
        // SiLU as exported: s = Sigmoid(y), Mul(y, s).
        if let (Some(Act::Sigmoid), Some(mul)) = (activation(node, y), self.nodes.get(next + 1)) {
            let s = node.output[0].as_str();
            let reads = |a: &str, b: &str| mul.input.iter().map(String::as_str).eq([a, b]);
            if mul.op_type == "Mul"
                && (reads(y, s) || reads(s, y))
                && self.uses(y) == 2
                && self.uses(s) == 1
            {
                return (2, Act::Silu, mul.output[0].as_str());
            }
        }
        match activation(node, y) {
            Some(act) if self.uses(y) == 1 => (1, act, node.output[0].as_str()),
            _ => (0, Act::Identity, y),
        }
    }

    /// Lowers the node at `i` (and those fused into it); returns how many it took.
    fn lower(&mut self, i: usize) -> Result<usize> {
        let node = &self.nodes[i];
        let name = node.name.as_str();
        let y = node.output[0].as_str();
        match node.op_type.as_str() {
            "Conv" => {
                let x = self.value(&node.input[0])?;
                let [h, w, c] = self.shapes[x];
                let (dims, weight) = self.weight(&node.input[1])?;
                let bias = match node.input.get(2) {
                    Some(b) => Some(self.weight(b)?.1),
                    None => None,
                };
                let dims: [usize; 4] = dims
                    .try_into()
                    .map_err(|d| anyhow::anyhow!("{name}: weights {d:?} are not 4-D"))?;
                if pair(node, "dilations", 1)? != [1, 1] {
                    bail!("{name}: dilated convolutions are not supported");
                }
                let (stride, pads) = (pair(node, "strides", 1)?, pads(node)?);
                window([dims[2], dims[3]], stride, pads, [h, w])?;
                if weight.len() != dims.iter().product::<usize>()
                    || bias.as_ref().is_some_and(|b| b.len() != dims[0])
                {
                    bail!("weights or bias do not match the shape {dims:?}");
                }
                let group = attr(node, "group").map_or(1, |a| a.i.max(0) as usize);
                let mut taken = 1;
                let mut out = y;
                let (op, shape, inputs) = if group == 1 && dims[1] == c {
                    let mut conv = Conv::from_oihw(&weight, dims, bias.as_deref(), stride, pads);
                    let [ho, wo] = conv.out_size(h, w);
                    conv.for_output(ho * wo);
                    let shape = [ho, wo, dims[0]];
                    let mut inputs = vec![x];
                    // A residual addition right after, of a value already computed.
                    if let Some(add) = self.nodes.get(i + 1).filter(|n| n.op_type == "Add")
                        && self.uses(y) == 1
                        && add.input.len() == 2
                        && add.input.iter().any(|v| v == y)
                    {
                        let other = add.input.iter().find(|v| *v != y);
                        if let Some(r) = other.and_then(|o| self.values.get(o.as_str()))
                            && self.shapes[*r] == shape
                        {
                            inputs.push(*r);
                            out = add.output[0].as_str();
                            taken += 1;
                        }
                    }
                    let (n, act, fused) = self.fused_activation(i + taken, out);
                    conv.act = act;
                    (taken, out) = (taken + n, fused);
                    (Op::Conv(conv), shape, inputs)
                } else if group == c && dims[0] == c && dims[1] == 1 {
                    let mut conv =
                        Depthwise::from_oihw(&weight, dims, bias.as_deref(), stride, pads);
                    let [ho, wo] = conv.out_size(h, w);
                    conv.lay_out_along(wo);
                    let (n, act, fused) = self.fused_activation(i + 1, y);
                    conv.act = act;
                    (taken, out) = (1 + n, fused);
                    (Op::Depthwise(conv), [ho, wo, c], vec![x])
                } else {
                    bail!("{name}: grouped convolutions other than depthwise are not supported");
                };
                self.push(out, shape, op, inputs);
                Ok(taken)
            }
            "Gemm" => {
                let x = self.value(&node.input[0])?;
                let [h, w, c] = self.shapes[x];
                let plain = |a: &str, v: i64| attr(node, a).is_none_or(|a| a.i == v);
                if [h, w] != [1, 1] || !plain("transA", 0) || !plain("transB", 0) {
                    bail!("{name}: only Gemm on flat features with plain operands is supported");
                }
                if attr(node, "alpha").is_some_and(|a| a.f != 1.0)
                    || attr(node, "beta").is_some_and(|a| a.f != 1.0)
                {
                    bail!("{name}: only Gemm with alpha = beta = 1 is supported");
                }
                let (dims, weight) = self.weight(&node.input[1])?;
                if dims.len() != 2 || dims[0] != c || weight.len() != c * dims[1] {
                    bail!("{name}: weights {dims:?} do not take {c} features");
                }
                let bias = match node.input.get(2) {
                    Some(b) => Some(self.weight(b)?.1),
                    None => None,
                };
                if bias.as_ref().is_some_and(|b| b.len() != dims[1]) {
                    bail!("{name}: the bias does not match {dims:?}");
                }
                let mut layer = Conv::linear(&weight, [dims[0], dims[1]], bias.as_deref());
                layer.for_output(1);
                let (n, act, out) = self.fused_activation(i + 1, y);
                layer.act = act;
                self.push(out, [1, 1, dims[1]], Op::Conv(layer), vec![x]);
                Ok(1 + n)
            }
            "MaxPool" => {
                let x = self.value(&node.input[0])?;
                let [h, w, c] = self.shapes[x];
                if pair(node, "dilations", 1)? != [1, 1] {
                    bail!("{name}: dilated pooling is not supported");
                }
                let pool = MaxPool {
                    // kernel_shape is required (0: no default).
                    window: window(
                        pair(node, "kernel_shape", 0)?,
                        pair(node, "strides", 1)?,
                        pads(node)?,
                        [h, w],
                    )?,
                    ceil: attr(node, "ceil_mode").is_some_and(|a| a.i != 0),
                };
                let [ho, wo] = pool.out_size(h, w);
                self.push(y, [ho, wo, c], Op::MaxPool(pool), vec![x]);
                Ok(1)
            }
            "GlobalAveragePool" => {
                let x = self.value(&node.input[0])?;
                let c = self.shapes[x][2];
                self.push(y, [1, 1, c], Op::GlobalAvgPool, vec![x]);
                Ok(1)
            }
            "Flatten" => {
                // [b, c, 1, 1] -> [b, c] is the same memory in NHWC.
                let x = self.value(&node.input[0])?;
                let [h, w, _] = self.shapes[x];
                let axis = attr(node, "axis").map_or(1, |a| a.i);
                if [h, w] != [1, 1] || axis != 1 {
                    bail!("{name}: only Flatten of pooled features is supported");
                }
                self.values.insert(y.to_string(), x);
                Ok(1)
            }
            "Add" | "Mul" if node.input.len() == 2 => {
                let (a, b) = (self.value(&node.input[0])?, self.value(&node.input[1])?);
                let (sa, sb) = (self.shapes[a], self.shapes[b]);
                if node.op_type == "Add" && sa == sb {
                    let (n, act, out) = self.fused_activation(i + 1, y);
                    self.push(out, sa, Op::Add(act), vec![a, b]);
                    return Ok(1 + n);
                }
                // One value per channel times a feature map.
                let per_channel = |s: [usize; 3], t: [usize; 3]| s[..2] == [1, 1] && s[2] == t[2];
                if node.op_type == "Mul" {
                    if per_channel(sa, sb) {
                        self.push(y, sb, Op::ScaleChannels, vec![b, a]);
                        return Ok(1);
                    }
                    if per_channel(sb, sa) {
                        self.push(y, sa, Op::ScaleChannels, vec![a, b]);
                        return Ok(1);
                    }
                }
                bail!(
                    "{name}: {} of shapes {sa:?} and {sb:?} is not supported",
                    node.op_type
                )
            }
            _ => {
                let x = self.value(&node.input[0])?;
                match activation(node, &node.input[0]) {
                    Some(act) => {
                        self.push(y, self.shapes[x], Op::Act(act), vec![x]);
                        Ok(1)
                    }
                    None => bail!("{name}: {} is not supported", node.op_type),
                }
            }
        }
    }
}

/// The program computing `graph`'s value `output` from `input` (`[N, 3, size, size]`).
pub fn compile(graph: &Graph, input: &str, output: &str, size: usize) -> Result<Program> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for node in &graph.nodes {
        for i in &node.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    *uses.entry(output).or_default() += 1;
    let mut l = Lowering {
        nodes: &graph.nodes,
        weights: graph
            .initializers
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect(),
        uses,
        values: HashMap::from([(input.to_string(), 0)]),
        shapes: vec![[size, size, 3]],
        steps: Vec::new(),
    };
    let mut i = 0;
    while i < graph.nodes.len() {
        let node = &graph.nodes[i];
        i += l.lower(i).with_context(|| {
            format!(
                "{} ({}) is not supported by kd's inference plan",
                node.name, node.op_type
            )
        })?;
    }
    let out = l.value(output)?;
    let [h, w, classes] = l.shapes[out];
    if [h, w] != [1, 1] {
        bail!("the network's output is not one vector per image");
    }
    // Buffers: a value takes a free buffer when it is written and gives it back after its
    // last reader (the output is kept).
    let mut last_use = vec![0; l.shapes.len()];
    for (s, step) in l.steps.iter().enumerate() {
        for &v in &step.inputs {
            last_use[v] = s;
        }
    }
    let mut buffer = vec![usize::MAX; l.shapes.len()];
    buffer[0] = 0;
    let (mut buffers, mut free) = (1, Vec::new());
    let mut steps = Vec::with_capacity(l.steps.len());
    for (s, step) in l.steps.into_iter().enumerate() {
        buffer[step.output] = free.pop().unwrap_or_else(|| {
            buffers += 1;
            buffers - 1
        });
        let inputs: Vec<usize> = step.inputs.iter().map(|&v| buffer[v]).collect();
        // Each value read for the last time frees its buffer once (`Add(x, x)` reads it
        // twice).
        for (j, &v) in step.inputs.iter().enumerate() {
            if last_use[v] == s && v != out && !step.inputs[..j].contains(&v) {
                free.push(buffer[v]);
            }
        }
        steps.push(Step {
            input_shape: l.shapes[step.inputs[0]],
            output_shape: l.shapes[step.output],
            op: step.op,
            inputs,
            output: buffer[step.output],
        });
    }
    Ok(Program {
        steps,
        buffers,
        input: 0,
        output: buffer[out],
        input_shape: [size, size, 3],
        classes,
        weight_bytes: graph.initializers.iter().map(|t| t.raw_data.len()).sum(),
    })
}
