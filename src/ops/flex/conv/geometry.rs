//! The geometry of a convolution: shapes, the valid output range of each kernel tap, how a
//! batch is cut into chunks of whole images, and the kernel's live window on small planes.

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use crate::ops::flex::{f32_contiguous, f32_tensor};

/// Shapes, stride and padding of one convolution.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub(super) batch: usize,
    pub(super) channels: usize,
    pub(super) height: usize,
    pub(super) width: usize,
    pub(super) out_channels: usize,
    pub(super) kernel: [usize; 2],
    pub(super) stride: [usize; 2],
    pub(super) padding: [usize; 2],
    pub(super) out_height: usize,
    pub(super) out_width: usize,
}

impl Geometry {
    /// The geometry of `x [B, C, H, W]` convolved with `weight [O, C, kh, kw]`.
    pub fn new<T: TensorMetadata>(
        x: &T,
        weight: &T,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> Self {
        let [batch, channels, height, width] = x.shape().dims();
        let [out_channels, weight_channels, kh, kw] = weight.shape().dims();
        assert_eq!(
            channels, weight_channels,
            "gemm_conv2d: input has {channels} channels, weight expects {weight_channels}"
        );
        let out = |size: usize, k: usize, s: usize, p: usize| {
            assert!(
                size + 2 * p >= k,
                "gemm_conv2d: kernel {k} larger than padded input"
            );
            (size + 2 * p - k) / s + 1
        };
        Self {
            batch,
            channels,
            height,
            width,
            out_channels,
            kernel: [kh, kw],
            stride,
            padding,
            out_height: out(height, kh, stride[0], padding[0]),
            out_width: out(width, kw, stride[1], padding[1]),
        }
    }

    /// Rows of the im2col matrix: `C · kh · kw`.
    pub(super) fn rows(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// Output pixels of one image.
    pub(super) fn out_plane(&self) -> usize {
        self.out_height * self.out_width
    }
}

/// Output positions `o` along one axis (of `out`) whose input index `o·s + k − p` lies in
/// `0..size`, for kernel tap `k`, stride `s` and padding `p`: the range `lo..hi`.
pub(super) fn valid_range(out: usize, size: usize, k: usize, s: usize, p: usize) -> (usize, usize) {
    // o·s + k ≥ p  and  o·s + k − p ≤ size − 1
    let lo = p.saturating_sub(k).div_ceil(s);
    let hi = if size + p > k {
        ((size + p - k - 1) / s + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Floats in one chunk's im2col matrix (1 MiB, so that it stays in cache while the
/// GEMM reads it).
const CHUNK_FLOATS: usize = 1 << 18;

/// Rows of gemm's widest f32 microkernel (4 AVX-512 vectors).
const GEMM_ROWS: usize = 64;

/// Greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The number of chunks is rounded up to a multiple of this (see `images_per_chunk`).
const CHUNK_MULTIPLE: usize = 4;

/// A run of whole images `first..first + count` processed together.
#[derive(Clone, Copy)]
pub(super) struct Chunk {
    pub(super) first: usize,
    pub(super) count: usize,
}

impl Geometry {
    /// Images per chunk: about [`CHUNK_FLOATS`] of im2col each, at least one image, a chunk
    /// count that is a multiple of [`CHUNK_MULTIPLE`] so that the chunks spread evenly over
    /// 1, 2 or 4 threads, then rounded up to whole multiples of [`GEMM_ROWS`] pixels. The
    /// chunking depends on the shapes only, never on the thread count, so a machine gives the
    /// same results whatever its thread count (other CPUs may differ in the last bits: gemm's
    /// blocking and microkernels follow the CPU).
    pub(super) fn images_per_chunk(&self) -> usize {
        let batch = self.batch.max(1);
        let total = batch * (self.rows() * self.out_plane()).max(1);
        let chunks = total
            .div_ceil(CHUNK_FLOATS)
            .next_multiple_of(CHUNK_MULTIPLE);
        let per = batch.div_ceil(chunks.min(batch));
        // Whole multiples of 64 pixels where the plane allows: gemm's widest microkernel
        // covers 64 rows, and a 32-row remainder runs at half its speed.
        let unit = GEMM_ROWS / gcd(self.out_plane().max(1), GEMM_ROWS);
        if unit <= batch {
            per.next_multiple_of(unit).min(batch)
        } else {
            per
        }
    }

    /// Whether the GEMMs should use all threads themselves: only when there are fewer chunks
    /// than threads to spread the chunks over.
    pub(super) fn gemm_in_parallel(&self) -> bool {
        self.batch.div_ceil(self.images_per_chunk()) < rayon::current_num_threads()
    }
}

/// Filters (`[kh, kw]` planes) per rayon task when cutting or placing a live window.
const FILTERS_PER_TASK: usize = 4096;

/// The kernel taps that see the input for at least one output pixel: rows `i0..i1` and
/// columns `j0..j1` of the kernel (a rectangle). The other taps only ever multiply padding.
/// On small planes (e.g. ResNet's last stage on 32x32 images, a 1x1 plane where only the
/// centre of a 3x3 kernel is live) the convolution runs on the live window alone.
#[derive(Debug, Clone, Copy)]
pub(super) struct LiveWindow {
    rows: [usize; 2],
    cols: [usize; 2],
    /// The same convolution with the live window as its kernel.
    pub(super) geometry: Geometry,
}

impl Geometry {
    /// The live window when it is smaller than the kernel.
    pub(super) fn live_window(&self) -> Option<LiveWindow> {
        let live = |out: usize, size: usize, k: usize, s: usize, p: usize| {
            let taps: Vec<usize> = (0..k)
                .filter(|&t| {
                    let (lo, hi) = valid_range(out, size, t, s, p);
                    lo < hi
                })
                .collect();
            [
                taps.first().copied().unwrap_or(0),
                taps.last().map_or(0, |&t| t + 1),
            ]
        };
        let rows = live(
            self.out_height,
            self.height,
            self.kernel[0],
            self.stride[0],
            self.padding[0],
        );
        let cols = live(
            self.out_width,
            self.width,
            self.kernel[1],
            self.stride[1],
            self.padding[1],
        );
        let kernel = [rows[1] - rows[0], cols[1] - cols[0]];
        if kernel == self.kernel || kernel.contains(&0) {
            return None;
        }
        // Tap t of the window is tap t + i0 of the kernel: the same input offset with the
        // padding reduced by i0 (the output size stays as it is).
        let geometry = Geometry {
            kernel,
            padding: [self.padding[0] - rows[0], self.padding[1] - cols[0]],
            ..*self
        };
        Some(LiveWindow {
            rows,
            cols,
            geometry,
        })
    }
}

impl LiveWindow {
    /// `weight [O, C, kh, kw]` cut to the window.
    pub(super) fn crop(&self, weight: &FlexTensor, g: &Geometry) -> FlexTensor {
        let weight = f32_contiguous(weight);
        let w = weight.storage::<f32>();
        let [kh, kw] = g.kernel;
        let [wh, ww] = self.geometry.kernel;
        let mut out = vec![0.0f32; g.out_channels * g.channels * wh * ww];
        out.par_chunks_mut(FILTERS_PER_TASK * wh * ww)
            .zip(w.par_chunks(FILTERS_PER_TASK * kh * kw))
            .for_each(|(small, full)| {
                for (small, filter) in small
                    .chunks_exact_mut(wh * ww)
                    .zip(full.chunks_exact(kh * kw))
                {
                    for r in 0..wh {
                        let from = (r + self.rows[0]) * kw + self.cols[0];
                        small[r * ww..][..ww].copy_from_slice(&filter[from..][..ww]);
                    }
                }
            });
        f32_tensor(out, [g.out_channels, g.channels, wh, ww])
    }

    /// The window's weight gradient placed in a zero `[O, C, kh, kw]` (dead taps get 0).
    pub(super) fn expand(&self, grad: &FlexTensor, g: &Geometry) -> FlexTensor {
        let grad = f32_contiguous(grad);
        let dw = grad.storage::<f32>();
        let [kh, kw] = g.kernel;
        let [wh, ww] = self.geometry.kernel;
        let mut out = vec![0.0f32; g.out_channels * g.channels * kh * kw];
        out.par_chunks_mut(FILTERS_PER_TASK * kh * kw)
            .zip(dw.par_chunks(FILTERS_PER_TASK * wh * ww))
            .for_each(|(full, small)| {
                for (filter, small) in full
                    .chunks_exact_mut(kh * kw)
                    .zip(small.chunks_exact(wh * ww))
                {
                    for r in 0..wh {
                        let to = (r + self.rows[0]) * kw + self.cols[0];
                        filter[to..][..ww].copy_from_slice(&small[r * ww..][..ww]);
                    }
                }
            });
        f32_tensor(out, [g.out_channels, g.channels, kh, kw])
    }
}

#[cfg(test)]
mod tests {
    use super::valid_range;

    #[test]
    fn valid_ranges_match_a_brute_force_scan() {
        for size in 1..9 {
            for k in 0..4 {
                for s in 1..4 {
                    for p in 0..3 {
                        if size + 2 * p < k + 1 {
                            continue;
                        }
                        let out = (size + 2 * p - (k + 1)) / s + 1;
                        let brute: Vec<usize> = (0..out)
                            .filter(|&o| {
                                let i = (o * s + k) as isize - p as isize;
                                i >= 0 && i < size as isize
                            })
                            .collect();
                        let (lo, hi) = valid_range(out, size, k, s, p);
                        assert_eq!((lo..hi).collect::<Vec<_>>(), brute, "{size} {k} {s} {p}");
                    }
                }
            }
        }
    }
}
