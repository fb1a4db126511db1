//! kd's own kernels for the CPU (`flex`) backend, each a Burn backend extension with its own
//! backward pass: batch-wide GEMM and depthwise convolution ([`conv`]), BatchNorm fused with
//! ReLU and residual addition ([`norm`]), max pooling ([`pool`]), GELU ([`gelu`]) and a one-pass
//! Adam step ([`adam`]); and the small helpers they share. Models never call them directly:
//! [`crate::ops`] picks them where they apply (f32 on the flex device) and Burn's own
//! operations everywhere else. Each keeps a parity test against Burn's op
//! (`tests/cpu_kernels.rs`).

pub mod activation;
pub mod adam;
pub mod conv;
pub mod gelu;
pub mod norm;
pub mod pool;

use burn::backend::DispatchDevice;
use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{Bytes, DType, Shape, Tensor};

/// Whether `device` is the flex CPU backend (with or without autodiff).
pub fn is_flex_device(device: &burn::tensor::Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Whether `x` lives on the flex CPU backend (with or without autodiff) as f32.
pub fn is_flex_f32<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_)) && x.dtype() == DType::F32
}

/// `t` as a contiguous f32 tensor (no copy when it already is one).
pub fn f32_contiguous(t: &FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "kd's flex kernels run in f32 only");
    t.to_contiguous()
}

/// A contiguous f32 flex tensor of shape `dims` holding `data`.
pub fn f32_tensor(data: Vec<f32>, dims: impl Into<Shape>) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(dims.into()),
        DType::F32,
    )
}

// Shared by the vectorised activations (GELU's erf, sigmoid).
const LOG2_E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in a part exact in f32 and the rest, for an accurate range reduction.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `e^x` for `x` in [-87, 88] (clamped), relative error about 2e-7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round x·log2(e) to the nearest integer n with the 1.5·2^23 trick: adding MAGIC leaves n
    // in the low mantissa bits, so both n and 2^n come out of bit operations (a float-to-int
    // conversion would check each lane for overflow and stop the loop from vectorising).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * LOG2_E + (MAGIC + 127.0);
    let n = shifted - (MAGIC + 127.0);
    let r = x - n * LN2_HI - n * LN2_LO; // |r| <= ln2 / 2
    // Taylor series of e^r to r^7: truncation error below 1e-8 for |r| <= 0.35.
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // The low bits of `shifted` hold 127 + n: move them into the exponent field.
    let two_to_n = f32::from_bits(shifted.to_bits().wrapping_sub(MAGIC.to_bits()) << 23);
    p * two_to_n
}

/// A raw pointer that rayon tasks may share, each writing a disjoint set of elements.
#[derive(Clone, Copy)]
pub struct SharedOut(*mut f32);

// SAFETY: users write disjoint elements from different threads (see each call site) and the
// buffer outlives the parallel loop.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Shares `buf` for disjoint writes.
    pub fn new(buf: &mut [f32]) -> Self {
        Self(buf.as_mut_ptr())
    }

    /// The `len` elements at `offset`.
    ///
    /// # Safety
    /// The range must lie inside the shared buffer and no other task may access it while the
    /// returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &mut [f32] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

/// Defines `fn $name(args)` running `$body` compiled for the best vector extension this CPU
/// has (AVX-512F, else AVX2 + FMA, else the build's baseline), chosen at run time. The
/// `avx2` form stops at AVX2, for loops whose AVX-512 code turned out slower.
macro_rules! dispatch_simd {
    ($name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:expr) => {
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { $body }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
            }
            $crate::ops::flex::dispatch_simd!(avx2 inner($($arg: $ty),*) $(-> $ret)? => $body);
            inner($($arg),*)
        }
    };
    (avx2 $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:expr) => {
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { $body }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use dispatch_simd;
