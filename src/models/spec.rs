//! [`ModelSpec`]: what to build, by model name and shape options, as a run records it.

use anyhow::{Result, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::{Family, Network, Stem, family_of, model_names};

/// What to build: an architecture name plus optional shape overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Architecture name (see `kd models`).
    pub name: String,
    /// Base width (first stage); later stages scale with it. `None` keeps the reference widths.
    /// ResNet: stages `[w, 2w, 4w, 8w]`. CoAtNet: stages s0..s4 `[w, w, 2w, 4w, 8w]` (the
    /// variant's block counts and the 8 x 32 attention heads are kept). MobileNetV3 and
    /// EfficientNet: the stem's channels, every other width scaled alike (torchvision's
    /// `width_mult` = width / 16, or / 32 for EfficientNet).
    #[serde(default)]
    pub width: Option<usize>,
    /// ResNet stem; `None` keeps torchvision's (7x7/2 conv + max pool). Other families have
    /// no stem option.
    #[serde(default)]
    pub stem: Option<Stem>,
}

/// The largest `--width` (base channels; the reference widths are 16 to 192): beyond it
/// the sizes themselves overflow before any memory check could speak.
pub const MAX_WIDTH: usize = 1 << 16;
/// The most classes a classifier may have.
pub const MAX_CLASSES: usize = 1 << 20;

impl ModelSpec {
    /// A reference architecture by name.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            width: None,
            stem: None,
        }
    }

    /// The family that builds this model, or an error listing the known names.
    pub fn family(&self) -> Result<&'static Family> {
        if self.name.is_empty() {
            bail!(
                "no model given: pass --model (or --student), one of {}",
                names()
            );
        }
        family_of(&self.name).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown model '{}': choose one of {} (see `kd models`)",
                self.name,
                names()
            )
        })
    }

    /// Checks the name, the options and the image size without building anything.
    pub fn validate(&self, image_size: usize) -> Result<()> {
        let family = self.family()?;
        match self.width {
            Some(0) => bail!("model width must be at least 1"),
            Some(w) if w > MAX_WIDTH => {
                bail!("model width {w} is too large: use at most {MAX_WIDTH}")
            }
            _ => {}
        }
        crate::data::check_image_size(image_size)?;
        (family.validate)(self, image_size)
    }

    /// Builds the network, freshly initialised, on `device`.
    pub fn build(&self, num_classes: usize, image_size: usize, device: &Device) -> Result<Network> {
        self.validate(image_size)?;
        if num_classes < 2 {
            bail!("a classifier needs at least 2 classes, got {num_classes}");
        }
        if num_classes > MAX_CLASSES {
            bail!(
                "{num_classes} classes are too many: kd builds classifiers of at most {MAX_CLASSES}"
            );
        }
        let net = (self.family()?.build)(self, num_classes, image_size, device)?;
        Ok(super::weights::stable_ids(net, 0))
    }

    /// Refuses a ResNet stem for a family without the option.
    pub fn refuse_stem(&self) -> Result<()> {
        if self.stem.is_some() {
            bail!(
                "the stem option applies to ResNet models only: {} has a fixed stem",
                self.name
            );
        }
        Ok(())
    }
}

fn names() -> String {
    model_names().collect::<Vec<_>>().join(", ")
}
