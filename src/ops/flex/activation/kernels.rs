//! Vectorisable kernels of the activations MobileNetV3 and EfficientNet use, with PyTorch's
//! formulas and derivatives. Burn's flex backend computes sigmoid with a scalar libm `exp`
//! per element and hardswish as a chain of tensor operations (a pass each, forward and
//! backward); here each is one pass, compiled for AVX-512 and AVX2 and picked at run time.

use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::Pointwise;
use crate::ops::flex::{dispatch_simd, exp, f32_contiguous, f32_tensor};

/// `1 / (1 + e^−x)`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `min(max(x + 3, 0), 6)`.
#[inline(always)]
pub(crate) fn relu6_shifted(x: f32) -> f32 {
    (x + 3.0).clamp(0.0, 6.0)
}

#[inline(always)]
fn forward_slice(kind: Pointwise, x: &[f32], y: &mut [f32]) {
    let pairs = y.iter_mut().zip(x);
    match kind {
        Pointwise::Sigmoid => pairs.for_each(|(y, &x)| *y = sigmoid(x)),
        Pointwise::Silu => pairs.for_each(|(y, &x)| *y = x * sigmoid(x)),
        // `(x · clamp) / 6`, as PyTorch evaluates it (bit for bit).
        Pointwise::Hardswish => pairs.for_each(|(y, &x)| *y = x * relu6_shifted(x) / 6.0),
        Pointwise::Hardsigmoid => pairs.for_each(|(y, &x)| *y = relu6_shifted(x) / 6.0),
    }
}

#[inline(always)]
fn backward_slice(kind: Pointwise, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let triples = dx.iter_mut().zip(x.iter().zip(dy));
    match kind {
        Pointwise::Sigmoid => triples.for_each(|(dx, (&x, &g))| {
            let s = sigmoid(x);
            *dx = g * s * (1.0 - s);
        }),
        Pointwise::Silu => triples.for_each(|(dx, (&x, &g))| {
            let s = sigmoid(x);
            *dx = g * s * (1.0 + x * (1.0 - s));
        }),
        // PyTorch: 0 for x <= -3, x/3 + 1/2 inside, 1 for x >= 3.
        Pointwise::Hardswish => triples.for_each(|(dx, (&x, &g))| {
            let slope = if x <= -3.0 {
                0.0
            } else if x < 3.0 {
                x / 3.0 + 0.5
            } else {
                1.0
            };
            *dx = g * slope;
        }),
        // PyTorch: 1/6 strictly inside (−3, 3), else 0.
        Pointwise::Hardsigmoid => triples.for_each(|(dx, (&x, &g))| {
            *dx = if x > -3.0 && x < 3.0 { g / 6.0 } else { 0.0 };
        }),
    }
}

dispatch_simd!(forward_simd(kind: Pointwise, x: &[f32], y: &mut [f32]) => forward_slice(kind, x, y));
dispatch_simd!(backward_simd(kind: Pointwise, x: &[f32], dy: &[f32], dx: &mut [f32]) => backward_slice(kind, x, dy, dx));

/// Elements per rayon task.
const TASK: usize = 1 << 14;

/// `kind(x)`.
pub fn forward(x: &FlexTensor, kind: Pointwise) -> FlexTensor {
    let dims = x.layout().shape().clone();
    let x = f32_contiguous(x);
    let xs = x.storage::<f32>();
    let mut y = vec![0.0f32; xs.len()];
    y.par_chunks_mut(TASK)
        .zip(xs.par_chunks(TASK))
        .for_each(|(y, x)| forward_simd(kind, x, y));
    f32_tensor(y, dims)
}

/// `dy · kind'(x)`.
pub fn backward(x: &FlexTensor, grad: &FlexTensor, kind: Pointwise) -> FlexTensor {
    let dims = x.layout().shape().clone();
    let (x, grad) = (f32_contiguous(x), f32_contiguous(grad));
    let (xs, dys) = (x.storage::<f32>(), grad.storage::<f32>());
    let mut dx = vec![0.0f32; xs.len()];
    dx.par_chunks_mut(TASK)
        .zip(xs.par_chunks(TASK).zip(dys.par_chunks(TASK)))
        .for_each(|(dx, (x, dy))| backward_simd(kind, x, dy, dx));
    f32_tensor(dx, dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigmoid64(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Each activation and its derivative against an f64 reference, PyTorch's formulas.
    #[test]
    fn activations_and_derivatives_are_accurate() {
        let xs: Vec<f32> = (-1000..=1000).map(|i| i as f32 * 0.01).collect();
        type Reference = fn(f64) -> (f64, f64);
        let cases: [(Pointwise, Reference); 4] = [
            (Pointwise::Sigmoid, |x| {
                let s = sigmoid64(x);
                (s, s * (1.0 - s))
            }),
            (Pointwise::Silu, |x| {
                let s = sigmoid64(x);
                (x * s, s * (1.0 + x * (1.0 - s)))
            }),
            (Pointwise::Hardswish, |x| {
                let gate = (x + 3.0).clamp(0.0, 6.0) / 6.0;
                let d = if x <= -3.0 {
                    0.0
                } else if x < 3.0 {
                    x / 3.0 + 0.5
                } else {
                    1.0
                };
                (x * gate, d)
            }),
            (Pointwise::Hardsigmoid, |x| {
                let d = if x > -3.0 && x < 3.0 { 1.0 / 6.0 } else { 0.0 };
                ((x + 3.0).clamp(0.0, 6.0) / 6.0, d)
            }),
        ];
        for (kind, reference) in cases {
            let mut y = vec![0.0; xs.len()];
            let mut dx = vec![0.0; xs.len()];
            forward_simd(kind, &xs, &mut y);
            backward_simd(kind, &xs, &vec![1.0; xs.len()], &mut dx);
            for ((&x, &y), &dx) in xs.iter().zip(&y).zip(&dx) {
                let (ey, edx) = reference(x as f64);
                assert!(
                    (y as f64 - ey).abs() <= 1e-6 * ey.abs().max(1.0),
                    "{kind:?}({x}) = {y}, not {ey}"
                );
                assert!(
                    (dx as f64 - edx).abs() <= 1e-6,
                    "{kind:?}'({x}) = {dx}, not {edx}"
                );
            }
        }
    }
}
