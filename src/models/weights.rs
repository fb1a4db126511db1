//! Weight files: kd's own checkpoints (burnpack, parameter ids kept for resuming) and
//! PyTorch state dicts (`.safetensors` or `.pth`) under the reference names (torchvision's
//! for ResNet, the reference implementation's for CoAtNet).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::store::{
    ApplyError, ApplyResult, BurnToPyTorchAdapter, BurnpackStore, KeyRemapper, ModuleSnapshot,
    ModuleStore, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};
use burn::tensor::Bytes;

use super::Network;

/// A key rename: regex on the key, replacement (`${1}` for capture groups). Renames are
/// applied in order, each to the result of the previous ones.
type Remap = (&'static str, &'static str);

/// Wrapper prefixes stripped from PyTorch keys (`model.`, DataParallel's `module.`).
const STRIP_WRAPPER: Remap = (r"^(model|module)\.", "");

/// ResNet, PyTorch -> kd: torchvision's numbered `downsample` Sequential.
const RESNET_FROM_TORCH: &[Remap] = &[
    (r"\.downsample\.0\.", ".downsample.conv."),
    (r"\.downsample\.1\.", ".downsample.bn."),
];

/// ResNet, kd -> PyTorch.
const RESNET_TO_TORCH: &[Remap] = &[
    (r"\.downsample\.conv\.", ".downsample.0."),
    (r"\.downsample\.bn\.", ".downsample.1."),
];

/// CoAtNet, PyTorch -> kd: the reference's numbered Sequentials and `PreNorm` wrappers.
const COATNET_FROM_TORCH: &[Remap] = &[
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

/// CoAtNet, kd -> PyTorch.
const COATNET_TO_TORCH: &[Remap] = &[
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

/// Weights kd derives itself, so a state dict may omit them.
const DERIVED: &[&str] = &["relative_index"];

fn from_torch_remaps(net: &Network) -> impl Iterator<Item = Remap> {
    let table = match net {
        Network::ResNet(_) => RESNET_FROM_TORCH,
        Network::CoAtNet(_) => COATNET_FROM_TORCH,
    };
    std::iter::once(STRIP_WRAPPER).chain(table.iter().copied())
}

fn to_torch_remaps(net: &Network) -> &'static [Remap] {
    match net {
        Network::ResNet(_) => RESNET_TO_TORCH,
        Network::CoAtNet(_) => COATNET_TO_TORCH,
    }
}

/// Serialises a network to burnpack bytes.
pub fn to_bytes(net: &Network) -> Result<Vec<u8>> {
    let mut store = BurnpackStore::from_bytes(None);
    net.save_into(&mut store)
        .context("cannot serialise model")?;
    Ok(store
        .get_bytes()
        .context("cannot serialise model")?
        .to_vec())
}

/// Loads burnpack bytes (from [`to_bytes`]) into a network of the same architecture.
pub fn load_bytes(net: &mut Network, bytes: Vec<u8>, origin: &Path) -> Result<()> {
    // Partial loading turns a foreign model into a list of missing weights (reported by
    // `check_complete`) instead of one enormous validation error.
    let mut store = BurnpackStore::from_bytes(Some(Bytes::from_bytes_vec(bytes)))
        .allow_partial(true)
        .validate(false);
    let result = net.load_from(&mut store).map_err(|e| {
        let reason: String = e.to_string().chars().take(160).collect();
        anyhow::anyhow!(
            "checkpoint {} is damaged or not a kd checkpoint ({reason}): use another checkpoint or retrain",
            origin.display()
        )
    })?;
    check_complete(&result, origin, None)
}

/// Errors for weights that did not fit or are missing, named as kd names them, or with
/// `torch` as that network's PyTorch state dict does.
fn check_complete(result: &ApplyResult, origin: &Path, torch: Option<&Network>) -> Result<()> {
    let name = |path: &str| match torch {
        Some(net) => torch_name(net, path),
        None => path.to_string(),
    };
    // Burn stores a Linear weight as [in, out], PyTorch as [out, in] (every rank-2 `weight`
    // of these models is a Linear's).
    let shape = |path: &str, dims: &[usize]| -> Vec<usize> {
        let mut dims = dims.to_vec();
        if torch.is_some() && dims.len() == 2 && path.ends_with(".weight") {
            dims.reverse();
        }
        dims
    };
    if let Some(err) = result.errors.first() {
        let err = match err {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => format!(
                "'{}' is {:?} there but {:?} in this model",
                name(path),
                shape(path, found.as_slice()),
                shape(path, expected.as_slice())
            ),
            other => format!("{other}").chars().take(160).collect(),
        };
        bail!(
            "{} does not fit this model ({err}{}): it was saved for another architecture, width or class count",
            origin.display(),
            match result.errors.len() {
                1 => String::new(),
                n => format!(", and {} more", n - 1),
            }
        );
    }
    if let Some((missing, _)) = result.missing.first() {
        bail!(
            "checkpoint {} lacks weight '{}' ({} missing): it was saved for another architecture or class count",
            origin.display(),
            name(missing),
            result.missing.len()
        );
    }
    Ok(())
}

/// Like [`check_complete`], but a state dict may leave out buffers kd derives itself, and
/// weights are named as the state dict names them.
fn check_complete_torch(net: &Network, mut result: ApplyResult, origin: &Path) -> Result<()> {
    result
        .missing
        .retain(|(name, _)| !DERIVED.iter().any(|d| name.ends_with(d)));
    check_complete(&result, origin, Some(net))
}

/// A kd weight name as PyTorch's state dict spells it (for messages).
fn torch_name(net: &Network, name: &str) -> String {
    let remaps = KeyRemapper::from_patterns(to_torch_remaps(net).to_vec())
        .expect("the remap patterns are valid regexes");
    let mut name = name.to_string();
    for (pattern, replacement) in remaps.to_regex_pairs() {
        name = pattern
            .replace_all(&name, replacement.as_str())
            .into_owned();
    }
    // Burn's norm layers call their affine parameters gamma and beta.
    if let Some(layer) = name.strip_suffix(".gamma") {
        format!("{layer}.weight")
    } else if let Some(layer) = name.strip_suffix(".beta") {
        format!("{layer}.bias")
    } else {
        name
    }
}

/// Initialises `net` from a PyTorch state dict (`.safetensors`, `.pth`, `.pt`) with
/// torchvision / reference key names. Buffers PyTorch has and kd does not
/// (`num_batches_tracked`) are ignored, and so may CoAtNet's `relative_index` be missing
/// (kd computes it); any other missing weight is an error.
pub fn load_pytorch(net: &mut Network, path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!("weights file {} does not exist", path.display());
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let remaps: Vec<Remap> = from_torch_remaps(net).collect();
    let mut result = match ext {
        "safetensors" => {
            let mut store = SafetensorsStore::from_file(path)
                .with_from_adapter(PyTorchToBurnAdapter)
                .allow_partial(true)
                .validate(false);
            for (from, to) in &remaps {
                store = store.with_key_remapping(from, *to);
            }
            load_into(net, &mut store).map_err(|e| {
                anyhow::anyhow!("cannot read safetensors file {}: {e}", path.display())
            })?
        }
        "pth" | "pt" | "bin" => {
            let mut store = PytorchStore::from_file(path)
                .allow_partial(true)
                .validate(false);
            for (from, to) in &remaps {
                store = store.with_key_remapping(from, *to);
            }
            load_into(net, &mut store).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read PyTorch file {}: {e}. If it holds a whole pickled model (torch.save(model)), \
                     save its state dict instead: torch.save(model.state_dict(), 'weights.pth')",
                    path.display()
                )
            })?
        }
        _ => bail!(
            "weights file {} has an unknown extension: use .safetensors, .pth or .pt",
            path.display()
        ),
    };
    if result.applied.is_empty() {
        bail!(
            "no weight in {} matches this model: check the architecture and key names{}",
            path.display(),
            if ext == "safetensors" {
                ""
            } else {
                "; if the file holds a whole pickled model (torch.save(model)), save its state dict \
                 instead: torch.save(model.state_dict(), 'weights.pth')"
            }
        );
    }
    let fresh_head = fresh_head_if_other_classes(&mut result);
    check_complete_torch(net, result, path)?;
    if fresh_head {
        eprintln!(
            "note: the classifier head (fc) of {} does not fit this model's classes; it starts from fresh weights",
            path.display()
        );
    }
    Ok(())
}

/// Fine-tuning from weights trained on other classes (ImageNet's 1000, say): when none of
/// the file's classifier head `fc` fits (another shape, or absent), the head is left
/// freshly initialised and its errors are dropped. Returns whether that happened.
fn fresh_head_if_other_classes(result: &mut ApplyResult) -> bool {
    let is_head = |p: &str| p.starts_with("fc.");
    if result.applied.iter().any(|p| is_head(p)) {
        return false; // a head that partly fits is an error, reported as such
    }
    let before = (result.errors.len(), result.missing.len());
    result
        .errors
        .retain(|e| !matches!(e, ApplyError::ShapeMismatch { path, .. } if is_head(path)));
    result.missing.retain(|(name, _)| !is_head(name));
    (result.errors.len(), result.missing.len()) != before
}

/// Loads the architecture's own module (not the `Network` enum, whose variant would
/// prefix every key).
fn load_into<S: ModuleStore>(net: &mut Network, store: &mut S) -> Result<ApplyResult, S::Error> {
    match net {
        Network::ResNet(m) => m.load_from(store),
        Network::CoAtNet(m) => m.load_from(store),
    }
}

/// Replaces the `__metadata__` of safetensors bytes with `metadata` (string values, as the
/// format requires), keeping every tensor's bytes; the header is written with sorted keys,
/// so equal inputs give equal bytes.
pub fn with_metadata(bytes: &[u8], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let damaged = || anyhow::anyhow!("cannot add metadata: the safetensors bytes are damaged");
    let n = u64::from_le_bytes(bytes.get(..8).ok_or_else(damaged)?.try_into()?) as usize;
    let header = bytes.get(8..8 + n).ok_or_else(damaged)?;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|_| damaged())?;
    header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    let mut text = serde_json::to_vec(&header)?;
    // Tensor data starts 8-byte aligned, as safetensors writes it (spaces are allowed).
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend((text.len() as u64).to_le_bytes());
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    Ok(out)
}

/// Writes the weights under PyTorch names as safetensors bytes: torchvision's for ResNet;
/// the reference's for CoAtNet, `relative_index` (int64) included. BatchNorm's
/// `num_batches_tracked` counters are not written (kd does not track them; PyTorch fills
/// them in when loading such a state dict). The bytes depend only on the weights.
pub fn to_pytorch_safetensors(net: &Network) -> Result<Vec<u8>> {
    // One metadata entry, PyTorch's usual one: Burn's default three live in a hash map, so
    // their order (and the file's bytes) changed from one export to the next.
    let mut store = SafetensorsStore::from_bytes(None)
        .clear_metadata()
        .metadata("format", "pt")
        .with_to_adapter(BurnToPyTorchAdapter);
    for (from, to) in to_torch_remaps(net) {
        store = store.with_key_remapping(from, *to);
    }
    match net {
        Network::ResNet(m) => m.save_into(&mut store),
        Network::CoAtNet(m) => m.save_into(&mut store),
    }
    .context("cannot export weights")?;
    store.get_bytes().context("cannot export weights")
}
