//! Launchers of the project's CUDA kernels (`cuda/*.cu` at the crate root, compiled to PTX by
//! `build.rs` with the `cuda` feature). Each launcher is the `cuda_fwd` of a Candle op whose
//! CPU side and backward live next to the op (see [`crate::route`] for when they run).
//!
//! The kernels use no shared memory and no barriers, so the `cuda-emulation` crate runs the
//! same sources on the CPU in the tests, at several block sizes.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout};

const TRIL_INVERSE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/tril_inverse.ptx"));

/// Threads per block of the one-thread-per-column kernels.
const BLOCK: u32 = 128;

/// The most blocks a one-dimensional launch may have (`gridDim.x` ≤ 2³¹ − 1).
const MAX_GRID_X: usize = i32::MAX as usize;

/// Blocks of `block` threads covering `threads`, or an error past CUDA's grid limit.
fn blocks_for(threads: usize, block: u32, what: &str) -> candle_core::Result<u32> {
    let blocks = threads.div_ceil(block as usize);
    match u32::try_from(blocks) {
        Ok(blocks) if blocks as usize <= MAX_GRID_X => Ok(blocks),
        _ => bail!("{what} (CUDA): a launch of {threads} threads exceeds the grid limit"),
    }
}

fn grid_for(threads: usize) -> candle_core::Result<LaunchConfig> {
    let blocks = blocks_for(threads, BLOCK, "tril_inverse")?;
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn int_arg(value: usize, what: &str) -> candle_core::Result<i32> {
    i32::try_from(value).map_err(|_| candle_core::Error::Msg(format!("{what} {value} exceeds i32")))
}

fn tril_inverse_typed<T: CudaDType + DeviceRepr>(
    storage: &CudaStorage,
    layout: &Layout,
    kernel: &str,
    neurons: usize,
    dim: usize,
) -> candle_core::Result<CudaStorage> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("tril_inverse (CUDA): the input must be contiguous");
    };
    let (neurons_arg, dim_arg) = (int_arg(neurons, "neurons")?, int_arg(dim, "dimension")?);
    let device = storage.device().clone();
    let input = storage.as_cuda_slice::<T>()?.slice(start..end);
    // SAFETY: every element is written by the kernel (one thread per column writes all d rows).
    let output = unsafe { device.alloc::<T>(neurons * dim * dim)? };
    let func = device.get_or_load_custom_func(kernel, "gauss_tril_inverse", TRIL_INVERSE_PTX)?;
    let mut builder = func.builder();
    builder.arg(&input);
    builder.arg(&output);
    builder.arg(&neurons_arg);
    builder.arg(&dim_arg);
    // SAFETY: the argument list matches the kernel's signature in cuda/tril_inverse.cu.
    unsafe { builder.launch(grid_for(neurons * dim)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(output, device))
}

/// `L⁻¹` of each lower-triangular (d, d) block of a (Z, d, d) tensor (upper triangle ignored).
pub(crate) fn tril_inverse(
    storage: &CudaStorage,
    layout: &Layout,
    neurons: usize,
    dim: usize,
) -> candle_core::Result<CudaStorage> {
    match storage.dtype() {
        DType::F32 => tril_inverse_typed::<f32>(storage, layout, "tril_inverse_f32", neurons, dim),
        DType::F64 => tril_inverse_typed::<f64>(storage, layout, "tril_inverse_f64", neurons, dim),
        other => bail!("tril_inverse (CUDA): supports f32 and f64, got {other:?}"),
    }
}

const ADAMW_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));

/// Threads per block of the element-wise kernels.
const ELEMENTWISE_BLOCK: u32 = 256;

/// The scalars of one AdamW step, rounded to the parameter's dtype, in the kernel's argument
/// order: β₁, 1 − β₁, β₂, 1 − β₂, scale_m, scale_v, decay, ε, lr.
pub(crate) type AdamScalars<T> = [T; 9];

/// One AdamW step in place (`cuda/adamw.cu`): the parameter in `theta` (contiguous), its
/// gradient `grad`, the moments `m` and `v` (as many elements as the parameter).
pub(crate) fn adamw_step<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    theta: &mut CudaStorage,
    theta_layout: &Layout,
    grad: &CudaStorage,
    grad_layout: &Layout,
    moments: (&mut CudaSlice<T>, &mut CudaSlice<T>),
    scalars: AdamScalars<T>,
) -> candle_core::Result<()> {
    let (Some((t0, t1)), Some((g0, g1))) = (
        theta_layout.contiguous_offsets(),
        grad_layout.contiguous_offsets(),
    ) else {
        bail!("fused-adamw (CUDA): expected a contiguous parameter and gradient");
    };
    let n = t1 - t0;
    if g1 - g0 != n || moments.0.len() != n || moments.1.len() != n {
        bail!(
            "fused-adamw (CUDA): parameter of {n} elements, gradient of {}, moments of {} and {}",
            g1 - g0,
            moments.0.len(),
            moments.1.len()
        );
    }
    if n == 0 {
        return Ok(());
    }
    let kernel = match T::DTYPE {
        DType::F32 => "adamw_f32",
        DType::F64 => "adamw_f64",
        other => bail!("fused-adamw (CUDA): supports f32 and f64, got {other:?}"),
    };
    let device = theta.device().clone();
    let func = device.get_or_load_custom_func(kernel, "gauss_adamw", ADAMW_PTX)?;
    let grad = grad.as_cuda_slice::<T>()?.slice(g0..g1);
    let mut theta = theta.as_cuda_slice_mut::<T>()?.slice_mut(t0..t1);
    let count = n as i64;
    let blocks = blocks_for(n, ELEMENTWISE_BLOCK, "fused-adamw")?;
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (ELEMENTWISE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut builder = func.builder();
    builder.arg(&mut theta);
    builder.arg(moments.0);
    builder.arg(moments.1);
    builder.arg(&grad);
    builder.arg(&count);
    for scalar in &scalars {
        builder.arg(scalar);
    }
    // SAFETY: the argument list matches `adamw_<dtype>` in cuda/adamw.cu; sizes checked above.
    unsafe { builder.launch(config) }.w()?;
    Ok(())
}
