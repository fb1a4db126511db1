//! A run's weights for PyTorch: a safetensors file under the PyTorch state dict's names, with
//! what inference needs besides the weights in its metadata.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, bail};

use super::{Checkpoint, Run};
use crate::io::{ensure_dir, write_atomic};
use crate::models::weights;

/// Writes `checkpoint` of `run` to `out` (a `.safetensors` path) under PyTorch names. The
/// metadata (`safetensors.safe_open(...).metadata()`) holds the class order, the model, the
/// input size and normalization; the same checkpoint always gives the same bytes.
pub fn safetensors(run: &Run, checkpoint: Checkpoint, out: &Path) -> Result<()> {
    if out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("--out {} must end in .safetensors", out.display());
    }
    let net = run.load_network(checkpoint, &burn::tensor::Device::flex())?;
    let bytes = weights::to_pytorch_safetensors(&net)?;
    let c = &run.config;
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("kd.classes".into(), serde_json::to_string(&run.classes)?),
        ("kd.model".into(), serde_json::to_string(&c.model)?),
        ("kd.image_size".into(), c.image_size.to_string()),
        ("kd.mean".into(), serde_json::to_string(&c.mean)?),
        ("kd.std".into(), serde_json::to_string(&c.std)?),
        ("kd.checkpoint".into(), checkpoint.to_string()),
    ]);
    let bytes = weights::with_metadata(&bytes, &metadata)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        ensure_dir(parent)?;
    }
    write_atomic(out, &bytes)
}
