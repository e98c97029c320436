//! `--device` for both bench binaries.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// `cpu`, `cuda` or `metal`. On CUDA the memory pool keeps freed memory (as PyTorch's caching
/// allocator does) unless `GAUSS_CUDA_DEFAULT_POOL` is set, so the GPU check can time both.
pub fn parse(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => {
            let device =
                Device::new_cuda(0).context("--device cuda (build with --features cuda)")?;
            if std::env::var_os("GAUSS_CUDA_DEFAULT_POOL").is_none() {
                gauss_layer::gpu::retain_freed_memory(&device)?;
            }
            device
        }
        "metal" => Device::new_metal(0).context("--device metal (build with --features metal)")?,
        other => bail!("--device must be cpu, cuda or metal, got {other:?}"),
    })
}
