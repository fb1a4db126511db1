//! What the methods compute on logits alike: one-hot masks, the KL divergence with
//! `0 · log 0 = 0` (as PyTorch's `kl_div`), and logit standardization.

use burn::tensor::{Int, Tensor};

/// `[batch, classes]`: 1 at each row's target class, else 0 (no read back from the device).
pub fn one_hot(targets: &Tensor<1, Int>, classes: usize) -> Tensor<2> {
    let [batch] = targets.dims();
    let columns =
        Tensor::<1, Int>::arange(0..classes as i64, &targets.device()).reshape([1, classes]);
    targets
        .clone()
        .reshape([batch, 1])
        .equal(columns.expand([batch, classes]))
        .float()
}

/// `Σ p · (log p − log q)` over every element, with `0 · log 0 = 0`: the summed KL divergence
/// of distributions `p` (targets, constants) from `q` (given as `log q`).
pub fn kl_sum(p: Tensor<2>, log_q: Tensor<2>) -> Tensor<1> {
    let log_p = p.clone().clamp_min(f32::MIN_POSITIVE).log();
    (p * (log_p - log_q)).sum()
}

/// Each row as z-scores: `(z − mean) / (1e-7 + std)`, the std unbiased (divided by C − 1), as
/// logit standardization (Sun et al., CVPR 2024) computes them. A constant row gives zeros,
/// and a zero gradient (the variance is clamped off 0, where the root's slope is infinite).
pub fn standardize(z: Tensor<2>) -> Tensor<2> {
    let mean = z.clone().mean_dim(1);
    let std = z.clone().var(1).clamp_min(1e-12).sqrt();
    (z - mean).div(std.add_scalar(1e-7))
}

/// `log Σ exp` of each row, `[batch, 1]`, shifted by the row's maximum so that it neither
/// overflows nor underflows.
pub fn log_sum_exp(x: Tensor<2>) -> Tensor<2> {
    let max = x.clone().max_dim(1).detach();
    (x - max.clone()).exp().sum_dim(1).log() + max
}
