//! Batches to tensors and tensors back to host rows.

use anyhow::Result;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::Batch;

/// Moves a batch's images into a tensor on `device` (no copy of the pixel array; the
/// batch keeps its labels and indices).
pub fn take_images_tensor(batch: &mut Batch, device: &Device) -> Tensor<4> {
    let (h, w) = batch.size;
    let n = batch.len();
    Tensor::from_data(
        TensorData::new(std::mem::take(&mut batch.images), [n, 3, h, w]),
        device,
    )
}

/// Images of a batch as a tensor on `device` (a copy; the batch keeps its images).
pub fn images_tensor(batch: &Batch, device: &Device) -> Tensor<4> {
    let (h, w) = batch.size;
    Tensor::from_data(
        TensorData::new(batch.images.clone(), [batch.len(), 3, h, w]),
        device,
    )
}

/// Labels of a batch as a tensor on `device`.
pub fn labels_tensor(batch: &Batch, device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(batch.labels.clone(), [batch.len()]), device)
}

/// The rows of a `[batch, n]` tensor (logits, features) as host arrays.
pub fn rows(t: Tensor<2>) -> Result<Vec<Vec<f32>>> {
    let [_, c] = t.dims();
    let flat: Vec<f32> = t
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("cannot read a tensor from the device: {e:?}"))?;
    Ok(flat.chunks(c.max(1)).map(<[f32]>::to_vec).collect())
}

/// Host rows (each of the same length) as a `[rows, n]` tensor on `device`.
pub fn from_rows<'a>(rows: impl IntoIterator<Item = &'a [f32]>, device: &Device) -> Tensor<2> {
    let mut flat = Vec::new();
    let mut n = 0;
    let mut width = 0;
    for row in rows {
        width = row.len();
        flat.extend_from_slice(row);
        n += 1;
    }
    Tensor::from_data(TensorData::new(flat, [n, width]), device)
}
