//! Parallel, prefetching batch loader. Decoding and augmentation run on rayon worker
//! threads; a producer thread keeps `prefetch` batches ready so training does not wait.
//!
//! Determinism: the shuffle of an epoch and the augmentation of each image are derived
//! from `(seed, epoch, index)` alone, so the batches are identical whatever the thread
//! count or scheduling, and an epoch can be replayed exactly on resume.

use rayon::Yield;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Result;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::augment::Transform;
use super::cache::{CacheMode, ImageCache};
use super::folder::Sample;

/// A batch ready for the model: images as normalized NCHW `f32`, labels, and indices of
/// the samples in the dataset.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `len * 3 * h * w` values.
    pub images: Vec<f32>,
    /// Class index per image.
    pub labels: Vec<i64>,
    /// Index of each image in the loader's sample list.
    pub indices: Vec<usize>,
    /// `(height, width)` of each image.
    pub size: (usize, usize),
}

impl Batch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Mixes seed, epoch and index into one RNG seed (SplitMix64 finaliser).
pub fn mix_seed(seed: u64, epoch: u64, index: u64) -> u64 {
    let mut z = seed
        ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ index.wrapping_mul(0xD1B5_4A32_D192_ED69);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Loads batches of samples through a transform.
#[derive(Clone)]
pub struct Loader {
    samples: Arc<Vec<Sample>>,
    transform: Arc<Transform>,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    prefetch: usize,
    cache: Arc<ImageCache>,
}

impl Loader {
    /// A loader over `samples`. `shuffle` reorders each epoch (training).
    pub fn new(
        samples: Vec<Sample>,
        transform: Transform,
        batch_size: usize,
        shuffle: bool,
        seed: u64,
    ) -> Self {
        Self {
            samples: Arc::new(samples),
            transform: Arc::new(transform),
            batch_size: batch_size.max(1),
            shuffle,
            seed,
            prefetch: 2,
            cache: Arc::new(ImageCache::new(CacheMode::Off, 0, (0, 0), 0)),
        }
    }

    /// Keeps decoded images in memory (up to `budget_mib`) for the following epochs.
    pub fn with_cache(mut self, mode: CacheMode, budget_mib: usize) -> Self {
        let samples = if mode == CacheMode::Off {
            0
        } else {
            self.samples.len()
        };
        self.cache = Arc::new(ImageCache::new(
            mode,
            samples,
            self.transform.size,
            budget_mib,
        ));
        self
    }

    /// The image cache (empty unless [`Loader::with_cache`] turned it on).
    pub fn cache(&self) -> &ImageCache {
        &self.cache
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of batches per epoch.
    pub fn num_batches(&self) -> usize {
        self.samples.len().div_ceil(self.batch_size)
    }

    /// The samples, in dataset order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Order in which an epoch visits the samples.
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        if self.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(
                self.seed,
                epoch as u64,
                u64::MAX,
            )));
        }
        order
    }

    /// Loads one batch of the given sample indices (in parallel).
    pub fn load_batch(&self, indices: &[usize], epoch: usize) -> Result<Batch> {
        let (h, w) = self.transform.size;
        let per = 3 * h * w;
        let mut images = vec![0.0f32; indices.len() * per];
        images
            .par_chunks_mut(per)
            .zip(indices.par_iter())
            .try_for_each(|(out, &i)| -> Result<()> {
                let img = self.cache.get(i, &self.samples[i].path)?;
                let mut rng =
                    ChaCha8Rng::seed_from_u64(mix_seed(self.seed, epoch as u64, i as u64));
                self.transform.apply(img, &mut rng, out);
                Ok(())
            })?;
        Ok(Batch {
            images,
            labels: indices
                .iter()
                .map(|&i| self.samples[i].label as i64)
                .collect(),
            indices: indices.to_vec(),
            size: (h, w),
        })
    }

    /// Iterates over the batches of an epoch, produced ahead on a background thread.
    /// `skip_batches` starts part-way through (resume within an epoch).
    pub fn epoch(&self, epoch: usize, skip_batches: usize) -> EpochIter {
        let order = self.epoch_order(epoch);
        let chunks: Vec<Vec<usize>> = order
            .chunks(self.batch_size)
            .skip(skip_batches)
            .map(<[usize]>::to_vec)
            .collect();
        let (tx, rx) = sync_channel(self.prefetch);
        let this = self.clone();
        let handle = std::thread::spawn(move || {
            for chunk in chunks {
                let batch = this.load_batch(&chunk, epoch);
                let stop = batch.is_err();
                if tx.send(batch).is_err() || stop {
                    break;
                }
            }
        });
        EpochIter {
            rx,
            handle: Some(handle),
        }
    }
}

/// How long [`EpochIter`] sleeps before looking for decoding work again.
const WAIT: Duration = Duration::from_micros(200);

/// Batches of one epoch; see [`Loader::epoch`].
pub struct EpochIter {
    rx: Receiver<Result<Batch>>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.rx.try_recv() {
                Ok(b) => return Some(b),
                Err(TryRecvError::Disconnected) => break,
                // On a rayon worker (where kd runs its commands) help decode the batch rather
                // than block one of the threads its images are decoded on.
                Err(TryRecvError::Empty) if rayon::yield_now() == Some(Yield::Executed) => {}
                Err(TryRecvError::Empty) => match self.rx.recv_timeout(WAIT) {
                    Ok(b) => return Some(b),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            }
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        None
    }
}
