//! Device set-up a GPU training run wants once, before its first step.
//!
//! Candle's CUDA backend allocates every tensor with CUDA's stream-ordered allocator
//! (`cuMemAllocAsync`) from the device's memory pool. That pool's release threshold is 0 by
//! default: at each synchronization (every read of a loss, every host copy) the driver returns
//! the pool's free memory to the system, and the next step maps it again. PyTorch never pays
//! this: its caching allocator keeps freed blocks. [`retain_freed_memory`] sets the threshold
//! to "never release", so a training loop reuses its memory the way PyTorch's does. The memory
//! stays with the process (as with PyTorch) until it exits.
//!
//! ```
//! use candle_core::Device;
//! // Off CUDA there is nothing to set.
//! assert!(!gauss_layer::gpu::retain_freed_memory(&Device::Cpu)?);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::Device;

use crate::error::Result;

/// Makes the CUDA memory pool of `device` keep freed memory for reuse (see the module docs).
/// Returns whether the threshold is set now: `false` off CUDA, or where the device has no
/// memory pools (a second call sets it again and returns `true` again).
///
/// # Errors
/// A CUDA driver error (as [`crate::GaussError::Candle`]).
pub fn retain_freed_memory(device: &Device) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return cuda_pool::retain(cuda);
    }
    let _ = device;
    Ok(false)
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};

    use crate::error::Result;

    pub(super) fn retain(device: &CudaDevice) -> Result<bool> {
        let stream = device.cuda_stream();
        let context = stream.context();
        if !context.has_async_alloc() {
            return Ok(false);
        }
        context.bind_to_thread().w()?;
        let mut threshold: u64 = u64::MAX;
        // SAFETY: the device comes from a live context; the attribute takes a u64 (cuda.h).
        unsafe {
            let pool = result::device::get_mem_pool(context.cu_device()).w()?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .w()?;
        }
        Ok(true)
    }
}
