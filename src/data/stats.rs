//! Per-channel mean and standard deviation of a set of images (`kd stats`).

use anyhow::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::augment::{load_image, resize_crop};
use super::folder::Sample;

/// Channel statistics of images in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// Mean per channel (R, G, B).
    pub mean: [f32; 3],
    /// Standard deviation per channel over all pixels.
    pub std: [f32; 3],
    /// Number of images measured.
    pub images: usize,
}

/// Computes mean and std over all pixels of the samples, each resized to `size` first when
/// given (what the model sees), in `f64` to avoid cancellation.
pub fn channel_stats(samples: &[Sample], size: Option<usize>) -> Result<ChannelStats> {
    let sums = samples
        .par_iter()
        .map(|s| -> Result<[f64; 7]> {
            let mut img = load_image(&s.path)?;
            if let Some(n) = size {
                img = resize_crop(&img, None, n, n);
            }
            let mut acc = [0.0f64; 7];
            for p in img.data.chunks_exact(3) {
                for c in 0..3 {
                    let v = f64::from(p[c]);
                    acc[c] += v;
                    acc[3 + c] += v * v;
                }
            }
            acc[6] = (img.width * img.height) as f64;
            Ok(acc)
        })
        .try_reduce(
            || [0.0; 7],
            |a, b| {
                let mut r = a;
                r.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                Ok(r)
            },
        )?;
    let n = sums[6].max(1.0);
    let mut mean = [0.0; 3];
    let mut std = [0.0; 3];
    for c in 0..3 {
        let m = sums[c] / n;
        mean[c] = m as f32;
        std[c] = ((sums[3 + c] / n - m * m).max(0.0)).sqrt() as f32;
    }
    Ok(ChannelStats {
        mean,
        std,
        images: samples.len(),
    })
}
