//! In-memory cache of decoded images (`--cache-images`), so that epochs after the first skip
//! PNG/JPEG decoding (and, in `resized` mode, the resize from the original resolution).
//!
//! Images are held as 8-bit RGB, which is what decoding produces (`to_rgb8`), so `decoded`
//! mode returns exactly the pixels a fresh decode would. `resized` mode stores each image
//! already resized to the training size (rounded to 8 bits), so augmentation then runs on
//! the small image: faster, and equal to a torchvision pipeline that resizes first. Every
//! image is rounded the same way whether it comes from the cache or not, so batches do not
//! depend on what the cache held (a resumed run replays exactly). Images beyond the memory
//! budget are decoded every time.

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::augment::{RgbImage, load_image, resize_crop};

/// What `--cache-images` keeps in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Decode every image every epoch.
    #[default]
    Off,
    /// Keep decoded images at their original size (exactly what decoding gives).
    Decoded,
    /// Keep images decoded and resized to the training size; augmentation runs after the resize.
    Resized,
}

/// An 8-bit RGB image.
struct Rgb8 {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl Rgb8 {
    fn from_image(img: &RgbImage) -> Self {
        let data = img
            .data
            .iter()
            .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        Self {
            width: img.width,
            height: img.height,
            data,
        }
    }

    fn to_image(&self) -> RgbImage {
        RgbImage {
            width: self.width,
            height: self.height,
            data: self.data.iter().map(|&v| f32::from(v) / 255.0).collect(),
        }
    }
}

/// Per-sample cache slots with a memory budget.
pub struct ImageCache {
    mode: CacheMode,
    size: (usize, usize),
    slots: Vec<OnceLock<Rgb8>>,
    budget: usize,
    used: AtomicUsize,
}

impl ImageCache {
    /// A cache for `samples` images; `size` is the training `(height, width)` for `resized`.
    pub fn new(mode: CacheMode, samples: usize, size: (usize, usize), budget_mib: usize) -> Self {
        Self {
            mode,
            size,
            slots: (0..samples).map(|_| OnceLock::new()).collect(),
            budget: budget_mib.saturating_mul(1 << 20),
            used: AtomicUsize::new(0),
        }
    }

    /// The image of sample `index` (file `path`), from the cache or freshly decoded.
    pub fn get(&self, index: usize, path: &Path) -> Result<RgbImage> {
        if self.mode == CacheMode::Off {
            return load_image(path);
        }
        if let Some(hit) = self.slots[index].get() {
            return Ok(hit.to_image());
        }
        let img = load_image(path)?;
        let img = match self.mode {
            CacheMode::Resized => resize_crop(&img, None, self.size.1, self.size.0),
            _ => img,
        };
        let pixels = Rgb8::from_image(&img);
        // Decoded images are already 8-bit exact; resized ones take the rounding the cache
        // gives them, so that they are the same whether served from memory or not.
        let img = match self.mode {
            CacheMode::Resized => pixels.to_image(),
            _ => img,
        };
        let bytes = pixels.data.len();
        if self.used.fetch_add(bytes, Ordering::Relaxed) + bytes <= self.budget {
            // A concurrent insert of the same sample leaves the first one in place.
            if self.slots[index].set(pixels).is_err() {
                self.used.fetch_sub(bytes, Ordering::Relaxed);
            }
        } else {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
        }
        Ok(img)
    }

    /// Images held.
    pub fn cached(&self) -> usize {
        self.slots.iter().filter(|s| s.get().is_some()).count()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32) {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        });
        img.save(path).unwrap();
    }

    #[test]
    fn decoded_mode_returns_exactly_the_decoded_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        write_png(&path, 40, 30);
        let cache = ImageCache::new(CacheMode::Decoded, 1, (16, 16), 64);
        let fresh = load_image(&path).unwrap();
        assert_eq!(cache.get(0, &path).unwrap(), fresh);
        std::fs::remove_file(&path).unwrap();
        // Served from memory now that the file is gone.
        assert_eq!(cache.get(0, &path).unwrap(), fresh);
        assert_eq!((cache.cached(), cache.bytes()), (1, 40 * 30 * 3));
    }

    #[test]
    fn resized_mode_is_the_same_before_and_after_caching() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        write_png(&path, 50, 20);
        let cache = ImageCache::new(CacheMode::Resized, 1, (8, 12), 64);
        let first = cache.get(0, &path).unwrap();
        assert_eq!((first.width, first.height), (12, 8));
        assert_eq!(cache.get(0, &path).unwrap(), first);
    }

    #[test]
    fn images_over_the_budget_are_decoded_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        write_png(&path, 1000, 400); // 1.2 MB decoded, budget 1 MiB
        let cache = ImageCache::new(CacheMode::Decoded, 1, (16, 16), 1);
        cache.get(0, &path).unwrap();
        assert_eq!((cache.cached(), cache.bytes()), (0, 0));
    }
}
