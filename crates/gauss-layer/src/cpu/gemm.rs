//! A bounds-checked, single-threaded GEMM call and the tile sizes the kernels cut their work
//! into.

use super::Real;

/// Columns of one GEMM tile (neurons per block × d): wide enough for `gemm` to run at speed,
/// small enough that the tile stays in L2.
const TILE_COLS: usize = 128;

/// Rows (inputs) of one GEMM tile.
pub(crate) const TILE_ROWS: usize = 64;

/// Neurons per block so that one block spans about [`TILE_COLS`] projected columns.
pub(crate) fn neurons_per_block(dim: usize, neurons: usize) -> usize {
    (TILE_COLS / dim.max(1)).clamp(1, neurons.max(1))
}

/// A row- or column-strided matrix view for [`matmul`]: `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, single-threaded (callers parallelize over
/// tiles). `dst` is row-major with row stride `dst_row_stride`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_row_stride: usize,
    accumulate: bool,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(m, n, dst_row_stride, 1) < dst.len(),
        "gemm dst out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_row_stride..r * dst_row_stride + n].fill(T::zero());
            }
        }
        return;
    }
    assert!(
        last(m, k, lhs.row_stride, lhs.col_stride) < lhs.data.len(),
        "gemm lhs out of bounds"
    );
    assert!(
        last(k, n, rhs.row_stride, rhs.col_stride) < rhs.data.len(),
        "gemm rhs out of bounds"
    );
    // SAFETY: the asserts above keep every element gemm touches inside the three slices,
    // and `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
