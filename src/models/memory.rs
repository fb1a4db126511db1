//! What a step needs in host memory, estimated before a run allocates it, so that a size
//! the machine cannot hold is refused with one line instead of growing until the system
//! kills the process.
//!
//! The parameters are counted (without allocating them); the activations of one image are
//! measured with the counting allocator ([`crate::mem`]): a step of the network at batch 1 and
//! at batch 5 on small images, whose difference is four images' share. Convolutions grow
//! with the pixels and attention with their square, so two small sizes give both rates,
//! which are extrapolated to the size asked for. Only on the CPU, and only where the
//! counting allocator is installed (the `kd` binary); elsewhere nothing is checked.

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor};

use super::{ModelSpec, param_count};
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
    let mut parameters = 0u64;
    for role in roles {
        // Built lazily: the count allocates no weights.
        let counted = role.spec.build(classes, size, device)?;
        let bytes_per_parameter = if role.train { 16 } else { 4 };
        parameters += param_count(&counted) as u64 * bytes_per_parameter;
    }
    if parameters > available {
        bail!(
            "the weights of {} (with their optimizer state) need about {}; {} is available: lower --width",
            names.join(" and "),
            bytes(parameters),
            bytes(available)
        );
    }
    let mut probes = Vec::with_capacity(roles.len());
    for role in roles {
        probes.push(Probe::new(role, classes, size, precision, device)?);
    }
    // The batch as the loader makes it, and its copy on the device.
    let input = 2 * 3 * (size * size) as u64 * 4;
    // Attention's relative-position bias is expanded once per step, as large as one image's
    // attention scores: counted as one more image.
    let images = batch as u64 + u64::from(probes.iter().any(|p| p.attention));
    let needed = |per_image: u64| parameters + images * (per_image + input);
    // Most runs fit even if every image's share grew with the square of the pixels
    // (attention's rate): then one probe was enough.
    let worst: u64 = probes.iter().map(Probe::upper).sum();
    if needed(worst) <= available {
        return Ok(());
    }
    let mut per_image = 0u64;
    for probe in &probes {
        per_image += probe.fitted(classes, precision, device)?;
    }
    if needed(per_image) <= available {
        return Ok(());
    }
    let fits = available.saturating_sub(parameters) / (per_image + input).max(1);
    let lower = if fits >= 1 {
        format!("lower --batch-size (about {fits} fits), --image-size or --width")
    } else {
        "lower --image-size or --width (not even one image fits)".to_string()
    };
    bail!(
        "a step of {} at {size}x{size}, batch {batch}, needs about {} ({} for the weights and their optimizer state, {} per image); {} is available: {lower}",
        names.join(" and "),
        bytes(needed(per_image)),
        bytes(parameters),
        bytes(per_image + input),
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

/// One network's share of a step per image: measured at the size itself where that is small,
/// otherwise at a small size and extrapolated.
struct Probe<'a> {
    role: Role<'a>,
    /// The size measured.
    small: usize,
    /// The size asked for.
    size: usize,
    /// One image's share at `small`.
    share: u64,
    /// Whether the family has attention over all of a stage's pixels (its share may grow
    /// with their square); convolutional ones grow with the pixels.
    attention: bool,
}

impl<'a> Probe<'a> {
    fn new(
        role: &Role<'a>,
        classes: usize,
        size: usize,
        precision: Precision,
        device: &Device,
    ) -> Result<Self> {
        let small = (2..=8)
            .map(|k| 32 * k)
            .find(|&s| role.spec.validate(s).is_ok())
            .filter(|&s| size > 2 * s)
            .unwrap_or(size);
        let share = one_image(role, classes, small, precision, device)?;
        Ok(Self {
            role: *role,
            small,
            size,
            share,
            attention: role.spec.family()?.size_dependent,
        })
    }

    fn ratio(&self) -> f64 {
        self.size as f64 / self.small as f64
    }

    /// The most the share at the size asked for can be: growing with the pixels, or for
    /// attention with their square.
    fn upper(&self) -> u64 {
        let power = if self.attention { 4 } else { 2 };
        (self.share as f64 * self.ratio().powi(power)) as u64
    }

    /// The share at the size asked for. With attention, from a second probe at twice
    /// `small`: a·x² + b·x⁴ through both (x = size / small); a difference within
    /// measurement noise is read as no attention term, which the x⁴ would magnify.
    fn fitted(&self, classes: usize, precision: Precision, device: &Device) -> Result<u64> {
        if self.small == self.size || !self.attention {
            return Ok(self.upper());
        }
        let s1 = self.share as f64;
        let s2 = one_image(&self.role, classes, 2 * self.small, precision, device)? as f64;
        let b = if s2 > 4.5 * s1 {
            (s2 - 4.0 * s1) / 12.0
        } else {
            0.0
        };
        let a = (s1 - b).max(s2 / 4.0 - 4.0 * b).max(0.0);
        let x = self.ratio();
        Ok((a * x * x + b * x.powi(4)) as u64)
    }
}

/// One image's share of a step of `role` at `size`: what a forward pass keeps for the
/// backward pass (every activation the graph saved) grows exactly with the batch, unlike the
/// kernels' scratch buffers, so it is measured at batch 1 and 5. Training needs it twice (the
/// activations' gradients come on top, at most as large); inference is counted at it too, an
/// overestimate that keeps the check on the safe side.
fn one_image(
    role: &Role,
    classes: usize,
    size: usize,
    precision: Precision,
    device: &Device,
) -> Result<u64> {
    let saved = |batch: usize| -> Result<u64> {
        let base = crate::mem::in_use().unwrap_or(0);
        let device = device.clone().autodiff();
        let net = role.spec.build(classes, size, &device)?;
        let x = Tensor::<4>::zeros([batch, 3, size, size], &device);
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
    Ok(if role.train { 2 * share } else { share })
}
