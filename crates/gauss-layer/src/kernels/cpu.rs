//! Shared plumbing of the fused CPU kernels: typed views of Candle's CPU storage, a bounds
//! checked GEMM call, tile sizes and a vectorizable squared distance.

use std::borrow::Cow;
use std::sync::Mutex;

use rayon::prelude::*;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Shape, Tensor, WithDType};

/// The float types the fused kernels run on (the ones `gemm` supports and the layer uses).
pub(crate) trait Real: WithDType {
    /// `e^self`.
    fn exp(self) -> Self;
}
impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
}
impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// Columns of one GEMM tile (neurons per block × d): wide enough for `gemm` to run at speed,
/// small enough that the tile stays in L2.
const TILE_COLS: usize = 128;

/// Rows (inputs) of one GEMM tile.
pub(crate) const TILE_ROWS: usize = 64;

/// Neurons per block so that one block spans about [`TILE_COLS`] projected columns.
pub(crate) fn neurons_per_block(dim: usize, neurons: usize) -> usize {
    (TILE_COLS / dim.max(1)).clamp(1, neurons.max(1))
}

/// Threads of the rayon pool the kernels run on (the one Candle's matmul uses too).
pub(crate) fn pool_threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Rows per parallel batch chunk: about two chunks per thread, so both cores stay busy while
/// each chunk amortizes its copy of the stacked factors.
pub(crate) fn rows_per_chunk(batch: usize) -> usize {
    batch.div_ceil(2 * pool_threads()).clamp(8, 1024)
}

/// Runs `work(state, item)` for every item in `0..items` on the rayon pool (Candle's spinning
/// barrier pool measured slower here when cores are shared). Worker `w` of `n` takes items
/// `w, w + n, w + 2n, …` with one `state` made by `init`; the states come back in worker
/// order. The static schedule is what makes results reproducible: callers that sum the states
/// add the same partial sums in the same order on every run.
pub(crate) fn for_each_item<S: Send>(
    items: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize) + Sync,
) -> Vec<S> {
    let workers = pool_threads().min(items).max(1);
    let run = |worker: usize| {
        let mut state = None;
        for item in (worker..items).step_by(workers) {
            work(state.get_or_insert_with(&init), item);
        }
        state
    };
    let states: Vec<Option<S>> = if workers == 1 {
        vec![run(0)]
    } else {
        (0..workers).into_par_iter().map(run).collect()
    };
    states.into_iter().flatten().collect()
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

/// The `cpu_fwd` of a three-input op: runs `on_f32` or `on_f64` on the row-major inputs when
/// all three share that dtype, else fails naming the op (`op`) and its inputs (`inputs`).
pub(crate) fn dispatch_float3<R>(
    op: &str,
    inputs: &str,
    [(s1, l1), (s2, l2), (s3, l3)]: [(&CpuStorage, &Layout); 3],
    on_f32: impl FnOnce(&[f32], &[f32], &[f32]) -> R,
    on_f64: impl FnOnce(&[f64], &[f64], &[f64]) -> R,
) -> candle_core::Result<R> {
    match (s1, s2, s3) {
        (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => Ok(on_f32(
            &row_major(s1, l1)?,
            &row_major(s2, l2)?,
            &row_major(s3, l3)?,
        )),
        (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => Ok(on_f64(
            &row_major(s1, l1)?,
            &row_major(s2, l2)?,
            &row_major(s3, l3)?,
        )),
        _ => bail!(
            "{op}: {inputs} must all be f32 or all f64, got {:?}, {:?}, {:?}",
            s1.dtype(),
            s2.dtype(),
            s3.dtype()
        ),
    }
}

/// The host side of a three-gradient backward: `backward` runs on the row-major elements of
/// the four `inputs` (dtype `T`, on the CPU) and its three gradients come back as tensors
/// of `shapes` on the first input's device.
pub(crate) fn host_backward3<T: Real>(
    [a, b, c, d]: [&Tensor; 4],
    shapes: [Shape; 3],
    backward: impl FnOnce(&[T], &[T], &[T], &[T]) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)>,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (ga, gb, gc) = with_row_major::<T, _>(a, |a| {
        with_row_major::<T, _>(b, |b| {
            with_row_major::<T, _>(c, |c| with_row_major::<T, _>(d, |d| backward(a, b, c, d)))
        })
    })?;
    let [sa, sb, sc] = shapes;
    let device = a.device();
    Ok((
        Tensor::from_vec(ga, sa, device)?,
        Tensor::from_vec(gb, sb, device)?,
        Tensor::from_vec(gc, sc, device)?,
    ))
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

fn lock<S>(slot: &Mutex<S>) -> std::sync::MutexGuard<'_, S> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `work(i, chunk_a_i, chunk_b_i)` over matching chunks of two slices (`a` in chunks of
/// `a_len`, `b` in chunks of `b_len`), in parallel.
pub(crate) fn for_each_chunk_pair_mut<T: Send, U: Send>(
    a: &mut [T],
    a_len: usize,
    b: &mut [U],
    b_len: usize,
    work: impl Fn(usize, &mut [T], &mut [U]) + Sync,
) {
    // One uncontended lock per chunk hands each chunk to exactly one thread, without unsafe.
    let chunks: Vec<Mutex<(&mut [T], &mut [U])>> = a
        .chunks_mut(a_len.max(1))
        .zip(b.chunks_mut(b_len.max(1)))
        .map(Mutex::new)
        .collect();
    for_each_item(
        chunks.len(),
        || (),
        |(), i| {
            let mut guard = lock(&chunks[i]);
            let (a, b) = &mut *guard;
            work(i, a, b)
        },
    );
}

/// Multiply-adds below which a loop runs on the calling thread: waking the pool costs more.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 18;

/// [`for_each_chunk_pair_mut`], or a plain loop on the calling thread when `work` (about the
/// multiply-adds of all chunks) is below [`PARALLEL_MIN_WORK`].
pub(crate) fn for_each_chunk_pair_mut_sized<T: Send, U: Send>(
    work: usize,
    a: &mut [T],
    a_len: usize,
    b: &mut [U],
    b_len: usize,
    f: impl Fn(usize, &mut [T], &mut [U]) + Sync,
) {
    if work >= PARALLEL_MIN_WORK {
        return for_each_chunk_pair_mut(a, a_len, b, b_len, f);
    }
    for (i, (a, b)) in a
        .chunks_mut(a_len.max(1))
        .zip(b.chunks_mut(b_len.max(1)))
        .enumerate()
    {
        f(i, a, b);
    }
}

/// Runs `work(i, chunk_i)` over the chunks of `data` of `chunk_len`, in parallel on Candle's
/// rayon pool.
pub(crate) fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    work: impl Fn(usize, &mut [T]) + Sync,
) {
    let count = data.len().div_ceil(chunk_len.max(1));
    let mut none = vec![(); count];
    for_each_chunk_pair_mut(data, chunk_len, &mut none, 1, |i, chunk, _| work(i, chunk));
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
