//! Weight files: kd's own checkpoints and PyTorch state dicts (`.safetensors` or `.pth`)
//! under the reference names (torchvision's for ResNet, the reference implementation's for
//! CoAtNet).
//!
//! A kd checkpoint is burnpack bytes without parameter ids, followed by a CRC-32 of them
//! ([`crate::io::with_checksum`]), so that two runs of the same seed and config write the
//! same bytes and a damaged file is named instead of loaded. The parameters' ids, which key
//! the optimizer's state, are stable instead: numbered in module order when a network is
//! built ([`stable_ids`]), so a resumed model finds its optimizer state without them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::store::{
    ApplyError, ApplyResult, BurnToPyTorchAdapter, BurnpackStore, KeyRemapper, ModuleSnapshot,
    PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};
use burn::tensor::Bytes;

use super::{Network, Remap};

/// Wrapper prefixes stripped from PyTorch keys (`model.`, DataParallel's `module.`).
const STRIP_WRAPPER: Remap = (r"^(model|module)\.", "");

/// Weights kd derives itself, so a state dict may omit them.
const DERIVED: &[&str] = &["relative_index"];

fn from_torch_remaps(net: &Network) -> impl Iterator<Item = Remap> {
    std::iter::once(STRIP_WRAPPER).chain(net.family().from_torch.iter().copied())
}

/// Serialises a network (or any module, such as a feature projection) to a kd checkpoint:
/// burnpack bytes without parameter ids, then their checksum.
pub fn to_bytes<M: burn::module::Module>(net: &M) -> Result<Vec<u8>> {
    let mut store = BurnpackStore::from_bytes(None).with_to_adapter(WithoutIds);
    net.save_into(&mut store)
        .context("cannot serialise model")?;
    let bytes = store.get_bytes().context("cannot serialise model")?;
    let trailer = crate::io::with_checksum(&[&bytes]);
    let mut out = bytes.to_vec();
    out.extend_from_slice(&trailer);
    Ok(out)
}

/// Leaves the (random or numbered) parameter ids out of a checkpoint.
#[derive(Clone)]
struct WithoutIds;

impl burn::store::ModuleAdapter for WithoutIds {
    fn adapt(
        &self,
        mut tensor: burn::store::burn_pack::Tensor,
        _: burn::store::ModuleContext<'_>,
    ) -> burn::store::burn_pack::Tensor {
        tensor.param_id = None;
        tensor
    }

    fn clone_box(&self) -> Box<dyn burn::store::ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// Numbers the parameters of `module` in module order from `first`, in place of Burn's
/// random ids, without initialising them (initialisation stays lazy, in the order the
/// model first uses its parameters).
pub fn stable_ids<M: burn::module::Module>(module: M, first: u64) -> M {
    struct Numbering(u64);
    impl Numbering {
        fn next(&mut self) -> burn::module::ParamId {
            self.0 += 1;
            burn::module::ParamId::from(self.0)
        }
    }
    impl burn::module::ModuleMapper for Numbering {
        fn map_float<const D: usize>(
            &mut self,
            mut param: burn::module::Param<burn::tensor::Tensor<D>>,
        ) -> burn::module::Param<burn::tensor::Tensor<D>> {
            param.id = self.next();
            param
        }
        fn map_int<const D: usize>(
            &mut self,
            mut param: burn::module::Param<burn::tensor::Tensor<D, burn::tensor::Int>>,
        ) -> burn::module::Param<burn::tensor::Tensor<D, burn::tensor::Int>> {
            param.id = self.next();
            param
        }
        fn map_bool<const D: usize>(
            &mut self,
            mut param: burn::module::Param<burn::tensor::Tensor<D, burn::tensor::Bool>>,
        ) -> burn::module::Param<burn::tensor::Tensor<D, burn::tensor::Bool>> {
            param.id = self.next();
            param
        }
    }
    module.map(&mut Numbering(first))
}

/// Loads burnpack bytes (from [`to_bytes`]) into a network (or module) of the same
/// architecture.
pub fn load_bytes<M: burn::module::Module>(
    net: &mut M,
    bytes: Vec<u8>,
    origin: &Path,
) -> Result<()> {
    // Partial loading turns a foreign model into a list of missing weights (reported by
    // `check_complete`) instead of one enormous validation error.
    let bytes = crate::io::verified(bytes, origin)?;
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
    let remaps = KeyRemapper::from_patterns(net.family().to_torch.to_vec())
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
                .skip_enum_variants(true)
                .with_from_adapter(PyTorchToBurnAdapter)
                .allow_partial(true)
                .validate(false);
            for (from, to) in &remaps {
                store = store.with_key_remapping(from, *to);
            }
            net.load_from(&mut store).map_err(|e| {
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
            net.load_from(&mut store).map_err(|e| {
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
    let head = net.family().head;
    let fresh_head = fresh_head_if_other_classes(&mut result, head);
    check_complete_torch(net, result, path)?;
    if fresh_head {
        eprintln!(
            "note: the classifier head ({}) of {} does not fit this model's classes; it starts from fresh weights",
            torch_name(net, head).trim_end_matches('.'),
            path.display()
        );
    }
    Ok(())
}

/// Fine-tuning from weights trained on other classes (ImageNet's 1000, say): when none of
/// the file's classifier head (kd's names starting with `head`) fits (another shape, or
/// absent), the head is left
/// freshly initialised and its errors are dropped. Returns whether that happened.
fn fresh_head_if_other_classes(result: &mut ApplyResult, head: &str) -> bool {
    let is_head = |p: &str| p.starts_with(head);
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
        .skip_enum_variants(true)
        .with_to_adapter(BurnToPyTorchAdapter);
    for (from, to) in net.family().to_torch {
        store = store.with_key_remapping(from, *to);
    }
    net.save_into(&mut store).context("cannot export weights")?;
    store.get_bytes().context("cannot export weights")
}
