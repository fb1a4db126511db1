//! The GEMM calls of the convolution: the `gemm` crate on strided operands.

/// A strided matrix operand: `data[row · rs + col · cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    pub(super) data: &'a [f32],
    pub(super) rs: isize,
    pub(super) cs: isize,
}

/// `dst[m × n] (+)= lhs[m × k] · rhs[k × n]`, `dst` row-major; adds to `dst` when
/// `accumulate`. (gemm picks its own internal orientation from the strides; the transposed
/// call for `m < n` computes the same product.)
pub(super) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    parallel: bool,
) {
    assert!(dst.len() >= m * n);
    let parallelism = if parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // Row-major dst: row stride n, column stride 1.
    let (dst_rs, dst_cs) = (n as isize, 1isize);
    // SAFETY: every operand slice covers the strided ranges that gemm reads or writes
    // (checked by the callers' shapes); `dst` does not alias `lhs` or `rhs`.
    unsafe {
        if m >= n {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                dst_cs,
                dst_rs,
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
        } else {
            // dstᵀ[n × m] = rhsᵀ[n × k] · lhsᵀ[k × m]
            gemm::gemm(
                n,
                m,
                k,
                dst.as_mut_ptr(),
                dst_rs,
                dst_cs,
                accumulate,
                rhs.data.as_ptr(),
                rhs.rs,
                rhs.cs,
                lhs.data.as_ptr(),
                lhs.rs,
                lhs.cs,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
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
