//! Shared plumbing of the fused CPU kernels, written once: the sizes of a call, the checks
//! every op's public entry makes, typed views of Candle's CPU storage, the f32/f64 dispatch of
//! `cpu_fwd` and `bwd`, a bounds-checked GEMM call, parallel loops, tile sizes and small
//! vectorizable reductions.

use std::borrow::Cow;

use rayon::prelude::*;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Shape, Tensor, WithDType};

use crate::error::{check_dtype, GaussError, Result};

/// Defines a kernel function whose body is compiled twice: for AVX2 (used when the CPU has it,
/// checked at run time and cached by std) and for the build's baseline target (x86-64 without
/// flags means SSE2: 4 floats per instruction instead of 8). The arithmetic is the same in
/// both (Rust never contracts `a·b + c` into an FMA and no feature changes an operation's
/// order), so the results are bit-identical; only the vector width differs. Use it for the
/// hand-written inner loops; GEMMs already dispatch at run time inside `gemm`.
macro_rules! simd_kernel {
    (
        $(#[$meta:meta])*
        fn $name:ident<$t:ident: Real>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        fn $name<$t: Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<$t: Real>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<$t: Real>($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// Sizes of one call: B inputs, d dims, Z neurons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sizes {
    pub batch: usize,
    pub dim: usize,
    pub neurons: usize,
}

/// The shape a distance op expects for its precision operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OperandShape {
    /// (Z, d): a diagonal precision.
    Diagonal,
    /// (Z, d, d): a factor, a raw parameter or a matrix.
    Square,
}

impl Sizes {
    /// Checks x (B, d), center (Z, d) and the precision operand, naming the one at fault.
    pub(crate) fn of(
        x: &[usize],
        center: &[usize],
        operand: &[usize],
        operand_shape: OperandShape,
        operand_what: &str,
    ) -> Result<Self> {
        let &[batch, dim] = x else {
            return Err(GaussError::shape("input x", "(batch, d)", x));
        };
        let &[neurons, center_dim] = center else {
            return Err(GaussError::shape("center", format!("(Z, {dim})"), center));
        };
        if center_dim != dim {
            return Err(GaussError::shape(
                "center",
                format!("({neurons}, {dim}) (d from the input x)"),
                center,
            ));
        }
        let (ok, expected) = match operand_shape {
            OperandShape::Diagonal => (operand == [neurons, dim], format!("({neurons}, {dim})")),
            OperandShape::Square => (
                operand == [neurons, dim, dim],
                format!("({neurons}, {dim}, {dim})"),
            ),
        };
        if !ok {
            return Err(GaussError::shape(operand_what, expected, operand));
        }
        Ok(Sizes {
            batch,
            dim,
            neurons,
        })
    }

    /// Shapes of the gradients to x (B, d), the centers (Z, d) and the operand.
    pub(crate) fn gradient_shapes(self, operand_shape: OperandShape) -> [Shape; 3] {
        [
            (self.batch, self.dim).into(),
            (self.neurons, self.dim).into(),
            match operand_shape {
                OperandShape::Diagonal => (self.neurons, self.dim).into(),
                OperandShape::Square => (self.neurons, self.dim, self.dim).into(),
            },
        ]
    }
}

/// The checks of a fused op's public entry: shapes, one dtype (f32 or f64) for all inputs,
/// and the CPU. Returns the sizes.
pub(crate) fn check_fused_inputs(
    op: &str,
    [x, center, operand]: [&Tensor; 3],
    operand_shape: OperandShape,
    operand_what: &str,
) -> Result<Sizes> {
    let sizes = Sizes::of(
        x.dims(),
        center.dims(),
        operand.dims(),
        operand_shape,
        operand_what,
    )?;
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        return Err(GaussError::dtype(
            format!("{op}: input x"),
            "F32 or F64 (the fused CPU kernels' dtypes)",
            x.dtype(),
        ));
    }
    check_dtype("center", center, x.dtype(), "the input x")?;
    check_dtype(operand_what, operand, x.dtype(), "the input x")?;
    for tensor in [x, center, operand] {
        if !tensor.device().is_cpu() {
            return Err(GaussError::config(
                "device",
                format!("{op} is a fused CPU kernel, but a tensor is on {:?}; the layer runs the portable form there", tensor.device().location()),
            ));
        }
    }
    Ok(sizes)
}

/// The same elementwise shift of every row: `out_row = row − shift`.
pub(crate) fn shift_rows<T: Real>(x: &[T], shift: &[T], out: &mut [T]) {
    let dim = shift.len().max(1);
    for (row_out, row_in) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        for ((o, &v), &m) in row_out.iter_mut().zip(row_in).zip(shift) {
            *o = v - m;
        }
    }
}

/// The float types the fused kernels run on (the ones `gemm` supports and the layer uses).
pub(crate) trait Real: WithDType {
    /// `e^self`.
    fn exp(self) -> Self;
    /// `tanh(self)`.
    fn tanh(self) -> Self;
    /// Not NaN and not infinite.
    fn is_finite(self) -> bool;
}
impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}
impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

/// Sets row `b` of `m2` (B, Z) to NaN wherever input row `b` holds a NaN or infinite value,
/// so that every kernel gives the same documented result for such rows (the algorithms
/// would otherwise return NaN, 0 or ∞ depending on the form).
pub(crate) fn poison_non_finite_rows<T: Real>(m2: &mut [T], x: &[T], dim: usize, neurons: usize) {
    let nan = T::from_f64(f64::NAN);
    for (row, out) in x
        .chunks_exact(dim.max(1))
        .zip(m2.chunks_exact_mut(neurons.max(1)))
    {
        if !row.iter().all(|v| v.is_finite()) {
            out.fill(nan);
        }
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

/// The `bwd` of a three-input op whose backward runs on host slices: reads the four tensors
/// (`inputs` and the upstream gradient, converted to the inputs' dtype) as row-major `T`
/// for `T` = the dtype of the first input, runs `f32_backward` or `f64_backward`, and wraps
/// the three gradients as tensors of `shapes`.
pub(crate) fn dispatch_backward3(
    op: &str,
    [a, b, c, grad]: [&Tensor; 4],
    shapes: [Shape; 3],
    f32_backward: impl FnOnce(&[f32], &[f32], &[f32], &[f32]) -> Gradients3<f32>,
    f64_backward: impl FnOnce(&[f64], &[f64], &[f64], &[f64]) -> Gradients3<f64>,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (ga, gb, gc) = match a.dtype() {
        DType::F32 => {
            let grad = grad.to_dtype(DType::F32)?.contiguous()?;
            host_backward3::<f32>([a, b, c, &grad], shapes, |a, b, c, g| {
                Ok(f32_backward(a, b, c, g))
            })?
        }
        DType::F64 => {
            let grad = grad.to_dtype(DType::F64)?.contiguous()?;
            host_backward3::<f64>([a, b, c, &grad], shapes, |a, b, c, g| {
                Ok(f64_backward(a, b, c, g))
            })?
        }
        other => bail!("{op}: supports f32 and f64, got {other:?}"),
    };
    Ok((Some(ga), Some(gb), Some(gc)))
}

/// Three gradients as row-major host vectors.
pub(crate) type Gradients3<T> = (Vec<T>, Vec<T>, Vec<T>);

/// A row- or column-strided matrix view for [`matmul`]: `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// Runs `work(i, chunk_a_i, chunk_b_i)` over matching chunks of two slices (`a` in chunks of
/// `a_len`, `b` in chunks of `b_len`), in parallel. Each chunk is written by one call, so the
/// result does not depend on the schedule.
pub(crate) fn for_each_chunk_pair_mut<T: Send, U: Send>(
    a: &mut [T],
    a_len: usize,
    b: &mut [U],
    b_len: usize,
    work: impl Fn(usize, &mut [T], &mut [U]) + Sync,
) {
    a.par_chunks_mut(a_len.max(1))
        .zip(b.par_chunks_mut(b_len.max(1)))
        .enumerate()
        .for_each(|(i, (a, b))| work(i, a, b));
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

/// Runs `work(i, chunk_i)` over the chunks of `data` of `chunk_len`, in parallel.
pub(crate) fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    work: impl Fn(usize, &mut [T]) + Sync,
) {
    data.par_chunks_mut(chunk_len.max(1))
        .enumerate()
        .for_each(|(i, chunk)| work(i, chunk));
}

/// Runs `work(state, i, item_i)` over owned `items` (typically disjoint `&mut` chunks of
/// output buffers) with a static schedule: worker `w` of `n` takes
/// items `w, w + n, …` with one state made by `init`; the states come back in worker order,
/// so callers that add them get the same sums on every run.
pub(crate) fn for_each_with_state<I: Send, S: Send>(
    items: Vec<I>,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize, I) + Sync,
) -> Vec<S> {
    let workers = pool_threads().min(items.len()).max(1);
    let mut per_worker: Vec<Vec<(usize, I)>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        per_worker[i % workers].push((i, item));
    }
    let run = |owned: Vec<(usize, I)>| {
        let mut state = None;
        for (i, item) in owned {
            work(state.get_or_insert_with(&init), i, item);
        }
        state
    };
    let states: Vec<Option<S>> = if workers == 1 {
        per_worker.into_iter().map(run).collect()
    } else {
        per_worker.into_par_iter().map(run).collect()
    };
    states.into_iter().flatten().collect()
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
