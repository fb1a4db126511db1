//! Model zoo. Each family is one file implementing [`Architecture`] (the names and sizes it
//! accepts, building, `forward_features` → pooled features and `forward_head` → logits, the
//! PyTorch key renames, the ONNX graph) and one line of the registry below, which declares its module, makes
//! it a variant of [`Network`] and lists it in [`FAMILIES`]. Models compute through
//! [`crate::ops::Ctx`], so they get kd's CPU kernels and autocast without naming them.

pub mod blocks;
pub mod memory;
pub mod onnx;
mod spec;
pub mod weights;

use anyhow::Result;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::ops::Ctx;
use onnx::{Graph, Value};

pub use coatnet::{CoAtNet, CoAtNetConfig};
pub use resnet::{ResNet, ResNetConfig, Stem};
pub use spec::{MAX_CLASSES, MAX_WIDTH, ModelSpec};

/// A key rename for PyTorch state dicts: a regex on the key and its replacement (`${1}` for
/// capture groups), applied in order, each to the result of the previous ones.
pub type Remap = (&'static str, &'static str);

/// What a model family provides. Implemented by the family's network module.
pub trait Architecture: Module + Sized {
    /// The model names it builds (what `--model` takes), e.g. `resnet18`.
    const NAMES: &'static [&'static str];
    /// What `kd models` says of it.
    const DESCRIPTION: &'static str;
    /// PyTorch state-dict keys to kd's (`.safetensors`/`.pth` loading).
    const FROM_TORCH: &'static [Remap];
    /// kd's keys to the PyTorch state dict's (export).
    const TO_TORCH: &'static [Remap];
    /// kd's path prefix of the classifier's last layer, which starts fresh when a state dict
    /// was trained on other classes (fine-tuning).
    const HEAD: &'static str;
    /// Whether the parameter count depends on the image size (most families pool globally
    /// before the head; CoAtNet's relative-position tables follow the size).
    const SIZE_DEPENDENT: bool = false;

    /// Checks the spec's options against the image size without building anything (the name
    /// is one of [`Self::NAMES`]).
    fn validate(spec: &ModelSpec, image_size: usize) -> Result<()>;

    /// The network, freshly initialised on `device` (the spec is valid).
    fn build(
        spec: &ModelSpec,
        num_classes: usize,
        image_size: usize,
        device: &Device,
    ) -> Result<Self>;

    /// Pooled features `[batch, features]` (what the classifier head reads) of normalized
    /// images `[batch, 3, h, w]`.
    fn forward_features(&self, images: Tensor<4>, cx: &Ctx) -> Tensor<2>;

    /// Logits `[batch, classes]` of pooled features.
    fn forward_head(&self, features: Tensor<2>, cx: &Ctx) -> Tensor<2>;

    /// The size of the pooled features.
    fn num_features(&self) -> usize;

    /// The network in inference (BatchNorm with its running statistics, no dropout) as ONNX
    /// nodes added to `g`: the logits of the normalized images `x` of side `image_size`,
    /// the function `forward_head(forward_features(x))` computes.
    fn to_onnx(&self, g: &mut Graph, x: Value, image_size: usize) -> Result<Value>;
}

/// A registered family: its [`Architecture`] items, reachable without knowing its type.
pub struct Family {
    /// Model names.
    pub names: &'static [&'static str],
    /// What `kd models` says of it.
    pub description: &'static str,
    /// PyTorch → kd key renames.
    pub from_torch: &'static [Remap],
    /// kd → PyTorch key renames.
    pub to_torch: &'static [Remap],
    /// kd's prefix of the classifier's last layer.
    pub head: &'static str,
    /// Whether the parameter count depends on the image size.
    pub size_dependent: bool,
    validate: fn(&ModelSpec, usize) -> Result<()>,
    build: fn(&ModelSpec, usize, usize, &Device) -> Result<Network>,
}

/// Declares the families: `module::Type` for each, `Type` implementing [`Architecture`].
macro_rules! registry {
    ($($module:ident :: $ty:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// A classifier network of any registered family. (Its variant names are part of
        /// kd's checkpoint keys: never rename one.)
        // One network lives per model, so the size of the largest variant costs nothing.
        #[allow(clippy::large_enum_variant)]
        #[derive(Module, Debug)]
        pub enum Network {
            $(
                #[doc = concat!("`", stringify!($module), "`")]
                $ty($module::$ty),
            )*
        }

        /// Every registered family.
        pub static FAMILIES: &[Family] = &[$(
            Family {
                names: <$module::$ty as Architecture>::NAMES,
                description: <$module::$ty as Architecture>::DESCRIPTION,
                from_torch: <$module::$ty as Architecture>::FROM_TORCH,
                to_torch: <$module::$ty as Architecture>::TO_TORCH,
                head: <$module::$ty as Architecture>::HEAD,
                size_dependent: <$module::$ty as Architecture>::SIZE_DEPENDENT,
                validate: <$module::$ty as Architecture>::validate,
                build: |spec, classes, size, device| {
                    <$module::$ty as Architecture>::build(spec, classes, size, device)
                        .map(Network::$ty)
                },
            },
        )*];

        impl Network {
            /// Pooled features `[batch, features]` of normalized images `[batch, 3, h, w]`.
            pub fn forward_features(&self, images: Tensor<4>, cx: &Ctx) -> Tensor<2> {
                match self {
                    $(Self::$ty(m) => m.forward_features(images, cx),)*
                }
            }

            /// Logits `[batch, classes]` of pooled features.
            pub fn forward_head(&self, features: Tensor<2>, cx: &Ctx) -> Tensor<2> {
                match self {
                    $(Self::$ty(m) => m.forward_head(features, cx),)*
                }
            }

            /// The size of the pooled features.
            pub fn num_features(&self) -> usize {
                match self {
                    $(Self::$ty(m) => m.num_features(),)*
                }
            }

            /// The network as ONNX nodes (see [`Architecture::to_onnx`]).
            pub fn to_onnx(&self, g: &mut Graph, x: Value, image_size: usize) -> Result<Value> {
                match self {
                    $(Self::$ty(m) => m.to_onnx(g, x, image_size),)*
                }
            }

            /// The family this network belongs to.
            pub fn family(&self) -> &'static Family {
                let names = match self {
                    $(Self::$ty(_) => <$module::$ty as Architecture>::NAMES,)*
                };
                FAMILIES
                    .iter()
                    .find(|f| f.names == names)
                    .expect("every variant is registered")
            }
        }
    };
}

registry! {
    resnet::ResNet,
    coatnet::CoAtNet,
    mobilenet_v3::MobileNetV3,
    efficientnet::EfficientNet,
}

/// What a network computes for a batch: logits and pooled features.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// Logits `[batch, classes]`.
    pub logits: Tensor<2>,
    /// Pooled features `[batch, features]`; `None` where they were not kept (a teacher's
    /// cached logits for a method that reads no features).
    pub features: Option<Tensor<2>>,
}

impl Network {
    /// Logits `[batch, classes]` of normalized images `[batch, 3, h, w]`.
    pub fn forward(&self, images: Tensor<4>, cx: &Ctx) -> Tensor<2> {
        self.forward_head(self.forward_features(images, cx), cx)
    }

    /// Pooled features and logits of normalized images.
    pub fn outputs(&self, images: Tensor<4>, cx: &Ctx) -> Outputs {
        let features = self.forward_features(images, cx);
        let logits = self.forward_head(features.clone(), cx);
        Outputs {
            logits,
            features: Some(features),
        }
    }
}

/// The family that builds the model `name`.
pub fn family_of(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.names.contains(&name))
}

/// Every model name, family by family.
pub fn model_names() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().flat_map(|f| f.names.iter().copied())
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
