//! Distance kernels and the one resolver that chooses between them (docs/design.md §4).
//!
//! Every caller (the layer, its fused forward, the losses through the layer) asks
//! [`resolve`] for a plan and runs it; nothing else decides. Per form, the fused CPU
//! algorithm and its portable twin in tensor ops sit side by side in one file, as candle-nn
//! keeps `op` and `op_slow`:
//!
//! | precision | CPU, f32/f64 (fused) | portable (CUDA, Metal, other dtypes, `portable: true`) |
//! |---|---|---|
//! | diag, sphere (any kernel but `Naive`) | fused diagonal op (exact, B·Z·d) | diagonal portable form (matmuls, shifted by the centers' mean, clamped) |
//! | cholesky, expm: `Auto`, B ≤ 2d | fused projected op (no check) | projected portable form |
//! | cholesky, expm: `Auto`, B > 2d, check passes | fused expanded op (projected forward where d is large) | projected portable form |
//! | cholesky, expm: `Auto`, B > 2d, check fails | fused projected op | projected portable form |
//! | direct: `Auto`, check passes | fused expanded op | naive portable form |
//! | direct: `Auto`, check fails (or not positive definite) | naive portable form | naive portable form |
//! | lowrank, `Auto` | fused diagonal op + one GEMM against the stacked `U` | diagonal + projected portable forms |
//! | `Expanded` (full forms, lowrank) | fused expanded op | expanded portable form |
//! | `Projected` (cholesky, expm; direct and lowrank refuse it: no factor) | fused projected op | projected portable form |
//! | `Naive` | naive portable form | naive portable form |
//!
//! The check ([`conditioning`]) reads the centers and the precision operand on the host, which
//! is free on the CPU; the portable path never reads device data to decide (no device
//! synchronization per call), so among the full forms it takes the one accurate for every
//! input (projected, from the differences `x − c_z`); the diagonal forms' portable expansion
//! trades digits under a wide spread of centers for speed ([`diagonal`]).
//! cholesky without a width floor feeds its raw parameter to the fused ops, which build `L`
//! inside (no (Z, d, d) temporaries for the map or its backward); direct without a width
//! floor feeds its raw `A` (the ops use its symmetric part).
//!
//! Every form clamps `m2` at 0, so a `direct` precision that is not positive definite gives
//! `g = 1` along its negative directions in every kernel (never `g > 1` or infinite); the
//! losses refuse such a precision ([`crate::repair::ensure_positive_definite`]).

pub(crate) mod conditioning;

pub(crate) mod diagonal;
pub(crate) mod distance_op;
pub(crate) mod expanded;
pub(crate) mod factors;
pub(crate) mod layer_op;
pub(crate) mod linear_op;
pub(crate) mod naive;
pub(crate) mod projected;
#[cfg(test)]
mod tests;

use candle_core::{DType, Tensor};

use crate::config::DistanceKernel;
use crate::cpu::{with_row_major, Sizes, TILE_ROWS};
use crate::error::{GaussError, Result};
use crate::precision::{DistanceOperand, Precision};
use crate::route::{backend, Backend};
use conditioning::Conditioning;
use distance_op::FusedPlan;
use expanded::Source;
use factors::FactorMap;

/// The kernel that runs once [`DistanceKernel::Auto`] and the device are resolved (for logs
/// and benchmarks: [`crate::GaussLayer::resolved_kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResolvedKernel {
    /// Fused CPU op for a diagonal precision.
    DiagonalFused,
    /// Portable form for a diagonal precision.
    DiagonalTensorOps,
    /// Fused CPU op for the projected form.
    ProjectedFused,
    /// Portable projected form (one GEMM against the stacked factors).
    ProjectedTensorOps,
    /// Fused CPU op for the expanded symmetric form, forward and backward.
    ExpandedFused,
    /// Fused CPU op: projected forward (lean scratch where the expanded forward's row tiles
    /// would be short), expanded backward.
    ExpandedBackwardFused,
    /// Portable expanded symmetric form.
    ExpandedTensorOps,
    /// (B, Z, d) broadcast form (portable).
    Naive,
    /// lowrank: the fused diagonal op plus one GEMM against the stacked `U` factors.
    LowRankFused,
    /// lowrank: the portable diagonal form plus the portable projected form on `U`.
    LowRankTensorOps,
}

impl ResolvedKernel {
    /// A short name for logs and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            ResolvedKernel::DiagonalFused => "diagonal_fused",
            ResolvedKernel::DiagonalTensorOps => "diagonal_tensor_ops",
            ResolvedKernel::ProjectedFused => "projected_fused",
            ResolvedKernel::ProjectedTensorOps => "projected_tensor_ops",
            ResolvedKernel::ExpandedFused => "expanded_fused",
            ResolvedKernel::ExpandedBackwardFused => "projected_forward_expanded_backward_fused",
            ResolvedKernel::ExpandedTensorOps => "expanded_tensor_ops",
            ResolvedKernel::Naive => "naive",
            ResolvedKernel::LowRankFused => "low_rank_fused",
            ResolvedKernel::LowRankTensorOps => "low_rank_tensor_ops",
        }
    }
}

/// What the resolved kernel takes as its precision input.
#[derive(Clone, Debug)]
pub(crate) enum Operand {
    /// (Z, d) diagonal precisions, for the portable form (the fused one is
    /// [`Operand::Fused`] with [`FusedPlan::Diagonal`]).
    Diagonal(Tensor),
    /// (Z, d, d) factors `F` with `P = F Fᵀ`.
    Factor(Tensor),
    /// (Z, d, d) precision matrices.
    Matrix(Tensor),
    /// The fused distance op's input ((Z, d, d); (Z, d) for the diagonal plan) and its plan.
    Fused(Tensor, FusedPlan),
    /// lowrank: the diagonal `e^θ` (Z, d) and the factor `U` (Z, d, r).
    LowRank(Tensor, Tensor),
}

/// A resolved kernel with its input and the call's sizes, ready to run.
#[derive(Clone, Debug)]
pub(crate) struct Resolved {
    pub kernel: ResolvedKernel,
    pub operand: Operand,
    /// The sizes checked at the public boundary, passed inward so no op checks `x` again.
    pub sizes: Sizes,
}

impl Resolved {
    /// Whether the resolver planned a fused CPU op (the [`Backend::CpuFused`] route), so the
    /// rest of the layer may run fused CPU ops too.
    pub(crate) fn runs_fused(&self) -> bool {
        matches!(self.operand, Operand::Fused(..)) || self.kernel == ResolvedKernel::LowRankFused
    }
}

/// Whether the fused CPU ops can run on these tensors: all on the [`Backend::CpuFused`] route.
fn fused_applies(x: &Tensor, center: &Tensor, precision: &Precision, portable: bool) -> bool {
    backend(x.device(), x.dtype(), portable) == Backend::CpuFused
        && center.dtype() == x.dtype()
        && precision.raw().dtype() == x.dtype()
}

/// The fused ops' precision input, as [`Precision::distance_operand`] picks it.
fn fused_operand(precision: &Precision) -> Result<(Source, Tensor)> {
    Ok(match precision.distance_operand()? {
        DistanceOperand::CholeskyRaw {
            raw,
            positive_map,
            floor,
        } => (
            Source::Factor(FactorMap::Cholesky {
                positive_map,
                floor,
            }),
            raw,
        ),
        DistanceOperand::Factor(factor) => (Source::Factor(FactorMap::Identity), factor),
        DistanceOperand::Matrix(matrix) => (Source::Matrix, matrix),
    })
}

/// The conditioning of the centers and the fused input, read on the host (CPU tensors).
fn measure(center: &Tensor, input: &Tensor, source: Source, s: Sizes) -> Result<Conditioning> {
    Ok(match center.dtype() {
        DType::F32 => with_row_major::<f32, _>(center, |c| {
            with_row_major::<f32, _>(input, |p| Ok(Conditioning::measure(c, p, source, s)))
        })?,
        _ => with_row_major::<f64, _>(center, |c| {
            with_row_major::<f64, _>(input, |p| Ok(Conditioning::measure(c, p, source, s)))
        })?,
    })
}

/// Whether the fused projected op's backward beats the expanded one: for a batch no larger
/// than twice the width. The projected backward costs about 2·B·d² + d³ multiply-adds per
/// neuron in Z small GEMMs; the expanded one B·d²/2 in one GEMM over the d(d+1)/2 products
/// plus d³ to reach the factor, with tiles whose packing grows with d². Measured with
/// `bench --backward --kernel auto|projected` (2 cores, f32, Z = 16–64): projected/expanded
/// 0.35 at (B, d) = (64, 784), 0.39 at (64, 256), 0.67 at (256, 256), 0.74 at (128, 128),
/// 0.85 at (256, 128), about 1 at (64, 64); 0.92–1.3 from B = 4d, 1.3 at (1024, 16).
fn projected_backward_is_faster(s: Sizes) -> bool {
    s.batch <= 2 * s.dim
}

fn projected_needs_factor(precision: &Precision) -> GaussError {
    GaussError::config(
        "kernel",
        format!(
            "`projected` needs a factor P = F Fᵀ, which the `{}` parameterization does not keep; use `auto`, `expanded` or `naive`",
            precision.parameterization()
        ),
    )
}

/// The one resolver: which kernel runs for these arguments, with its input.
///
/// `portable` forces the tensor-op forms (what CUDA and Metal run) on the CPU too. `s` are
/// the sizes of `x`, `center` and `precision`, which the caller has checked (the public
/// boundary: the layer's forward, `ops`); nothing here checks them again.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d)
pub(crate) fn resolve(
    s: Sizes,
    x: &Tensor,
    center: &Tensor,
    precision: &Precision,
    kernel: DistanceKernel,
    portable: bool,
) -> Result<Resolved> {
    let resolved = |kernel, operand| {
        Ok(Resolved {
            kernel,
            operand,
            sizes: s,
        })
    };
    if kernel == DistanceKernel::Naive {
        return resolved(
            ResolvedKernel::Naive,
            Operand::Matrix(precision.precision_matrix()?),
        );
    }
    let fused = fused_applies(x, center, precision, portable);
    if precision.is_low_rank() && kernel == DistanceKernel::Auto {
        let (theta, u) = crate::precision::low_rank::parts(precision)?;
        let kernel = if fused {
            ResolvedKernel::LowRankFused
        } else {
            ResolvedKernel::LowRankTensorOps
        };
        return resolved(
            kernel,
            Operand::LowRank(crate::cpu::exp(&theta, portable)?, u),
        );
    }
    if let Some(diagonal) = precision.diagonal_precision()? {
        return if fused {
            resolved(
                ResolvedKernel::DiagonalFused,
                Operand::Fused(diagonal, FusedPlan::Diagonal),
            )
        } else {
            resolved(
                ResolvedKernel::DiagonalTensorOps,
                Operand::Diagonal(diagonal),
            )
        };
    }
    if !fused {
        // Portable: decided without reading device data.
        return match (kernel, precision.factor()?) {
            (DistanceKernel::Expanded, _) => resolved(
                ResolvedKernel::ExpandedTensorOps,
                Operand::Matrix(precision.precision_matrix()?),
            ),
            (_, Some(factor)) => {
                resolved(ResolvedKernel::ProjectedTensorOps, Operand::Factor(factor))
            }
            (DistanceKernel::Projected, None) => Err(projected_needs_factor(precision)),
            (_, None) => resolved(
                ResolvedKernel::Naive,
                Operand::Matrix(precision.precision_matrix()?),
            ),
        };
    }
    let (source, input) = fused_operand(precision)?;
    let expanded = |projected_forward: bool| {
        let plan = FusedPlan::Expanded {
            source,
            projected_forward,
        };
        let kernel = if projected_forward {
            ResolvedKernel::ExpandedBackwardFused
        } else {
            ResolvedKernel::ExpandedFused
        };
        resolved(kernel, Operand::Fused(input.clone(), plan))
    };
    let projected = |map| {
        resolved(
            ResolvedKernel::ProjectedFused,
            Operand::Fused(input.clone(), FusedPlan::Projected(map)),
        )
    };
    match (kernel, source) {
        (DistanceKernel::Expanded, _) => expanded(false),
        (DistanceKernel::Projected, Source::Factor(map)) => projected(map),
        (DistanceKernel::Projected, Source::Matrix) => Err(projected_needs_factor(precision)),
        // Where the projected backward is the faster one, the check is not needed either.
        (_, Source::Factor(map)) if projected_backward_is_faster(s) => projected(map),
        (_, source) => {
            let accurate = measure(center, &input, source, s)?.expanded_is_accurate(x.dtype());
            match source {
                Source::Factor(_) if accurate => {
                    expanded(expanded::forward_tile_rows(s.dim) < TILE_ROWS)
                }
                Source::Matrix if accurate => expanded(false),
                Source::Factor(map) => projected(map),
                Source::Matrix => resolved(
                    ResolvedKernel::Naive,
                    Operand::Matrix(precision.precision_matrix()?),
                ),
            }
        }
    }
}

/// `g = exp(-m2/2)` ([`crate::ops::gaussian`]; here so the kernels do not import `ops`,
/// which sits above them).
///
/// # Shapes
/// `mahalanobis_sq`: any → the same
pub(crate) fn gaussian(mahalanobis_sq: &Tensor) -> Result<Tensor> {
    Ok((mahalanobis_sq * -0.5)?.exp()?)
}

/// Runs a resolved kernel: `m2` (B, Z).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d) → (B, Z)
pub(crate) fn run(x: &Tensor, center: &Tensor, resolved: &Resolved) -> Result<Tensor> {
    if !matches!(x.dtype(), DType::F16 | DType::BF16) {
        return run_operand(
            x,
            center,
            &resolved.operand,
            resolved.kernel,
            resolved.sizes,
        );
    }
    // Half precision (always the portable forms) computes m2 in f32 and rounds the result
    // once: the expanded forms' terms (`Σ p x²`, x near 20) cancel to nothing in bf16's 8
    // bits (m2 = 2 came out 0), overflow f16 for inputs near 250, and Candle's CPU sums stall
    // in the half dtype. The casts are differentiable and f32 exists on every device.
    let widen = |t: &Tensor| t.to_dtype(DType::F32);
    let operand = match &resolved.operand {
        Operand::Diagonal(p) => Operand::Diagonal(widen(p)?),
        Operand::Factor(f) => Operand::Factor(widen(f)?),
        Operand::Matrix(p) => Operand::Matrix(widen(p)?),
        Operand::LowRank(diagonal, u) => Operand::LowRank(widen(diagonal)?, widen(u)?),
        Operand::Fused(input, plan) => Operand::Fused(widen(input)?, *plan),
    };
    let m2 = run_operand(
        &widen(x)?,
        &widen(center)?,
        &operand,
        resolved.kernel,
        resolved.sizes,
    )?;
    Ok(m2.to_dtype(x.dtype())?)
}

/// [`run`] on tensors of one dtype.
fn run_operand(
    x: &Tensor,
    center: &Tensor,
    operand: &Operand,
    kernel: ResolvedKernel,
    sizes: Sizes,
) -> Result<Tensor> {
    let portable = match (operand, kernel) {
        (Operand::Fused(input, plan), _) => {
            return distance_op::apply(sizes, x, center, input, *plan)
        }
        (Operand::LowRank(diagonal, u), ResolvedKernel::LowRankFused) => {
            let diagonal_part =
                distance_op::apply(sizes, x, center, diagonal, FusedPlan::Diagonal)?;
            return Ok((diagonal_part + projected::stacked(x, center, u)?)?);
        }
        (Operand::LowRank(diagonal, u), _) => {
            (diagonal::portable(x, center, diagonal)? + projected::stacked(x, center, u)?)?
        }
        (Operand::Diagonal(p), _) => diagonal::portable(x, center, p)?,
        (Operand::Factor(f), _) => projected::portable(x, center, f)?,
        (Operand::Matrix(p), ResolvedKernel::ExpandedTensorOps) => {
            expanded::portable(x, center, p)?
        }
        (Operand::Matrix(p), _) => naive::portable(x, center, p)?,
    };
    poison_non_finite_rows(x, &portable)
}

/// The portable forms' version of the fused ops' rule for non-finite input rows: `Σ_i 0·x_bi`
/// is 0 for a finite row and NaN otherwise, so adding it makes exactly those rows NaN (its
/// gradient is 0 elsewhere). The zeros are summed, not the row: a finite row's sum can
/// overflow (d = 1000 values of 70 in f16), and `0·∞` would poison it.
fn poison_non_finite_rows(x: &Tensor, m2: &Tensor) -> Result<Tensor> {
    let poison = (x.detach() * 0.0)?.sum_keepdim(1)?;
    Ok(m2.broadcast_add(&poison)?)
}

/// `max(m2, 0)` that keeps NaN (a comparison is false for NaN on every device): the
/// tensor-op forms that can come out negative (naive with a precision that is not positive
/// definite, expanded) clamp with it. Candle's `relu` (and CUDA's `maximum`, `fmaxf`) map NaN
/// to 0, so clamping with it turned an `m2` that overflowed to NaN (∞ − ∞, f32 inputs of 1e20)
/// into 0: `g = 1`, full confidence where the layer should say "I don't know".
fn clamp_at_zero(m2: &Tensor) -> Result<Tensor> {
    Ok(m2.lt(0.0)?.where_cond(&m2.zeros_like()?, m2)?)
}

/// Squared Mahalanobis distances through the resolver (see the module table).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d) → (B, Z)
pub(crate) fn mahalanobis_sq(
    s: Sizes,
    x: &Tensor,
    center: &Tensor,
    precision: &Precision,
    kernel: DistanceKernel,
    portable: bool,
) -> Result<Tensor> {
    let resolved = resolve(s, x, center, precision, kernel, portable)?;
    run(x, center, &resolved)
}
