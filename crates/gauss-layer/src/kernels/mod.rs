//! Distance kernels and the automatic choice between them (DESIGN §4).
//!
//! The layer calls [`mahalanobis_sq`]; it resolves the configured [`DistanceKernel`] into the
//! [`ResolvedKernel`] that runs:
//!
//! | precision | CPU (f32/f64) | other devices |
//! |---|---|---|
//! | diag, sphere | fused diagonal op (B·Z·d) | [`distance::mahalanobis_sq_diagonal`] |
//! | cholesky, expm, direct, centers well inside the widths (`Auto`) | fused expanded op (projected forward where the expanded forward's row tiles would be short, see [`expanded_fused`]) | [`distance::mahalanobis_sq_projected`] / [`expanded::mahalanobis_sq_expanded`] |
//! | cholesky, expm, centers far apart relative to the widths | fused projected op (cholesky without width floor: fed the raw parameter, `L` built in the op) | [`distance::mahalanobis_sq_projected`] |
//! | direct, centers far apart | naive | naive |
//!
//! "Well inside" is the cheap conditioning check `max_z |c_z - c̄|²·‖P_z‖ <= limit(dtype)`
//! (see [`expanded::expanded_is_accurate`]), under which the expanded form keeps its digits.
//! `Expanded`, `Projected` and `Naive` in the config force those forms (diag and sphere always
//! take their own exact path except under `Naive`). The fused CPU ops compute `m2` and its
//! gradients with tiled GEMMs in parallel and never build (B, Z, d) temporaries.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::kernels::projected::mahalanobis_sq_projected_fused;
//! let x = Tensor::new(&[[1.0f32, 2.0]], &Device::Cpu)?;
//! let c = Tensor::new(&[[0.0f32, 0.0]], &Device::Cpu)?;
//! let f = Tensor::new(&[[[2.0f32, 0.0], [0.0, 1.0]]], &Device::Cpu)?; // P = F Fᵀ = diag(4, 1)
//! let m2 = mahalanobis_sq_projected_fused(&x, &c, &f)?.to_vec2::<f32>()?;
//! assert!((m2[0][0] - 8.0).abs() < 1e-6); // 4·1² + 1·2²
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cpu;
pub mod diagonal;
pub mod expanded;
pub mod expanded_fused;
pub mod fused_layer;
pub mod projected;
#[cfg(test)]
mod tests;

use candle_core::{DType, Tensor};

use crate::config::DistanceKernel;
use crate::distance;
use crate::error::{GaussError, Result};
use crate::precision::Precision;
use expanded_fused::Plan;
use projected::FactorMap;

/// The kernel that actually runs once [`DistanceKernel::Auto`] is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResolvedKernel {
    /// Fused CPU op for a diagonal precision.
    DiagonalFused,
    /// Tensor-op form for a diagonal precision.
    DiagonalTensorOps,
    /// Fused CPU op for the projected form, fed the factor from [`Precision::factor`].
    ProjectedFused,
    /// Fused CPU op for the projected form straight from the raw Cholesky parameter (the
    /// factor is built inside the op): cholesky without a width floor.
    CholeskyFused,
    /// Tensor-op form of the projected form (one GEMM against the stacked factors).
    ProjectedTensorOps,
    /// Fused CPU op for the expanded symmetric form, forward and backward.
    ExpandedFused,
    /// Fused CPU op: projected forward (lean scratch where the expanded forward's row tiles
    /// would be short), expanded backward.
    ExpandedBackwardFused,
    /// Expanded symmetric form (tensor ops).
    Expanded,
    /// (B, Z, d) broadcast form.
    Naive,
}

impl ResolvedKernel {
    /// A short name for logs and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            ResolvedKernel::DiagonalFused => "diagonal_fused",
            ResolvedKernel::DiagonalTensorOps => "diagonal_tensor_ops",
            ResolvedKernel::ProjectedFused => "projected_fused",
            ResolvedKernel::CholeskyFused => "cholesky_fused",
            ResolvedKernel::ProjectedTensorOps => "projected_tensor_ops",
            ResolvedKernel::ExpandedFused => "expanded_fused",
            ResolvedKernel::ExpandedBackwardFused => "projected_forward_expanded_backward_fused",
            ResolvedKernel::Expanded => "expanded",
            ResolvedKernel::Naive => "naive",
        }
    }
}

/// Whether the fused CPU ops can take `x`.
fn fused_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// What the parameterization offers, computed once per call.
enum Operand {
    Plan(Plan, Tensor),
    Diagonal(Tensor),
    Factor(Tensor),
    Matrix(Tensor),
}

fn choose(
    x: &Tensor,
    center: &Tensor,
    precision: &Precision,
    kernel: DistanceKernel,
) -> Result<(ResolvedKernel, Operand)> {
    if kernel == DistanceKernel::Naive {
        return Ok((
            ResolvedKernel::Naive,
            Operand::Matrix(precision.precision_matrix()?),
        ));
    }
    if let Some(diagonal) = precision.diagonal_precision()? {
        let resolved = if fused_cpu(x) {
            ResolvedKernel::DiagonalFused
        } else {
            ResolvedKernel::DiagonalTensorOps
        };
        return Ok((resolved, Operand::Diagonal(diagonal)));
    }
    if let Some((plan, input)) = expanded_fused::plan_for(x, center, precision, kernel)? {
        let resolved = match plan {
            Plan::Projected(FactorMap::Cholesky { .. }) => ResolvedKernel::CholeskyFused,
            Plan::Projected(FactorMap::Identity) => ResolvedKernel::ProjectedFused,
            Plan::Expanded {
                projected_forward: true,
                ..
            } => ResolvedKernel::ExpandedBackwardFused,
            Plan::Expanded { .. } => ResolvedKernel::ExpandedFused,
        };
        return Ok((resolved, Operand::Plan(plan, input)));
    }
    if kernel == DistanceKernel::Expanded {
        return Ok((
            ResolvedKernel::Expanded,
            Operand::Matrix(precision.precision_matrix()?),
        ));
    }
    match (kernel, precision.factor()?) {
        (_, Some(factor)) => {
            let resolved = if fused_cpu(x) {
                ResolvedKernel::ProjectedFused
            } else {
                ResolvedKernel::ProjectedTensorOps
            };
            Ok((resolved, Operand::Factor(factor)))
        }
        (DistanceKernel::Projected, None) => Err(GaussError::config(
            "kernel",
            format!(
                "`projected` needs a factor P = F Fᵀ, which the `{}` parameterization does not keep; use `auto`, `expanded` or `naive`",
                precision.parameterization()
            ),
        )),
        (_, None) => {
            let matrix = precision.precision_matrix()?;
            let resolved = if expanded::expanded_is_accurate(center, &matrix)? {
                ResolvedKernel::Expanded
            } else {
                ResolvedKernel::Naive
            };
            Ok((resolved, Operand::Matrix(matrix)))
        }
    }
}

/// The kernel [`mahalanobis_sq`] runs for these arguments (for logs and benchmarks).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d)
pub fn resolve_kernel(
    x: &Tensor,
    center: &Tensor,
    precision: &Precision,
    kernel: DistanceKernel,
) -> Result<ResolvedKernel> {
    Ok(choose(x, center, precision, kernel)?.0)
}

/// Squared Mahalanobis distances of `x` to every neuron, through the requested kernel
/// ([`DistanceKernel::Auto`] picks by parameterization, device and conditioning).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d) → (B, Z)
pub fn mahalanobis_sq(
    x: &Tensor,
    center: &Tensor,
    precision: &Precision,
    kernel: DistanceKernel,
) -> Result<Tensor> {
    let (resolved, operand) = choose(x, center, precision, kernel)?;
    match (resolved, operand) {
        (_, Operand::Plan(plan, input)) => {
            Ok(x.apply_op3(center, &input, expanded_fused::FusedMahalanobisSq { plan })?)
        }
        (ResolvedKernel::DiagonalFused, Operand::Diagonal(p)) => {
            diagonal::mahalanobis_sq_diagonal_fused(x, center, &p)
        }
        (_, Operand::Diagonal(p)) => distance::mahalanobis_sq_diagonal(x, center, &p),
        (ResolvedKernel::ProjectedFused, Operand::Factor(f)) => {
            projected::mahalanobis_sq_projected_fused(x, center, &f)
        }
        (_, Operand::Factor(f)) => distance::mahalanobis_sq_projected(x, center, &f),
        (ResolvedKernel::Expanded, Operand::Matrix(p)) => {
            expanded::mahalanobis_sq_expanded(x, center, &p)
        }
        (_, Operand::Matrix(p)) => distance::mahalanobis_sq_naive(x, center, &p),
    }
}
