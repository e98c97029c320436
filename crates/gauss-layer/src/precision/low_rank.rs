//! lowrank: `P = diag(e^θ) + U Uᵀ` with θ (Z, d) and U (Z, d, r), stored as one raw tensor
//! (Z, d, r + 1): column 0 holds θ, columns 1..=r hold U. Positive definite for every finite
//! raw value (a positive diagonal plus a positive semi-definite term).
//!
//! The form for wide inputs: nothing here is O(d²) per neuron.
//! - `m2 = Σ_i e^{θ_i} δ_i² + ‖Uᵀ δ‖²` (in the kernels: the diagonal form plus a projected
//!   form with the (d, r) factor U), O(d·(r + 1)) per pair;
//! - with `D = diag(e^θ)`, `K = Uᵀ D⁻¹ U` (r, r) and `C = chol(I_r + K)`:
//!   `log det P = Σ θ + 2 Σ log C_ii` (matrix determinant lemma),
//!   `tr Σ = Σ e^{−θ} − ‖C⁻¹ (D⁻¹U)ᵀ‖²_F` (Woodbury), `tr P = Σ e^θ + ‖U‖²_F`;
//!   O(d·r²) per neuron, in tensor ops.

use candle_core::{Tensor, D};

use super::Precision;
use crate::error::Result;
use crate::linalg;

/// θ (Z, d) and U (Z, d, r) of the raw tensor.
pub(crate) fn parts(precision: &Precision) -> Result<(Tensor, Tensor)> {
    let raw = precision.raw();
    let columns = raw.dim(2)?;
    let theta = raw.narrow(2, 0, 1)?.squeeze(2)?;
    let u = raw.narrow(2, 1, columns - 1)?;
    Ok((theta, u))
}

/// `(C, D⁻¹U)`: the Cholesky factor of the capacitance `I_r + Uᵀ D⁻¹ U` (Z, r, r) and
/// `D⁻¹ U` (Z, d, r).
fn capacitance(theta: &Tensor, u: &Tensor) -> Result<(Tensor, Tensor)> {
    let rank = u.dim(2)?;
    let inverse_diagonal = theta.neg()?.exp()?.unsqueeze(2)?; // (Z, d, 1)
    let scaled = u.broadcast_mul(&inverse_diagonal)?; // D⁻¹ U
    let inner = linalg::matmul(&linalg::transpose(u)?, &scaled)?; // Uᵀ D⁻¹ U
    let eye = linalg::eye_like(rank, u)?;
    let lower = linalg::cholesky(&inner.broadcast_add(&eye)?)?;
    Ok((lower, scaled))
}

/// The dense precision matrices (asked for explicitly).
pub(super) fn precision_matrix(precision: &Precision) -> Result<Tensor> {
    let (theta, u) = parts(precision)?;
    Ok((linalg::diag_embed(&theta.exp()?)? + linalg::gram(&u)?)?)
}

/// The dense covariance by Woodbury: `D⁻¹ − (D⁻¹U) (I + K)⁻¹ (D⁻¹U)ᵀ`.
pub(super) fn covariance_matrix(precision: &Precision) -> Result<Tensor> {
    let (theta, u) = parts(precision)?;
    let (lower, scaled) = capacitance(&theta, &u)?;
    // (D⁻¹U)(I + K)⁻¹(D⁻¹U)ᵀ = Yᵀ Y with Y = C⁻¹ (D⁻¹U)ᵀ.
    let y = linalg::matmul(&linalg::tril_inverse(&lower)?, &linalg::transpose(&scaled)?)?;
    let correction = linalg::matmul(&linalg::transpose(&y)?, &y)?;
    Ok((linalg::diag_embed(&theta.neg()?.exp()?)? - correction)?)
}

/// `log det P = Σ θ + 2 Σ log C_ii`.
pub(super) fn log_det_precision(precision: &Precision) -> Result<Tensor> {
    let (theta, u) = parts(precision)?;
    let (lower, _) = capacitance(&theta, &u)?;
    let log_det_capacitance = (linalg::diagonal(&lower)?.log()?.sum(D::Minus1)? * 2.0)?;
    Ok((theta.sum(D::Minus1)? + log_det_capacitance)?)
}

/// `tr Σ = Σ e^{−θ} − ‖C⁻¹ (D⁻¹U)ᵀ‖²_F`.
pub(super) fn trace_covariance(precision: &Precision) -> Result<Tensor> {
    let (theta, u) = parts(precision)?;
    let (lower, scaled) = capacitance(&theta, &u)?;
    let y = linalg::matmul(&linalg::tril_inverse(&lower)?, &linalg::transpose(&scaled)?)?;
    Ok((theta.neg()?.exp()?.sum(D::Minus1)? - y.sqr()?.sum((1, 2))?)?)
}

/// `tr P = Σ e^θ + ‖U‖²_F`.
pub(super) fn trace_precision(precision: &Precision) -> Result<Tensor> {
    let (theta, u) = parts(precision)?;
    Ok((theta.exp()?.sum(D::Minus1)? + u.sqr()?.sum((1, 2))?)?)
}
