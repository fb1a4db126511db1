//! Evaluation and prediction with a trained network.

use anyhow::Result;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::{Batch, Loader};
use crate::losses::cross_entropy;
use crate::metrics::{ConfusionMatrix, Evaluation};
use crate::models::Network;

/// What `kd eval` writes and prints: an evaluation and what it evaluated.
#[derive(Debug, Serialize)]
pub struct EvalReport<'a> {
    /// Run folder.
    pub run: &'a std::path::Path,
    /// Checkpoint name (best or final).
    pub checkpoint: &'a str,
    /// The epoch that checkpoint holds, when the run's metrics say.
    pub epoch: Option<usize>,
    /// The images' folder.
    pub data: &'a std::path::Path,
    /// Whether the images were the run's validation split of `data` (else all of `data`).
    pub validation_split: bool,
    /// The scores.
    #[serde(flatten)]
    pub evaluation: &'a Evaluation,
}

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

/// Logits of a batch as a host array `[batch][classes]`.
pub fn logits_rows(logits: Tensor<2>) -> Result<Vec<Vec<f32>>> {
    let [_, c] = logits.dims();
    let flat: Vec<f32> = logits
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("cannot read logits: {e:?}"))?;
    Ok(flat.chunks(c).map(<[f32]>::to_vec).collect())
}

/// Evaluates `net` (in inference mode, on a plain device) over a loader.
pub fn evaluate(
    net: &Network,
    loader: &Loader,
    classes: &[String],
    device: &Device,
) -> Result<Evaluation> {
    let mut confusion = ConfusionMatrix::new(classes.len());
    let mut loss_sum = 0.0f64;
    for batch in loader.epoch(0, 0) {
        let mut batch = batch?;
        let logits = net.forward(take_images_tensor(&mut batch, device));
        let loss: f32 = cross_entropy(logits.clone(), labels_tensor(&batch, device)).into_scalar();
        loss_sum += f64::from(loss) * batch.len() as f64;
        for (row, &label) in logits_rows(logits)?.iter().zip(&batch.labels) {
            confusion.add(label as usize, argmax(row));
        }
    }
    let n = confusion.total().max(1) as f64;
    Ok(confusion.evaluation(classes, loss_sum / n))
}

/// Index of the largest value (first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// One class and its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Class name.
    pub class: String,
    /// Softmax probability.
    pub probability: f32,
}

/// Top-k prediction of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Image path.
    pub path: String,
    /// Most probable classes, best first.
    pub top: Vec<Scored>,
}

/// Top-k predictions for every sample of a (non-shuffled) loader.
pub fn predict(
    net: &Network,
    loader: &Loader,
    classes: &[String],
    k: usize,
    device: &Device,
) -> Result<Vec<Prediction>> {
    let mut out = Vec::with_capacity(loader.len());
    for batch in loader.epoch(0, 0) {
        let mut batch = batch?;
        let probs = softmax(net.forward(take_images_tensor(&mut batch, device)), 1);
        for (row, &i) in logits_rows(probs)?.iter().zip(&batch.indices) {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            out.push(Prediction {
                path: loader.samples()[i].path.display().to_string(),
                top: order
                    .into_iter()
                    .take(k.max(1))
                    .map(|c| Scored {
                        class: classes[c].clone(),
                        probability: row[c],
                    })
                    .collect(),
            });
        }
    }
    Ok(out)
}
