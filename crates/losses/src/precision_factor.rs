//! Gaussian NLL with the precision given by its Cholesky factor `P = L Lᵀ`:
//!
//! `nll(x) = |Lᵀ(x − μ)|²/2 − Σ_i log L_ii + d/2 · log 2π`.
//!
//! No inverse is needed; only the lower triangle of `L` is read, so the gradient with
//! respect to its upper triangle is zero.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_losses::{nll_precision_factor, Reduction};
//! let device = Device::Cpu;
//! let x = Tensor::new(&[[0.0f64, 0.0], [1.0, -1.0]], &device)?;
//! let mean = Tensor::zeros(2, candle_core::DType::F64, &device)?;
//! let tril = Tensor::eye(2, candle_core::DType::F64, &device)?;
//! let per_sample = nll_precision_factor(&x, &mean, &tril, Reduction::None)?;
//! let log_2pi = (2.0 * std::f64::consts::PI).ln();
//! // Standard normal: nll = |x|²/2 + log 2π in two dimensions.
//! let values = per_sample.to_vec1::<f64>()?;
//! assert!((values[0] - log_2pi).abs() < 1e-12);
//! assert!((values[1] - (1.0 + log_2pi)).abs() < 1e-12);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::Tensor;
use gauss_layer::ops;

use crate::check;
use crate::gaussian::{log_det_from_triangular, nll_from_mahalanobis};
use crate::reduction::Reduction;
use gauss_layer::Result;

/// NLL of samples `x` under N(`mean`, (L Lᵀ)⁻¹), `L` the lower triangle of `tril`.
///
/// A sample holding ±∞ is not masked here: its NLL is +∞, or NaN where the projection meets
/// ∞ − ∞ (as in torch's `MultivariateNormal.log_prob`). [`crate::layer_nll()`] and
/// `GaussLayer::log_prob` give +∞ (−∞ log-density) for such a sample.
///
/// # Shapes
/// `x`: (N, d), `mean`: (d), `tril`: (d, d) → (N) for [`Reduction::None`], () otherwise
///
/// # Errors
/// Samples that are not (N, d) with N ≥ 1, a mean or factor of another size, dtype or device;
/// a factor with a zero or non-finite diagonal entry ([`gauss_layer::GaussError::Numerical`]).
pub fn nll_precision_factor(
    x: &Tensor,
    mean: &Tensor,
    tril: &Tensor,
    reduction: Reduction,
) -> Result<Tensor> {
    let d = check::gaussian_args(x, mean, tril, "precision factor tril")?;
    check::nonsingular_triangular(tril, "precision factor tril")?;

    let factor = ops::tril(&tril.unsqueeze(0)?)?;
    let centered = x.broadcast_sub(mean)?;
    // Row n of (x − μ) L is (Lᵀ(x_n − μ))ᵀ.
    let projected = centered.matmul(&factor.squeeze(0)?)?;
    let mahalanobis_sq = projected.sqr()?.sum(1)?;
    let log_det = log_det_from_triangular(&factor)?.squeeze(0)?;
    reduction.apply(&nll_from_mahalanobis(&mahalanobis_sq, &log_det, d)?)
}
