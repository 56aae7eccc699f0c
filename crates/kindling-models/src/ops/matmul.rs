//! Matrix views over row-major slices and the calls into the gemm crate (parallel and serial).

#[allow(unused_imports)]
use super::*;

/// A row-major matrix operand: data with its row and column strides (a transpose swaps them).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub(super) data: &'a [f32],
    pub(super) rs: usize,
    pub(super) cs: usize,
}

pub(crate) fn mat(data: &[f32], cols: usize) -> Mat<'_> {
    Mat {
        data,
        rs: cols,
        cs: 1,
    }
}

pub(crate) fn mat_t(data: &[f32], cols: usize) -> Mat<'_> {
    Mat {
        data,
        rs: 1,
        cs: cols,
    }
}

/// `dst (m, n) = [dst +] lhs (m, k) @ rhs (k, n)`, dst row-major and dense; gemm's own threads.
pub(crate) fn gemm_into(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) {
    gemm_dense(dims, dst, accumulate, lhs, rhs, true)
}

/// [`gemm_into`] on the calling thread only: for many small products run as rayon tasks.
pub(crate) fn gemm_serial_into(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) {
    gemm_dense(dims, dst, accumulate, lhs, rhs, false)
}

/// [`gemm_serial_into`] without accumulation into a buffer that need not be initialised: gemm
/// writes every element of `dst[..m * n]` without reading it, so the zero fill a `Vec<f32>`
/// would need (a memory pass over every convolution's output) is skipped. Returns the written
/// elements.
pub(crate) fn gemm_serial_uninit<'a>(
    (m, n, k): (usize, usize, usize),
    dst: &'a mut [std::mem::MaybeUninit<f32>],
    lhs: Mat,
    rhs: Mat,
) -> &'a mut [f32] {
    assert!(dst.len() >= m * n);
    let dst = &mut dst[..m * n];
    if m == 0 || n == 0 || k == 0 {
        dst.iter_mut().for_each(|v| {
            v.write(0.0);
        });
    } else {
        // SAFETY: with `accumulate` false gemm only writes `dst`, every element of it.
        unsafe { gemm_raw((m, n, k), dst.as_mut_ptr().cast(), false, lhs, rhs, false) };
    }
    // SAFETY: every element was written above.
    unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// gemm on candle's thread count if `parallel`, else on the calling thread.
pub(super) fn gemm_dense(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    parallel: bool,
) {
    assert!(dst.len() >= m * n);
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: `dst` holds m * n initialised elements (asserted above).
    unsafe { gemm_raw((m, n, k), dst.as_mut_ptr(), accumulate, lhs, rhs, parallel) }
}

/// The gemm call behind [`gemm_dense`] and [`gemm_serial_uninit`]: `dst` (m, n) row-major
/// (+)= lhs (m, k) @ rhs (k, n).
///
/// # Safety
/// `dst` must be valid for writes of m * n elements, and initialised if `accumulate`; m, n, k
/// must be non-zero.
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    parallel: bool,
) {
    assert!(lhs.data.len() > (m - 1) * lhs.rs + (k - 1) * lhs.cs);
    assert!(rhs.data.len() > (k - 1) * rhs.rs + (n - 1) * rhs.cs);
    let threads = if parallel {
        candle_core::utils::get_num_threads()
    } else {
        1
    };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every element the strides address; the caller vouches
    // for `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
