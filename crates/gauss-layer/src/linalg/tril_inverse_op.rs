//! The batched lower-triangular inverse as one Candle op: faer's blocked inverse per neuron on
//! the CPU, the `tril_inverse` CUDA kernel on CUDA, and one closed-form backward for both
//! (two batched GEMMs): with `M = L⁻¹`, `dM = −M dL M`, so `∂L = tril(−Mᵀ Ḡ Mᵀ)`.
//!
//! The tensor-op recursion in [`super::tril_inverse`] stays the portable form (Metal, f16).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::host;
use crate::cpu::row_major;

/// `L⁻¹` of each (d, d) block of a (Z, d, d) tensor; the strict upper triangle of `L` is
/// ignored and that of the result is 0.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TrilInverse;

fn sizes(layout: &Layout) -> candle_core::Result<(usize, usize)> {
    match *layout.dims() {
        [z, d, e] if d == e => Ok((z, d)),
        ref dims => bail!("tril_inverse: expected (Z, d, d), got {dims:?}"),
    }
}

impl CustomOp1 for TrilInverse {
    fn name(&self) -> &'static str {
        "tril-inverse"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (z, d) = sizes(layout)?;
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(host::lower_inverse_batch(
                &row_major::<f32>(storage, layout)?,
                z,
                d,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(host::lower_inverse_batch(
                &row_major::<f64>(storage, layout)?,
                z,
                d,
            )),
            other => bail!(
                "tril_inverse: supports f32 and f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (z, d) = sizes(layout)?;
        let out = crate::cuda::tril_inverse(storage, layout, z, d)?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _lower: &Tensor,
        inverse: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let inverse_t = inverse.transpose(1, 2)?.contiguous()?;
        let full = inverse_t
            .matmul(&grad.contiguous()?)?
            .matmul(&inverse_t)?
            .neg()?;
        let d = inverse.dim(1)?;
        let mask = Tensor::tril2(d, full.dtype(), full.device())?;
        Ok(Some(full.broadcast_mul(&mask)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use crate::linalg::tril_inverse_routed;

    /// Well-conditioned lower-triangular blocks (diagonal in [0.5, 1.5]) with a nonzero upper
    /// triangle that both forms must ignore.
    fn lower(z: usize, d: usize, dtype: DType) -> candle_core::Result<Tensor> {
        let raw = Tensor::randn(0f64, 0.3 / (d as f64).sqrt(), (z, d, d), &Device::Cpu)?;
        let diag = (Tensor::rand(0.5f64, 1.5, (z, d), &Device::Cpu)?
            .unsqueeze(2)?
            .broadcast_mul(&Tensor::eye(d, DType::F64, &Device::Cpu)?.unsqueeze(0)?))?;
        (raw + diag)?.to_dtype(dtype)
    }

    /// The op (faer forward, closed-form backward) against the portable tensor-op recursion
    /// (autograd through its matmuls): values and gradients of `Σ W ⊙ L⁻¹`.
    #[test]
    fn op_matches_the_portable_form_in_value_and_gradient() -> crate::Result<()> {
        for (d, dtype, tol) in [
            (1, DType::F64, 1e-12),
            (7, DType::F64, 1e-12),
            (33, DType::F64, 1e-11),
            (20, DType::F32, 1e-4),
        ] {
            let var = Var::from_tensor(&lower(3, d, dtype)?)?;
            let weights = Tensor::randn(0f64, 1.0, (3, d, d), &Device::Cpu)?.to_dtype(dtype)?;
            let mut results = Vec::new();
            for portable in [false, true] {
                let inverse = tril_inverse_routed(var.as_tensor(), portable)?;
                let grads = (&inverse * &weights)?.sum_all()?.backward()?;
                let grad = grads.get(&var).expect("the input has a gradient").clone();
                results.push((inverse, grad));
            }
            // f64: a unit test on Device::Cpu (`lower` and `weights` build there)
            for (what, a, b) in [
                ("value", &results[0].0, &results[1].0),
                ("gradient", &results[0].1, &results[1].1),
            ] {
                let scale = b
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                // f64: a unit test on Device::Cpu
                let diff = (a - b)?
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                assert!(
                    diff <= tol * (1.0 + scale),
                    "d {d} {dtype:?} {what}: |op − portable| = {diff:e} (scale {scale:e})"
                );
            }
            // Above the diagonal: the result is 0 and the input gets no gradient.
            let upper = (Tensor::ones((d, d), dtype, &Device::Cpu)?
                - Tensor::tril2(d, dtype, &Device::Cpu)?)?;
            for t in [&results[0].0, &results[0].1] {
                let above = t.broadcast_mul(&upper)?.abs()?.sum_all()?;
                // f64: a unit test on Device::Cpu
                assert_eq!(above.to_dtype(DType::F64)?.to_scalar::<f64>()?, 0.0);
            }
        }
        Ok(())
    }
}
