//! Model zoo: architectures by name, building, parameter counts and weight files.

pub mod coatnet;
pub mod resnet;
pub mod weights;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use coatnet::{CoAtNet, CoAtNetConfig};
pub use resnet::{BlockKind, ResNet, ResNetConfig, Stem};

/// Architectures `kd` knows, by name.
pub const KNOWN_MODELS: &[&str] = &[
    "resnet18",
    "resnet34",
    "resnet50",
    "coatnet_0",
    "coatnet_1",
    "coatnet_2",
    "coatnet_3",
    "coatnet_4",
];

/// Architecture family and variant, from a model name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    /// ResNet of this depth.
    ResNet(usize),
    /// `coatnet_<n>`.
    CoAtNet(usize),
}

/// What to build: an architecture name plus optional shape overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Architecture name, one of [`KNOWN_MODELS`].
    pub name: String,
    /// Base width (first stage); later stages double it. `None` keeps the reference widths.
    /// ResNet: stages `[w, 2w, 4w, 8w]`. CoAtNet: stages s0..s4 `[w, w, 2w, 4w, 8w]`
    /// (the variant's block counts and the 8 x 32 attention heads are kept).
    #[serde(default)]
    pub width: Option<usize>,
    /// ResNet stem; `None` keeps torchvision's (7x7/2 conv + max pool). CoAtNet has no
    /// stem option.
    #[serde(default)]
    pub stem: Option<Stem>,
}

impl ModelSpec {
    /// A reference architecture by name.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            width: None,
            stem: None,
        }
    }

    /// Checks the name and options without building anything.
    /// CoAtNet needs an image size that is a multiple of 32; ResNet at least its stem's
    /// total stride (32 with torchvision's stem, 8 with the small one).
    pub fn validate(&self, image_size: usize) -> Result<()> {
        let arch = self.arch()?;
        if self.width == Some(0) {
            bail!("model width must be at least 1");
        }
        crate::data::check_image_size(image_size)?;
        match arch {
            Arch::ResNet(_) => {
                // The last stage must see at least one pixel that is not padding.
                let (min, stem) = match self.stem.unwrap_or(Stem::Imagenet) {
                    Stem::Imagenet => (32, "imagenet"),
                    Stem::Small => (8, "small"),
                };
                if image_size < min {
                    bail!(
                        "image size {image_size} is too small for {} with the {stem} stem: \
                         use at least {min}{}",
                        self.name,
                        if min > 8 {
                            " (or --stem small, from 8)"
                        } else {
                            ""
                        }
                    );
                }
            }
            Arch::CoAtNet(_) => {
                if self.stem.is_some() {
                    bail!(
                        "the stem option applies to ResNet models only: {} has a fixed stem",
                        self.name
                    );
                }
                self.coatnet_config(2, image_size)?.validate()?;
            }
        }
        Ok(())
    }

    fn arch(&self) -> Result<Arch> {
        Ok(match self.name.as_str() {
            "resnet18" => Arch::ResNet(18),
            "resnet34" => Arch::ResNet(34),
            "resnet50" => Arch::ResNet(50),
            "coatnet_0" => Arch::CoAtNet(0),
            "coatnet_1" => Arch::CoAtNet(1),
            "coatnet_2" => Arch::CoAtNet(2),
            "coatnet_3" => Arch::CoAtNet(3),
            "coatnet_4" => Arch::CoAtNet(4),
            other => bail!(
                "unknown model '{other}': choose one of {} (see `kd models`)",
                KNOWN_MODELS.join(", ")
            ),
        })
    }

    /// The CoAtNet this spec builds for `num_classes` classes and square images of side
    /// `image_size`: the reference variant with the tutorial's head (with bias) and the
    /// width override applied. Errors for a non-CoAtNet name; the size is not checked here.
    pub fn coatnet_config(&self, num_classes: usize, image_size: usize) -> Result<CoAtNetConfig> {
        let Arch::CoAtNet(variant) = self.arch()? else {
            bail!("{} is not a CoAtNet", self.name);
        };
        let mut cfg = CoAtNetConfig::variant(variant)
            .expect("known variant")
            .with_head(num_classes, true)
            .with_image_size(image_size, image_size);
        if let Some(w) = self.width {
            cfg.channels = [w, w, 2 * w, 4 * w, 8 * w];
        }
        Ok(cfg)
    }

    fn resnet_config(&self, num_classes: usize) -> Result<ResNetConfig> {
        let Arch::ResNet(depth) = self.arch()? else {
            bail!("{} is not a ResNet", self.name);
        };
        let mut cfg = ResNetConfig::torchvision(depth, num_classes).expect("known depth");
        if let Some(w) = self.width {
            cfg.widths = [w, 2 * w, 4 * w, 8 * w];
        }
        if let Some(stem) = self.stem {
            cfg.stem = stem;
        }
        Ok(cfg)
    }

    /// Builds the network, freshly initialised, on `device`.
    pub fn build(&self, num_classes: usize, image_size: usize, device: &Device) -> Result<Network> {
        self.validate(image_size)?;
        if num_classes < 2 {
            bail!("a classifier needs at least 2 classes, got {num_classes}");
        }
        Ok(match self.arch()? {
            Arch::ResNet(_) => Network::ResNet(self.resnet_config(num_classes)?.init(device)),
            Arch::CoAtNet(_) => Network::CoAtNet(
                self.coatnet_config(num_classes, image_size)?
                    .try_init(device)?,
            ),
        })
    }

    /// Whether this is one of the CoAtNet teachers.
    pub fn is_coatnet(&self) -> bool {
        matches!(self.arch(), Ok(Arch::CoAtNet(_)))
    }
}

/// A classifier network of any supported architecture.
// One network lives per model, so the ResNet variant's inline layer configs cost nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Network {
    /// torchvision-style ResNet.
    ResNet(ResNet),
    /// CoAtNet with the reference implementation's structure.
    CoAtNet(CoAtNet),
}

impl Network {
    /// Logits `[batch, classes]` for normalized images `[batch, 3, h, w]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Network::ResNet(m) => m.forward(images),
            Network::CoAtNet(m) => m.forward(images),
        }
    }
}

/// Number of trainable values (weights and biases; BatchNorm running statistics and integer
/// buffers such as CoAtNet's `relative_index` excluded, like PyTorch's
/// `sum(p.numel() for p in model.parameters())`). Reads shapes without initialising lazy
/// parameters, so counting a large freshly built model allocates nothing.
pub fn param_count<M: Module>(net: &M) -> usize {
    struct Counter {
        path: Vec<String>,
        count: usize,
    }
    impl burn::module::ModuleVisitor for Counter {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let running = matches!(
                self.path.last().map(String::as_str),
                Some("running_mean" | "running_var")
            );
            if !running {
                self.count += param.lazy_shape().num_elements();
            }
        }
    }
    let mut counter = Counter {
        path: Vec::new(),
        count: 0,
    };
    net.visit(&mut counter);
    counter.count
}
