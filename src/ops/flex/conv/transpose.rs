//! Matrix transposes for the convolution's layout changes (channels-first ↔ channels-last
//! planes, weight column orders): 8x8 blocks in AVX registers where the CPU has AVX, the
//! rest element by element.

/// `dst[c · rows + r] = src[r · cols + c]` for a row-major `src [rows × cols]`.
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    let (full_rows, full_cols) = (rows / 8 * 8, cols / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        for r in (0..full_rows).step_by(8) {
            for c in (0..full_cols).step_by(8) {
                // SAFETY: the CPU has AVX; the 8x8 block at (r, c) lies inside `src`, its
                // transpose at (c, r) inside `dst` (both at least rows·cols long, checked above).
                unsafe {
                    block8(
                        src.as_ptr().add(r * cols + c),
                        cols,
                        dst.as_mut_ptr().add(c * rows + r),
                        rows,
                    );
                }
            }
        }
        scalar(src, rows, cols, dst, full_rows, full_cols);
        return;
    }
    scalar(src, rows, cols, dst, 0, 0);
}

/// The elements outside the top-left `done_rows × done_cols` block, one by one.
fn scalar(
    src: &[f32],
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    done_rows: usize,
    done_cols: usize,
) {
    for r in 0..rows {
        let start = if r < done_rows { done_cols } else { 0 };
        for c in start..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}

/// Transposes the 8x8 block at `src` (row stride `src_stride`) into `dst` (row stride
/// `dst_stride`).
///
/// # Safety
/// The CPU must have AVX, and both blocks must lie inside their allocations.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn block8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: guaranteed by the caller.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, row) in out.into_iter().enumerate() {
            _mm256_storeu_ps(dst.add(i * dst_stride), row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn transposes_any_shape() {
        for (rows, cols) in [
            (1, 1),
            (3, 5),
            (8, 8),
            (9, 17),
            (16, 24),
            (64, 9),
            (9, 64),
            (13, 8),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
