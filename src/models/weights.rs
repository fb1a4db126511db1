//! Weight files: kd's own checkpoints (burnpack, parameter ids kept for resuming) and
//! PyTorch state dicts (`.safetensors` or `.pth`) under torchvision's names.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::store::{
    ApplyResult, BurnToPyTorchAdapter, BurnpackStore, ModuleSnapshot, PyTorchToBurnAdapter,
    PytorchStore, SafetensorsStore,
};
use burn::tensor::Bytes;

use super::Network;

/// Key renames from PyTorch names to kd's: wrapper prefixes and torchvision's numbered
/// `downsample` Sequential.
const FROM_TORCH: &[(&str, &str)] = &[
    (r"^(model|module)\.", ""),
    (r"\.downsample\.0\.", ".downsample.conv."),
    (r"\.downsample\.1\.", ".downsample.bn."),
];

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
    let mut store = BurnpackStore::from_bytes(Some(Bytes::from_bytes_vec(bytes)));
    let result = net.load_from(&mut store).map_err(|e| {
        anyhow::anyhow!(
            "checkpoint {} is damaged or not a kd checkpoint ({e}): use another checkpoint or retrain",
            origin.display()
        )
    })?;
    check_complete(&result, origin)
}

fn check_complete(result: &ApplyResult, origin: &Path) -> Result<()> {
    if let Some(err) = result.errors.first() {
        bail!(
            "checkpoint {} does not fit this model ({err:?}): it was saved for another architecture or class count",
            origin.display()
        );
    }
    if let Some((name, _)) = result.missing.first() {
        bail!(
            "checkpoint {} lacks weight '{name}' ({} missing): it was saved for another architecture",
            origin.display(),
            result.missing.len()
        );
    }
    Ok(())
}

/// Initialises `net` from a PyTorch state dict (`.safetensors`, `.pth`, `.pt`) with
/// torchvision / reference key names. Buffers PyTorch has and kd does not
/// (`num_batches_tracked`) are ignored; any missing weight is an error.
pub fn load_pytorch(net: &mut Network, path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!("weights file {} does not exist", path.display());
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let Network::ResNet(inner) = net;
    let result = match ext {
        "safetensors" => {
            let mut store = SafetensorsStore::from_file(path)
                .with_from_adapter(PyTorchToBurnAdapter)
                .allow_partial(true);
            for (from, to) in FROM_TORCH {
                store = store.with_key_remapping(from, *to);
            }
            inner.load_from(&mut store).map_err(|e| {
                anyhow::anyhow!("cannot read safetensors file {}: {e}", path.display())
            })?
        }
        "pth" | "pt" | "bin" => {
            let mut store = PytorchStore::from_file(path).allow_partial(true);
            for (from, to) in FROM_TORCH {
                store = store.with_key_remapping(from, *to);
            }
            inner.load_from(&mut store).map_err(|e| {
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
            "no weight in {} matches this model: check the architecture and key names",
            path.display()
        );
    }
    check_complete(&result, path)
}

/// Writes the weights under PyTorch names as safetensors bytes.
pub fn to_pytorch_safetensors(net: &Network) -> Result<Vec<u8>> {
    let Network::ResNet(inner) = net;
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_key_remapping(r"\.downsample\.conv\.", ".downsample.0.")
        .with_key_remapping(r"\.downsample\.bn\.", ".downsample.1.");
    inner
        .save_into(&mut store)
        .context("cannot export weights")?;
    store.get_bytes().context("cannot export weights")
}
