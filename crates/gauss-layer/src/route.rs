//! The one routing decision: which implementation family runs an op for a device, a dtype
//! and the user's `portable` switch. The distance kernels, the precision statistics, the
//! batched linear algebra and the positive-definiteness checks all ask [`backend`]; the
//! ops whose host reads only pay off where they cost nothing (expm's squaring count) ask
//! [`host_reads_are_free`]. Nothing else looks at the device to choose.
//!
//! | device | dtype | `portable` | backend |
//! |---|---|---|---|
//! | CPU | f32, f64 | false | [`Backend::CpuFused`] |
//! | CUDA (built with the `cuda` feature) | f32, f64 | false | [`Backend::Cuda`] |
//! | anything else (Metal, f16/bf16, `portable: true`) | | | [`Backend::Portable`] |
//!
//! [`Backend::Portable`] is the tensor-op form of every op: what Metal runs, and what
//! `portable: true` forces on the CPU so tests can check it against the fused forms.

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

    /// `portable: true` sends every op of a layer's training step to tensor ops on the CPU,
    /// as the table says: the forward, the statistics the losses use (exact and estimated
    /// `tr Σ`, with the Cholesky factorizations of a width floor and of lowrank's
    /// capacitance, both recursive past 8), the positive-definiteness check, and their
    /// backward read no storage through a fused op. The same step without `portable` does,
    /// so the count can fail.
    #[test]
    fn portable_runs_no_fused_op() -> crate::error::Result<()> {
        use crate::cpu::fused_storage_reads;
        use crate::{gauss_layer, GaussLayerConfig, Parameterization, PrecisionConfig};
        use candle_core::Tensor;
        use candle_nn::{VarBuilder, VarMap};

        let x = Tensor::randn(0f32, 1.0, (12, 10), &Device::Cpu)?;
        let forms = Parameterization::ALL
            .into_iter()
            .chain([Parameterization::LowRank { rank: 9 }]);
        for parameterization in forms {
            for width_floor in [None, Some(0.5)] {
                for portable in [true, false] {
                    let precision = PrecisionConfig {
                        parameterization,
                        width_floor,
                        portable,
                        ..Default::default()
                    };
                    if precision.validate().is_err() {
                        continue; // lowrank takes no width floor
                    }
                    let config = GaussLayerConfig {
                        precision,
                        tanh: true,
                        ..Default::default()
                    };
                    let varmap = VarMap::new();
                    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
                    let layer = gauss_layer(10, 9, config, vb)?;
                    let before = fused_storage_reads();
                    let (y, g) = layer.forward_with_gaussian(&x, None)?;
                    let p = layer.precision();
                    crate::repair::ensure_positive_definite(p)?;
                    let mut loss = (y.sum_all()? + g.sum_all()?)?;
                    for stat in [
                        p.log_det_precision()?,
                        p.trace_covariance()?,
                        p.trace_covariance_estimate(4)?,
                        p.trace_precision()?,
                    ] {
                        loss = (loss + stat.sum_all()?)?;
                    }
                    loss.backward()?;
                    let reads = fused_storage_reads() - before;
                    let what = format!("{parameterization} width_floor {width_floor:?}");
                    if portable {
                        assert_eq!(reads, 0, "{what}: portable read storage in fused ops");
                    } else {
                        assert!(reads > 0, "{what}: the fused route ran no fused op");
                    }
                }
            }
        }
        Ok(())
    }
}
