//! Launchers of the project's CUDA kernels (`cuda/*.cu` at the crate root, compiled to PTX by
//! `build.rs` with the `cuda` feature). Each launcher is the `cuda_fwd` of a Candle op whose
//! CPU side and backward live next to the op (see [`crate::route`] for when they run).
//!
//! The kernels use no shared memory and no barriers, so the `cuda-emulation` crate runs the
//! same sources on the CPU in the tests, at several block sizes.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout};

const TRIL_INVERSE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/tril_inverse.ptx"));

/// Threads per block of the one-thread-per-column kernels.
const BLOCK: u32 = 128;

fn grid_for(threads: usize) -> candle_core::Result<LaunchConfig> {
    let blocks = threads.div_ceil(BLOCK as usize);
    let Ok(blocks) = u32::try_from(blocks) else {
        bail!("CUDA launch of {threads} threads exceeds the grid limit");
    };
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
    let device = storage.device().clone();
    let input = storage.as_cuda_slice::<T>()?.slice(start..end);
    // SAFETY: every element is written by the kernel (one thread per column writes all d rows).
    let output = unsafe { device.alloc::<T>(neurons * dim * dim)? };
    let func = device.get_or_load_custom_func(kernel, "gauss_tril_inverse", TRIL_INVERSE_PTX)?;
    let (neurons_arg, dim_arg) = (int_arg(neurons, "neurons")?, int_arg(dim, "dimension")?);
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
