//! The one routing decision: which implementation family runs an op for a device, a dtype
//! and the user's `portable` switch. The distance kernels, the precision statistics, the
//! batched linear algebra (the triangular inverse, and through it the Cholesky
//! factorization), the vectorized `e^x` ops, `FusedAdamW` and the positive-definiteness
//! checks all ask [`backend`]; the ops whose host reads only pay off where they cost nothing
//! (expm's squaring count) ask [`host_reads_are_free`]. No other implementation is chosen
//! by device; what remains are facts of a device, not choices: the CPU's seedable probe
//! generator (`seed_trace_probes`) and Metal's missing f64 (checkpoints load as f32 there).
//!
//! | device | dtype | `portable` | backend |
//! |---|---|---|---|
//! | CPU | f32, f64 | false | [`Backend::CpuFused`] |
//! | CUDA (built with the `cuda` feature) | f32, f64 | false | [`Backend::Cuda`] |
//! | anything else (Metal, f16/bf16, `portable: true`) | | | [`Backend::Portable`] |
//!
//! [`Backend::Portable`] is the tensor-op form of every op: what Metal runs, and what
//! `portable: true` forces on the CPU so tests can check it against the fused forms (the
//! layer's test `portable_runs_no_fused_op` holds a whole layer step of every form to it).

use candle_core::{DType, Device};

/// The implementation family an op runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    /// Fused CPU ops (`CustomOp::cpu_fwd` with closed-form backward ops).
    CpuFused,
    /// The project's CUDA kernels (`cuda/*.cu`, `CustomOp::cuda_fwd`), cuBLAS for GEMMs.
    Cuda,
    /// Candle tensor ops only.
    Portable,
}

/// Where an op on tensors of this device and dtype runs (see the module table).
pub(crate) fn backend(device: &Device, dtype: DType, portable: bool) -> Backend {
    if portable || !matches!(dtype, DType::F32 | DType::F64) {
        return Backend::Portable;
    }
    match device {
        Device::Cpu => Backend::CpuFused,
        Device::Cuda(_) if cfg!(feature = "cuda") => Backend::Cuda,
        _ => Backend::Portable,
    }
}

/// Whether reading a tensor's values on the host is free (the tensor is in host memory).
///
/// Ops that can shorten their work by looking at the data (expm reads the largest norm of
/// the batch to pick its squaring count) do so only here; on a GPU the same read would stall
/// the stream, so they run a read-free form there.
pub(crate) fn host_reads_are_free(device: &Device) -> bool {
    matches!(device, Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_f32_and_f64_run_fused_unless_portable() {
        assert_eq!(backend(&Device::Cpu, DType::F32, false), Backend::CpuFused);
        assert_eq!(backend(&Device::Cpu, DType::F64, false), Backend::CpuFused);
        assert_eq!(backend(&Device::Cpu, DType::F64, true), Backend::Portable);
        assert_eq!(backend(&Device::Cpu, DType::F16, false), Backend::Portable);
        assert_eq!(backend(&Device::Cpu, DType::BF16, false), Backend::Portable);
        assert!(host_reads_are_free(&Device::Cpu));
    }
}
