//! BatchNorm in inference (running statistics folded into one scale and shift per channel),
//! optionally followed by a residual addition and a ReLU, in one pass on the flex backend.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, TensorMetadata, backend_extension};
use rayon::prelude::*;

use crate::ops::flex::{dispatch_simd, f32_contiguous, f32_tensor};

/// `x · scale + shift` per channel of `x [B, C, ...]`, then optionally a ReLU.
#[backend_extension(Flex)]
pub trait ScaleShift: Backend {
    /// `x · scale + shift`, and `relu` of it when `relu`.
    fn scale_shift(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        relu: bool,
    ) -> FloatTensor<Self>;

    /// `relu(x · scale + shift + residual)`.
    fn scale_shift_add_relu(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Planes per rayon task: about 16 Ki values each.
fn planes_per_task(plane: usize) -> usize {
    (16_384 / plane.max(1)).max(1)
}

/// One plane: `dst = x · a + b (+ r)`, then ReLU (negatives to 0, NaN kept) when `relu`.
#[inline(always)]
fn plane(x: &[f32], r: &[f32], dst: &mut [f32], a: f32, b: f32, relu: bool) {
    let act = |v: f32| if relu && v < 0.0 { 0.0 } else { v };
    if r.is_empty() {
        for (d, &v) in dst.iter_mut().zip(x) {
            *d = act(v * a + b);
        }
    } else {
        for ((d, &v), &r) in dst.iter_mut().zip(x).zip(r) {
            *d = act(v * a + b + r);
        }
    }
}

dispatch_simd!(plane_simd(x: &[f32], r: &[f32], dst: &mut [f32], a: f32, b: f32, relu: bool) => plane(x, r, dst, a, b, relu));

/// The kernel behind both operations (`residual` implies the ReLU).
fn run(
    x: &FloatTensor<Flex>,
    scale: &FloatTensor<Flex>,
    shift: &FloatTensor<Flex>,
    residual: Option<&FloatTensor<Flex>>,
    relu: bool,
) -> FloatTensor<Flex> {
    let dims = x.shape().to_vec();
    assert!(dims.len() >= 2, "batch norm needs [batch, channels, ...]");
    let (channels, plane_len) = (dims[1], dims[2..].iter().product::<usize>());
    let (x, scale, shift) = (
        f32_contiguous(x),
        f32_contiguous(scale),
        f32_contiguous(shift),
    );
    let residual = residual.map(f32_contiguous);
    let (xs, a, b) = (
        x.storage::<f32>(),
        scale.storage::<f32>(),
        shift.storage::<f32>(),
    );
    let rs = residual.as_ref().map_or(&[][..], |r| r.storage::<f32>());
    assert!(
        rs.is_empty() || rs.len() == xs.len(),
        "batch norm: residual shape differs"
    );
    let per_task = planes_per_task(plane_len);
    let mut out = vec![0.0f32; xs.len()];
    out.par_chunks_mut(per_task * plane_len)
        .enumerate()
        .for_each(|(task, dst)| {
            for (k, dst) in dst.chunks_mut(plane_len).enumerate() {
                let p = task * per_task + k;
                let c = p % channels;
                let x = &xs[p * plane_len..][..plane_len];
                let r = if rs.is_empty() {
                    rs
                } else {
                    &rs[p * plane_len..][..plane_len]
                };
                plane_simd(x, r, dst, a[c], b[c], relu || !rs.is_empty());
            }
        });
    f32_tensor(out, dims)
}

impl ScaleShift for Flex {
    fn scale_shift(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        relu: bool,
    ) -> FloatTensor<Self> {
        run(&x, &scale, &shift, None, relu)
    }

    fn scale_shift_add_relu(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run(&x, &scale, &shift, Some(&residual), true)
    }
}
