//! Data: image folders, train/val splits, a run's images, transforms, channel statistics,
//! batch loading, and batches as tensors.

pub mod augment;
pub mod cache;
pub mod dataset;
pub mod folder;
pub mod loader;
pub mod split;
pub mod stats;
pub mod tensors;

pub use augment::{AugmentConfig, RgbImage, Transform, load_image};
pub use cache::{CacheMode, ImageCache};
pub use dataset::{RunData, report_skipped};
pub use folder::{ImageFolder, Sample};
pub use loader::{Batch, Loader};
pub use split::{LinkMode, Split, stratified_split, write_split};
pub use stats::{ChannelStats, channel_stats};

/// The largest square side kd resizes images to (far above any classifier's input; larger
/// values would only exhaust memory).
pub const MAX_IMAGE_SIZE: usize = 4096;

/// Refuses an image size of 0 or above [`MAX_IMAGE_SIZE`].
pub fn check_image_size(size: usize) -> anyhow::Result<()> {
    if size == 0 || size > MAX_IMAGE_SIZE {
        anyhow::bail!(
            "image size {size} is invalid: use 1 to {MAX_IMAGE_SIZE} pixels (the recipe uses 224)"
        );
    }
    Ok(())
}
