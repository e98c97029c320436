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

use candle_core::{Tensor, D};
use gauss_layer::ops::{self, log_prob_from_mahalanobis};

use crate::check;

use gauss_layer::{GaussError, Result};

/// `d/2 · log 2π`, the normalizing constant of a d-dimensional normal (the layer crate's
/// [`gauss_layer::ops::log_normalizer`], one definition for both crates).
pub use gauss_layer::ops::log_normalizer;

/// `m2/2 − log_det_precision/2 + d/2 · log 2π`, broadcasting `log_det_precision` over the
/// leading (batch) dimension: the negative of the layer crate's
/// [`gauss_layer::ops::log_prob_from_mahalanobis`] (bit for bit: negation is exact).
///
/// # Shapes
/// `mahalanobis_sq`: (B) with `log_det_precision`: () → (B);
/// `mahalanobis_sq`: (B, Z) with `log_det_precision`: (Z) → (B, Z)
///
/// # Errors
/// A tensor of a non-float dtype, or two of different dtypes
/// ([`gauss_layer::GaussError::DType`]); on different devices
/// ([`gauss_layer::GaussError::DeviceMismatch`]); a `mahalanobis_sq` without a batch
/// dimension, or a `log_det_precision` whose shape is not a trailing part of
/// `mahalanobis_sq`'s after it ([`gauss_layer::GaussError::Shape`]).
pub fn nll_from_mahalanobis(
    mahalanobis_sq: &Tensor,
    log_det_precision: &Tensor,
    dim: usize,
) -> Result<Tensor> {
    // The checks are log_prob_from_mahalanobis's (the functional core's).
    Ok(log_prob_from_mahalanobis(mahalanobis_sq, log_det_precision, dim)?.neg()?)
}

/// `2 Σ_i log |F_ii|`: `log det (F Fᵀ)` for triangular factors `F`. The absolute value keeps
/// it right (and its gradient `1/F_ii` right) for a factor with negative diagonal entries.
///
/// # Shapes
/// `factors`: (Z, d, d) → (Z); any batch of square matrices (…, d, d) → (…)
///
/// # Errors
/// A tensor that is not a batch of square matrices, or not of a float dtype.
pub fn log_det_from_triangular(factors: &Tensor) -> Result<Tensor> {
    check::float_dtype(factors, "triangular factors")?;
    let dims = factors.dims();
    if dims.len() < 2 || dims[dims.len() - 1] != dims[dims.len() - 2] {
        return Err(GaussError::shape("triangular factors", "(..., d, d)", dims));
    }
    let diagonal = ops::diagonal(factors)?;
    // The sum runs over each matrix's own diagonal, the last axis, whatever the batch rank.
    Ok((diagonal.abs()?.log()?.sum(D::Minus1)? * 2.0)?)
}
