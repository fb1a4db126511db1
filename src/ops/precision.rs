//! `--precision`: the dtype the heavy products run in.
//!
//! Mixed precision works like PyTorch's autocast: the device keeps f32 as its float type, so
//! parameters, optimizer state, BatchNorm statistics and loss reductions stay f32, while the
//! convolutions and linear layers cast their inputs and weights to bf16/f16, compute there,
//! and hand f32 back ([`super::autocast`]). Burn 0.22 has no loss scaling, so f16 gradients
//! can underflow; bf16 has f32's range and needs none.

use std::fmt;

use burn::tensor::{DType, FloatDType};
use serde::{Deserialize, Serialize};

/// Precision of the convolutions and linear layers.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bfloat16 autocast (f32 range; no loss scaling needed).
    Bf16,
    /// float16 autocast (no loss scaling in Burn 0.22: gradients may underflow).
    F16,
}

impl Precision {
    /// The dtype the heavy products run in; `None` for f32.
    pub fn compute_dtype(self) -> Option<FloatDType> {
        match self {
            Self::F32 => None,
            Self::Bf16 => Some(FloatDType::BF16),
            Self::F16 => Some(FloatDType::F16),
        }
    }

    /// The tensor dtype of the products.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}
