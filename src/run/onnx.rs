//! A run's network as an ONNX file: normalized images `[batch, 3, size, size]` (any batch)
//! in, logits out, BatchNorm folded into the convolutions, and what inference needs besides
//! (classes in output order, size, normalization, model) in the metadata properties. Before
//! the file is written, a pure-Rust ONNX runtime (tract) runs it on a batch and its logits
//! must match kd's: a graph that computes something else is never kept.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Distribution, Tensor};
use prost::Message;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::{
    GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorShapeProto,
    TypeProto, ValueInfoProto, type_proto,
};
use tract_onnx::prelude::*;

use super::{Checkpoint, Run};
use crate::io::{ensure_dir, write_atomic};
use crate::models::Network;
use crate::models::onnx::{Graph, floats};
use crate::ops::{Ctx, Precision};

/// The ONNX operator set the graphs use (`LayerNormalization` needs 17).
const OPSET: i64 = 17;
/// ONNX IR version 8 (operator sets up to 17 and later).
const IR_VERSION: i64 = 8;
/// The largest difference allowed between kd's logits and the exported graph's, relative to
/// the largest logit (at least 1).
const TOLERANCE: f32 = 1e-4;

/// Writes `checkpoint` of `run` to `out` (usually a `.onnx` path), checked.
pub fn export(run: &Run, checkpoint: Checkpoint, out: &Path) -> Result<()> {
    let device = Device::flex();
    let net = run.load_network(checkpoint, &device)?;
    let c = &run.config;
    let metadata = [
        ("kd.classes", serde_json::to_string(&run.classes)?),
        ("kd.model", serde_json::to_string(&c.model)?),
        ("kd.image_size", c.image_size.to_string()),
        ("kd.mean", serde_json::to_string(&c.mean)?),
        ("kd.std", serde_json::to_string(&c.std)?),
        ("kd.checkpoint", checkpoint.to_string()),
    ];
    let bytes = to_onnx(&net, run.classes.len(), c.image_size, &metadata)?;
    check(&net, &bytes, c.image_size, &device)
        .with_context(|| format!("{} was not written", out.display()))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        ensure_dir(parent)?;
    }
    write_atomic(out, &bytes)
}

/// `net` as the bytes of an ONNX model for images of side `size`.
pub fn to_onnx(
    net: &Network,
    classes: usize,
    size: usize,
    metadata: &[(&str, String)],
) -> Result<Vec<u8>> {
    let mut g = Graph::default();
    let logits = net.to_onnx(&mut g, "images".into(), size)?;
    let tensor = |name: &str, dims: Vec<Dimension>| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let fixed = |v: usize| Dimension {
        value: Some(dimension::Value::DimValue(v as i64)),
        ..Default::default()
    };
    let batch = Dimension {
        value: Some(dimension::Value::DimParam("batch".into())),
        ..Default::default()
    };
    // The last node's output is renamed `logits`.
    let last = g
        .nodes
        .last_mut()
        .filter(|n| n.output[0] == logits)
        .context("the graph does not end in the logits")?;
    last.output[0] = "logits".into();
    let graph = GraphProto {
        name: "kd".into(),
        node: g.nodes,
        initializer: g.initializers,
        input: vec![tensor(
            "images",
            vec![batch.clone(), fixed(3), fixed(size), fixed(size)],
        )],
        output: vec![tensor("logits", vec![batch, fixed(classes)])],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "kd".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.to_string(),
                value: v.clone(),
            })
            .collect(),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

/// Runs the ONNX `bytes` in tract on `batch` images and returns the logits.
pub fn run_onnx(bytes: &[u8], images: &Tensor<4>) -> Result<Vec<f32>> {
    let dims = images.dims();
    let values = floats(images.clone())?;
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("the ONNX graph does not load: {e:#}"))?
        .with_input_fact(0, f32::fact(dims).into())
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| anyhow::anyhow!("the ONNX graph does not run: {e:#}"))?;
    let input = tract_ndarray::Array4::from_shape_vec(dims, values)?.into_tensor();
    let outputs = model
        .run(tvec!(input.into()))
        .map_err(|e| anyhow::anyhow!("the ONNX graph failed: {e:#}"))?;
    let logits = outputs[0]
        .to_plain_array_view::<f32>()
        .map_err(|e| anyhow::anyhow!("the ONNX graph's output is not float: {e:#}"))?;
    Ok(logits.iter().copied().collect())
}

/// Whether the ONNX `bytes` compute `net`'s logits on a batch of two random images.
fn check(net: &Network, bytes: &[u8], size: usize, device: &Device) -> Result<()> {
    let images = Tensor::<4>::random([2, 3, size, size], Distribution::Normal(0.0, 1.0), device);
    let expected = floats(net.forward(images.clone(), &Ctx::new(Precision::F32)))?;
    let actual = run_onnx(bytes, &images)?;
    let diff = max_difference(&expected, &actual);
    if actual.len() != expected.len() || diff.is_nan() || diff > TOLERANCE {
        bail!(
            "the ONNX graph of {} computes other logits than kd (largest difference {diff:.2e}); please report this",
            net.family().names.join("/")
        );
    }
    Ok(())
}

/// The largest difference between `a` and `b`, relative to their largest magnitude (at
/// least 1).
pub fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, |m, d| {
            if m.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        });
    diff / scale
}
