//! The GEMM calls of the convolution: the `gemm` crate on strided operands.

/// A strided matrix operand: `data[row · rs + col · cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    pub(super) data: &'a [f32],
    pub(super) rs: isize,
    pub(super) cs: isize,
}

impl Mat<'_> {
    /// The transposed matrix (the same data, strides swapped).
    fn t(self) -> Self {
        Mat {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst[m × n] (+)= lhs[m × k] · rhs[k × n]`, `dst` row-major; adds to `dst` when
/// `accumulate`. For `m < n` it computes the same product as `dstᵀ = rhsᵀ · lhsᵀ`, which
/// puts the longer side where gemm's microkernels vectorise.
pub(super) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    parallel: bool,
) {
    if m >= n {
        matmul_strided((m, n, k), dst, (n, 1), lhs, rhs, accumulate, parallel);
    } else {
        matmul_strided(
            (n, m, k),
            dst,
            (1, n),
            rhs.t(),
            lhs.t(),
            accumulate,
            parallel,
        );
    }
}

/// `dst (+)= lhs · rhs` for `dst [m × n]` stored as `dst[i·dst_rs + j·dst_cs]`, straight to
/// gemm (the operands' strides pick its packing).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_strided(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    parallel: bool,
) {
    assert!(m > 0 && n > 0 && dst.len() > (m - 1) * dst_rs + (n - 1) * dst_cs);
    let parallelism = if parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: as in `matmul`: the callers' shapes cover every strided access (checked above
    // for `dst`) and `dst` aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr(),
            rhs.cs,
            rhs.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}
