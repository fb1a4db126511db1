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
pub const KNOWN_MODELS: &[&str] = &["resnet18", "resnet34", "resnet50"];

/// What to build: an architecture name plus optional shape overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Architecture name, one of [`KNOWN_MODELS`].
    pub name: String,
    /// Base width (first stage); later stages double it. `None` keeps the reference widths.
    #[serde(default)]
    pub width: Option<usize>,
    /// ResNet stem; `None` keeps torchvision's (7x7/2 conv + max pool).
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
    pub fn validate(&self, image_size: usize) -> Result<()> {
        self.resnet_config(2)?;
        if image_size < 32 {
            bail!(
                "image size {image_size} is too small for {}: use at least 32",
                self.name
            );
        }
        if self.width == Some(0) {
            bail!("model width must be at least 1");
        }
        Ok(())
    }

    fn resnet_config(&self, num_classes: usize) -> Result<ResNetConfig> {
        let depth = match self.name.as_str() {
            "resnet18" => 18,
            "resnet34" => 34,
            "resnet50" => 50,
            other => bail!(
                "unknown model '{other}': choose one of {} (see `kd models`)",
                KNOWN_MODELS.join(", ")
            ),
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
        Ok(Network::ResNet(
            self.resnet_config(num_classes)?.init(device),
        ))
    }
}

/// A classifier network of any supported architecture.
#[derive(Module, Debug)]
pub enum Network {
    /// torchvision-style ResNet.
    ResNet(ResNet),
}

impl Network {
    /// Logits `[batch, classes]` for normalized images `[batch, 3, h, w]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Network::ResNet(m) => m.forward(images),
        }
    }
}

/// Number of trainable values (weights and biases; BatchNorm running statistics excluded,
/// like PyTorch's `sum(p.numel() for p in model.parameters())`).
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
                self.count += param.shape().num_elements();
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
