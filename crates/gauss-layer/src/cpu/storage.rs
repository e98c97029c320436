//! Typed, row-major views of Candle's CPU storage, and the f32/f64 dispatch of the ops'
//! `cpu_fwd` and `bwd`.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Shape, Tensor, WithDType};

use super::Real;

/// The elements of a CPU tensor in row-major order: borrowed when contiguous, gathered
/// otherwise (strided and offset layouts).
pub(crate) fn row_major<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<Cow<'a, [T]>> {
    #[cfg(test)]
    FUSED_STORAGE_READS.with(|reads| reads.set(reads.get() + 1));
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

#[cfg(test)]
thread_local! {
    /// How many times this thread's fused CPU ops read Candle storage ([`row_major`], which
    /// every one of them reads through): tests count them to prove that `portable: true`
    /// runs none.
    static FUSED_STORAGE_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// This thread's count of fused-op storage reads so far (see `FUSED_STORAGE_READS`).
#[cfg(test)]
pub(crate) fn fused_storage_reads() -> usize {
    FUSED_STORAGE_READS.with(|reads| reads.get())
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
    backward: impl FnOnce(&[T], &[T], &[T], &[T]) -> candle_core::Result<Gradients3<T>>,
) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
    let (ga, gb, gc) = with_row_major::<T, _>(a, |a| {
        with_row_major::<T, _>(b, |b| {
            with_row_major::<T, _>(c, |c| with_row_major::<T, _>(d, |d| backward(a, b, c, d)))
        })
    })?;
    let [sa, sb, sc] = shapes;
    let device = a.device();
    Ok((
        ga.map(|ga| Tensor::from_vec(ga, sa, device)).transpose()?,
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
    Ok((ga, Some(gb), Some(gc)))
}

/// Three gradients as row-major host vectors. The first, the input's, is `None` where
/// [`needs_input_gradient`] said no: computing it is a third to a half of a fused backward.
pub(crate) type Gradients3<T> = (Option<Vec<T>>, Vec<T>, Vec<T>);

/// Whether a fused op's backward must compute the gradient of its input `x`. Candle calls
/// `bwd` for every op on the path to a variable and accumulates every gradient it returns,
/// but the first layer's input (the data) tracks no op, so its gradient would be computed,
/// added to zeros and dropped.
pub(crate) fn needs_input_gradient(x: &Tensor) -> bool {
    x.track_op()
}
