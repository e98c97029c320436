//! The functional core of the Gaussian NLL: from the squared Mahalanobis distance `m2` and
//! `log det P`,
//!
//! `nll = m2/2 − log|P|/2 + d/2 · log 2π`.
//!
//! It works with `m2` and the log-determinant only, never with `log g` of an underflowed
//! `g = exp(−m2/2)`, so narrow Gaussians give large but finite losses.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_losses::nll_from_mahalanobis;
//! // Standard normal in 2-D at its mean: m2 = 0, log|P| = 0, nll = log 2π.
//! let m2 = Tensor::new(&[0.0f64], &Device::Cpu)?;
//! let log_det = Tensor::new(0.0f64, &Device::Cpu)?;
//! let nll = nll_from_mahalanobis(&m2, &log_det, 2)?;
//! let value = nll.to_vec1::<f64>()?[0];
//! assert!((value - (2.0 * std::f64::consts::PI).ln()).abs() < 1e-12);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::Tensor;
use gauss_layer::ops;

use gauss_layer::Result;

/// `d/2 · log 2π`, the normalizing constant of a d-dimensional normal.
pub fn log_normalizer(dim: usize) -> f64 {
    0.5 * dim as f64 * (2.0 * std::f64::consts::PI).ln()
}

/// `m2/2 − log_det_precision/2 + d/2 · log 2π`, broadcasting `log_det_precision` over the
/// leading (batch) dimension.
///
/// # Shapes
/// `mahalanobis_sq`: (B) with `log_det_precision`: () → (B);
/// `mahalanobis_sq`: (B, Z) with `log_det_precision`: (Z) → (B, Z)
///
/// # Errors
/// Shapes that do not broadcast (a Candle error).
pub fn nll_from_mahalanobis(
    mahalanobis_sq: &Tensor,
    log_det_precision: &Tensor,
    dim: usize,
) -> Result<Tensor> {
    let half_log_det = (log_det_precision * 0.5)?;
    let nll = (mahalanobis_sq * 0.5)?
        .broadcast_sub(&half_log_det)?
        .affine(1.0, log_normalizer(dim))?;
    Ok(nll)
}

/// `2 Σ_i log |F_ii|`: `log det (F Fᵀ)` for triangular factors `F`. The absolute value keeps
/// it right (and its gradient `1/F_ii` right) for a factor with negative diagonal entries.
///
/// # Shapes
/// `factors`: (Z, d, d) → (Z)
///
/// # Errors
/// A tensor that is not a batch of square matrices.
pub fn log_det_from_triangular(factors: &Tensor) -> Result<Tensor> {
    let diagonal = ops::diagonal(factors)?;
    Ok((diagonal.abs()?.log()?.sum(1)? * 2.0)?)
}
