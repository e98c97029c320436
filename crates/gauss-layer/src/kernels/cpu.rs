//! Shared plumbing of the fused CPU kernels: typed views of Candle's CPU storage, a bounds
//! checked GEMM call, tile sizes and a vectorizable squared distance.

use std::borrow::Cow;

use candle_core::{bail, CpuStorage, DType, Layout, Tensor, WithDType};

/// The float types the fused kernels run on (the ones `gemm` supports and the layer uses).
pub(crate) trait Real: WithDType {}
impl Real for f32 {}
impl Real for f64 {}

/// Columns of one GEMM tile (neurons per block × d): wide enough for `gemm` to run at speed,
/// small enough that the tile stays in L2.
const TILE_COLS: usize = 256;

/// Rows (inputs) of one GEMM tile.
pub(crate) const TILE_ROWS: usize = 64;

/// Neurons per block so that one block spans about [`TILE_COLS`] projected columns.
pub(crate) fn neurons_per_block(dim: usize, neurons: usize) -> usize {
    (TILE_COLS / dim.max(1)).clamp(1, neurons.max(1))
}

/// Rows per parallel batch chunk: about two chunks per thread, so both cores stay busy while
/// each chunk amortizes its copy of the stacked factors.
pub(crate) fn rows_per_chunk(batch: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    batch.div_ceil(2 * threads).clamp(8, 1024)
}

/// The elements of a CPU tensor in row-major order: borrowed when contiguous, gathered
/// otherwise (strided and offset layouts).
pub(crate) fn row_major<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<Cow<'a, [T]>> {
    let data = T::cpu_storage_as_slice(storage)?;
    if let Some((start, end)) = layout.contiguous_offsets() {
        return Ok(Cow::Borrowed(&data[start..end]));
    }
    let dims = layout.dims();
    let stride = layout.stride();
    let count = layout.shape().elem_count();
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; dims.len()];
    for _ in 0..count {
        let offset =
            layout.start_offset() + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(data[offset]);
        for axis in (0..dims.len()).rev() {
            index[axis] += 1;
            if index[axis] < dims[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(Cow::Owned(out))
}

/// Row-major elements of a CPU tensor of dtype `T` (read lock held only while copying or
/// while the closure runs).
pub(crate) fn with_row_major<T: WithDType, R>(
    tensor: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(&row_major::<T>(cpu, layout)?),
        _ => bail!("fused CPU kernel called with a tensor that is not on the CPU"),
    }
}

/// Checks that the fused kernels support `dtype`.
pub(crate) fn check_float(op: &str, dtype: DType) -> candle_core::Result<()> {
    match dtype {
        DType::F32 | DType::F64 => Ok(()),
        other => bail!("{op}: supports f32 and f64, got {other:?}"),
    }
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

/// `Σ_j (a_j - b_j)²` with eight independent accumulators, so it vectorizes.
#[inline]
pub(crate) fn squared_distance<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let mut a_chunks = a.chunks_exact(8);
    let mut b_chunks = b.chunks_exact(8);
    for (ac, bc) in (&mut a_chunks).zip(&mut b_chunks) {
        for l in 0..8 {
            let diff = ac[l] - bc[l];
            lanes[l] += diff * diff;
        }
    }
    let mut total = T::zero();
    for (x, y) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        let diff = *x - *y;
        total += diff * diff;
    }
    for lane in lanes {
        total += lane;
    }
    total
}

/// Mean of the rows of a row-major (rows, dim) matrix: the shift that centers the inputs
/// before projecting, so `F(x - c)` loses fewer digits when the centers sit far from 0.
pub(crate) fn row_mean<T: Real>(data: &[T], rows: usize, dim: usize) -> Vec<f64> {
    let mut mean = vec![0f64; dim];
    for row in data.chunks_exact(dim.max(1)).take(rows) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v.to_f64();
        }
    }
    let scale = 1.0 / rows.max(1) as f64;
    mean.iter_mut().for_each(|m| *m *= scale);
    mean
}
