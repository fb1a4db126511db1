//! What a step needs in host memory, estimated before a run allocates it, so that a size
//! the machine cannot hold is refused with one line instead of growing until the system
//! kills the process.
//!
//! The parameters are counted (without allocating them). The activations of one image are
//! measured with the counting allocator ([`crate::mem`]) on small images, batch 1 against
//! batch 5, and grow with the pixels. Attention over all of a stage's pixels (CoAtNet's
//! relative-position attention) grows with their square, too little at a probe's size to
//! measure: its score maps and relative-position tables are counted from the shapes of its
//! `relative_index` and `relative_bias_table` (`heads · n²` per block, `n` the stage's
//! pixels). Only on the CPU, and only where the counting allocator is installed (the `kd`
//! binary); elsewhere nothing is checked.

use anyhow::{Result, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Int, Tensor};

use super::{ModelSpec, Network, param_count};
use crate::ops::{Ctx, Precision};

/// A network in a step: training (forward and backward, weights with gradients and Adam's
/// two moments) or inference.
#[derive(Debug, Clone, Copy)]
pub struct Role<'a> {
    /// The network.
    pub spec: &'a ModelSpec,
    /// Whether it trains.
    pub train: bool,
}

/// What one step of `roles` at `size` x `size`, batch `batch`, needs, against what the system
/// has available; refused, naming the estimate and what to lower, when it does not fit.
pub fn check_step(
    roles: &[Role],
    (classes, size, batch): (usize, usize, usize),
    precision: Precision,
    device: &Device,
) -> Result<()> {
    if crate::mem::in_use().is_none() || !crate::ops::flex::is_flex_device(device) {
        return Ok(());
    }
    let Some(available) = crate::mem::available() else {
        return Ok(());
    };
    let names: Vec<&str> = roles.iter().map(|r| r.spec.name.as_str()).collect();
    let (mut fixed, mut per_image) = (0u64, 0u64);
    for role in roles {
        // Built lazily: counting allocates no weights or index tables.
        let net = role.spec.build(classes, size, device)?;
        let bytes_per_parameter = if role.train { 16 } else { 4 };
        fixed += param_count(&net) as u64 * bytes_per_parameter;
        let attention = Attention::of(&net);
        // Per step: each block's int64 index (n²) and its expanded bias (heads · n², twice:
        // gathered and permuted).
        fixed += attention.positions * 8 + attention.scores * 4 * 2;
        // Per image: the scores before and after the softmax, and in training their
        // gradients.
        per_image += attention.scores * 4 * if role.train { 4 } else { 2 };
    }
    if fixed > available {
        bail!(
            "the weights of {} (with their optimizer state and attention tables) need about {}; {} is available: lower --width or --image-size",
            names.join(" and "),
            bytes(fixed),
            bytes(available)
        );
    }
    for role in roles {
        per_image += activations(role, classes, size, precision, device)?;
    }
    // The batch as the loader makes it, and its copy on the device.
    let per_image = per_image + 2 * 3 * (size * size) as u64 * 4;
    let needed = fixed.saturating_add((batch as u64).saturating_mul(per_image));
    if needed <= available {
        return Ok(());
    }
    let fits = (available - fixed) / per_image.max(1);
    let lower = if fits >= 1 {
        format!("lower --batch-size (about {fits} fits), --image-size or --width")
    } else {
        "lower --image-size or --width (not even one image fits)".to_string()
    };
    bail!(
        "a step of {} at {size}x{size}, batch {batch}, needs about {} ({} for the weights, their optimizer state and tables, {} per image); {} is available: {lower}",
        names.join(" and "),
        bytes(needed),
        bytes(fixed),
        bytes(per_image),
        bytes(available)
    )
}

/// `b` bytes in GiB, or MiB below one GiB.
fn bytes(b: u64) -> String {
    let mib = b as f64 / (1u64 << 20) as f64;
    if mib < 1024.0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{:.1} GiB", mib / 1024.0)
    }
}

/// The sizes of a network's relative-position attention, from its parameters' shapes.
#[derive(Default)]
struct Attention {
    /// Σ n² over the blocks (entries of their `relative_index`).
    positions: u64,
    /// Σ heads · n² over the blocks (entries of one image's attention scores).
    scores: u64,
    /// The head count of the last `relative_bias_table` seen.
    heads: u64,
    path: Vec<String>,
}

impl Attention {
    fn of(net: &Network) -> Self {
        let mut a = Self::default();
        net.visit(&mut a);
        a
    }
}

impl ModuleVisitor for Attention {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.path.last().is_some_and(|p| p == "relative_bias_table") {
            self.heads = param.lazy_shape().dims::<2>()[1] as u64;
        }
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
        if self.path.last().is_some_and(|p| p == "relative_index") {
            let n2 = param.lazy_shape().num_elements() as u64;
            self.positions += n2;
            self.scores += self.heads * n2;
        }
    }
}

/// One image's activations in a step of `role` at `size`: measured at the size itself where
/// that is small, otherwise at the smallest size the model takes from 64 pixels and scaled
/// with the pixels. What a forward pass keeps for the backward pass (every activation the
/// graph saved) grows exactly with the batch, unlike the kernels' scratch buffers, so it is
/// measured at batch 1 and 5. Training needs it twice (the activations' gradients come on
/// top, at most as large); inference is counted at it too, an overestimate that keeps the
/// check on the safe side.
fn activations(
    role: &Role,
    classes: usize,
    size: usize,
    precision: Precision,
    device: &Device,
) -> Result<u64> {
    let small = (2..=8)
        .map(|k| 32 * k)
        .find(|&s| role.spec.validate(s).is_ok())
        .filter(|&s| size > s)
        .unwrap_or(size);
    let saved = |batch: usize| -> Result<u64> {
        let base = crate::mem::in_use().unwrap_or(0);
        let device = device.clone().autodiff();
        let net = role.spec.build(classes, small, &device)?;
        let x = Tensor::<4>::zeros([batch, 3, small, small], &device);
        let logits = net.forward(x, &Ctx::new(precision));
        let after = crate::mem::in_use().unwrap_or(0);
        drop((logits, net));
        Ok(after.saturating_sub(base) as u64)
    };
    // Four images' difference, so that the share stands above the allocator's rounding.
    // A first pass grows the kernels' kept scratch buffers, which then count in neither.
    saved(5)?;
    let (one, five) = (saved(1)?, saved(5)?);
    let share = five.saturating_sub(one) / 4;
    let share = if role.train { 2 * share } else { share };
    let ratio = size as f64 / small as f64;
    Ok((share as f64 * ratio * ratio) as u64)
}
