//! Data: image folders, train/val splits, transforms, channel statistics and batch loading.

pub mod augment;
pub mod cache;
pub mod folder;
pub mod loader;
pub mod split;
pub mod stats;

pub use augment::{AugmentConfig, RgbImage, Transform, load_image};
pub use cache::{CacheMode, ImageCache};
pub use folder::{ImageFolder, Sample};
pub use loader::{Batch, Loader};
pub use split::{LinkMode, Split, stratified_split, write_split};
pub use stats::{ChannelStats, channel_stats};
