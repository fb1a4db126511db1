//! An ONNX graph under construction: the layers kd's networks are made of, written as ONNX
//! nodes with their weights as initializers (BatchNorm folded into the convolution it
//! follows). Names are the kd parameter paths the caller gives, and node outputs are numbered
//! in order, so the same network always gives the same graph.

use anyhow::{Result, bail};
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, LayerNorm, Linear, PaddingConfig2d};
use burn::tensor::Tensor;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{AttributeProto, NodeProto, TensorProto};

use crate::ops::norm::inference_scale_shift;

/// The name of a value in the graph.
pub type Value = String;

/// Nodes and initializers, in the order they were added.
#[derive(Default)]
pub struct Graph {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    outputs: usize,
}

/// The values of a float tensor, in row-major order.
pub fn floats<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading a weight: {e:?}"))
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn ints_attr(name: &str, ints: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: ints.iter().map(|&v| v as i64).collect(),
        ..Default::default()
    }
}

fn float_attr(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

/// Explicit (top, left, bottom, right) padding in ONNX's order (begins, then ends).
fn pads(padding: &PaddingConfig2d, what: &str) -> Result<[usize; 4]> {
    match padding {
        PaddingConfig2d::Valid => Ok([0; 4]),
        PaddingConfig2d::Explicit(top, left, bottom, right) => Ok([*top, *left, *bottom, *right]),
        PaddingConfig2d::Same => bail!("{what}: 'same' padding cannot be exported to ONNX"),
    }
}

impl Graph {
    /// A weight (or any constant) named `name`.
    pub fn constant(&mut self, name: &str, dims: &[usize], values: &[f32]) -> Value {
        debug_assert_eq!(dims.iter().product::<usize>(), values.len());
        self.initializers.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    /// An int64 constant (shapes, axes).
    pub fn constant_i64(&mut self, name: &str, values: &[i64]) -> Value {
        self.initializers.push(TensorProto {
            name: name.into(),
            dims: vec![values.len() as i64],
            data_type: DataType::Int64 as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    /// A node of `op` on `inputs`; returns its (single) output.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> Value {
        self.outputs += 1;
        let output = format!("{}_{}", op.to_lowercase(), self.outputs);
        self.nodes.push(NodeProto {
            name: output.clone(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            attribute: attrs,
            ..Default::default()
        });
        output
    }

    /// `conv` (named `name`) on `x`, with `bn` folded into its weights and bias when given:
    /// `w' = w·γ/√(var+ε)`, `b' = (b − mean)·γ/√(var+ε) + β`.
    pub fn conv(
        &mut self,
        name: &str,
        x: &str,
        conv: &Conv2d,
        bn: Option<&BatchNorm>,
    ) -> Result<Value> {
        let dims = conv.weight.dims();
        let cout = dims[0];
        let mut w = floats(conv.weight.val())?;
        let mut b = match &conv.bias {
            Some(bias) => floats(bias.val())?,
            None => vec![0.0; cout],
        };
        if let Some(bn) = bn {
            let (scale, shift) = inference_scale_shift(bn, &conv.weight.device());
            let (scale, shift) = (floats(scale)?, floats(shift)?);
            let per_out = w.len() / cout;
            for o in 0..cout {
                w[o * per_out..(o + 1) * per_out]
                    .iter_mut()
                    .for_each(|v| *v *= scale[o]);
                b[o] = b[o] * scale[o] + shift[o];
            }
        }
        let has_bias = bn.is_some() || conv.bias.is_some();
        let w = self.constant(&format!("{name}.weight"), &dims, &w);
        let mut inputs = vec![x.to_string(), w];
        if has_bias {
            inputs.push(self.constant(&format!("{name}.bias"), &[cout], &b));
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let attrs = vec![
            ints_attr("kernel_shape", &conv.kernel_size),
            ints_attr("strides", &conv.stride),
            ints_attr("dilations", &conv.dilation),
            ints_attr("pads", &pads(&conv.padding, name)?),
            int_attr("group", conv.groups as i64),
        ];
        Ok(self.node("Conv", &inputs, attrs))
    }

    /// `bn` on its own (it follows no convolution): `BatchNormalization` in inference mode.
    pub fn batch_norm(&mut self, name: &str, x: &str, bn: &BatchNorm) -> Result<Value> {
        let c = bn.gamma.dims()[0];
        let gamma = self.constant(&format!("{name}.weight"), &[c], &floats(bn.gamma.val())?);
        let beta = self.constant(&format!("{name}.bias"), &[c], &floats(bn.beta.val())?);
        let mean = floats(bn.running_mean.value_sync())?;
        let var = floats(bn.running_var.value_sync())?;
        let mean = self.constant(&format!("{name}.running_mean"), &[c], &mean);
        let var = self.constant(&format!("{name}.running_var"), &[c], &var);
        Ok(self.node(
            "BatchNormalization",
            &[x, &gamma, &beta, &mean, &var],
            vec![float_attr("epsilon", bn.epsilon as f32)],
        ))
    }

    /// `layer` on `x` of rank 2 (`Gemm`) or more (`MatMul`, then `Add`).
    pub fn linear(&mut self, name: &str, x: &str, layer: &Linear, rank: usize) -> Result<Value> {
        let dims = layer.weight.dims();
        let w = self.constant(
            &format!("{name}.weight"),
            &dims,
            &floats(layer.weight.val())?,
        );
        let b = match &layer.bias {
            Some(b) => Some(self.constant(&format!("{name}.bias"), &[dims[1]], &floats(b.val())?)),
            None => None,
        };
        Ok(match (rank, b) {
            (2, Some(b)) => self.node("Gemm", &[x, &w, &b], vec![]),
            (_, b) => {
                let y = self.node("MatMul", &[x, &w], vec![]);
                match b {
                    Some(b) => self.node("Add", &[&y, &b], vec![]),
                    None => y,
                }
            }
        })
    }

    /// `norm` over the last axis.
    pub fn layer_norm(
        &mut self,
        name: &str,
        x: &str,
        norm: &LayerNorm,
        epsilon: f64,
    ) -> Result<Value> {
        let c = norm.gamma.dims()[0];
        let gamma = self.constant(&format!("{name}.weight"), &[c], &floats(norm.gamma.val())?);
        let mut inputs = vec![x.to_string(), gamma];
        if let Some(beta) = &norm.beta {
            inputs.push(self.constant(&format!("{name}.bias"), &[c], &floats(beta.val())?));
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.node(
            "LayerNormalization",
            &inputs,
            vec![int_attr("axis", -1), float_attr("epsilon", epsilon as f32)],
        ))
    }

    /// Max pooling as `pool` does it.
    pub fn max_pool(&mut self, x: &str, pool: &MaxPool2d) -> Result<Value> {
        Ok(self.node(
            "MaxPool",
            &[x],
            vec![
                ints_attr("kernel_shape", &pool.kernel_size),
                ints_attr("strides", &pool.stride),
                ints_attr("dilations", &pool.dilation),
                ints_attr("pads", &pads(&pool.padding, "max pool")?),
                int_attr("ceil_mode", i64::from(pool.ceil_mode)),
            ],
        ))
    }

    /// The mean over the pixels, `[b, c, h, w]` → `[b, c]`.
    pub fn global_avg_pool(&mut self, x: &str) -> Value {
        let pooled = self.node("GlobalAveragePool", &[x], vec![]);
        self.node("Flatten", &[&pooled], vec![int_attr("axis", 1)])
    }

    /// The mean over the pixels kept as `[b, c, 1, 1]`.
    pub fn global_avg_pool_4d(&mut self, x: &str) -> Value {
        self.node("GlobalAveragePool", &[x], vec![])
    }

    /// `max(x, 0)`.
    pub fn relu(&mut self, x: &str) -> Value {
        self.node("Relu", &[x], vec![])
    }

    /// `1 / (1 + e^−x)`.
    pub fn sigmoid(&mut self, x: &str) -> Value {
        self.node("Sigmoid", &[x], vec![])
    }

    /// PyTorch's `hardsigmoid`: `clamp(x/6 + 1/2, 0, 1)`.
    pub fn hardsigmoid(&mut self, x: &str) -> Value {
        self.node(
            "HardSigmoid",
            &[x],
            vec![float_attr("alpha", 1.0 / 6.0), float_attr("beta", 0.5)],
        )
    }

    /// `x · hardsigmoid(x)`.
    pub fn hardswish(&mut self, x: &str) -> Value {
        self.node("HardSwish", &[x], vec![])
    }

    /// `x · sigmoid(x)`.
    pub fn silu(&mut self, x: &str) -> Value {
        let s = self.sigmoid(x);
        self.mul(x, &s)
    }

    /// Exact GELU, `x · ½(1 + erf(x/√2))`.
    pub fn gelu(&mut self, x: &str) -> Value {
        let inv_sqrt2 = self.scalar(std::f32::consts::FRAC_1_SQRT_2);
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        let scaled = self.mul(x, &inv_sqrt2);
        let erf = self.node("Erf", &[&scaled], vec![]);
        let plus = self.add(&erf, &one);
        let halved = self.mul(&plus, &half);
        self.mul(x, &halved)
    }

    /// A scalar float constant.
    pub fn scalar(&mut self, v: f32) -> Value {
        let name = format!("const_{}", self.initializers.len());
        self.constant(&name, &[], &[v])
    }

    /// `a + b` (broadcasting).
    pub fn add(&mut self, a: &str, b: &str) -> Value {
        self.node("Add", &[a, b], vec![])
    }

    /// `a · b` (broadcasting).
    pub fn mul(&mut self, a: &str, b: &str) -> Value {
        self.node("Mul", &[a, b], vec![])
    }

    /// Batched matrix product.
    pub fn matmul(&mut self, a: &str, b: &str) -> Value {
        self.node("MatMul", &[a, b], vec![])
    }

    /// `x` reshaped (`0` keeps that dimension, `-1` infers one).
    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> Value {
        let name = format!("shape_{}", self.initializers.len());
        let shape = self.constant_i64(&name, shape);
        self.node("Reshape", &[x, &shape], vec![])
    }

    /// `x` with its axes permuted.
    pub fn transpose(&mut self, x: &str, perm: &[usize]) -> Value {
        self.node("Transpose", &[x], vec![ints_attr("perm", perm)])
    }

    /// The slice `index` of `x` along `axis` (that axis removed).
    pub fn gather(&mut self, x: &str, axis: i64, index: i64) -> Value {
        let name = format!("index_{}", self.initializers.len());
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: vec![],
            data_type: DataType::Int64 as i32,
            raw_data: index.to_le_bytes().to_vec(),
            ..Default::default()
        });
        self.node("Gather", &[x, &name], vec![int_attr("axis", axis)])
    }

    /// Softmax over `axis`.
    pub fn softmax(&mut self, x: &str, axis: i64) -> Value {
        self.node("Softmax", &[x], vec![int_attr("axis", axis)])
    }
}
