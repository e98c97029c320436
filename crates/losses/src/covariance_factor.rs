//! Gaussian NLL with the covariance given by its Cholesky factor `S = Λ Λᵀ` (J. Rennie's
//! parameterization):
//!
//! `nll(x) = |Λ⁻¹(x − μ)|²/2 + Σ_i log Λ_ii + d/2 · log 2π`,
//!
//! `S⁻¹ = Λ⁻ᵀ Λ⁻¹` through [`gauss_layer::ops::tril_inverse`] (a Candle op with a
//! closed-form backward on CPU and CUDA, matmuls elsewhere), so it is differentiable on
//! every device. Closed-form gradients for `J = Σ_a nll(x_a)`:
//! `dJ/dμ = −Σ_a S⁻¹(x_a − μ)`, `dJ/dΛ = n S⁻¹Λ − S⁻¹RᵀRS⁻¹Λ`, `R` the centered data.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use gauss_losses::{nll_covariance_factor, nll_precision_factor, Reduction};
//! let device = Device::Cpu;
//! let x = Tensor::new(&[[0.5f64, -1.0], [2.0, 0.25]], &device)?;
//! let mean = Tensor::new(&[0.1f64, 0.2], &device)?;
//! // S = diag(4, 1/4) as a covariance factor is P = diag(1/4, 4) as a precision factor.
//! let scale_tril = Tensor::new(&[[2.0f64, 0.0], [0.0, 0.5]], &device)?;
//! let tril = Tensor::new(&[[0.5f64, 0.0], [0.0, 2.0]], &device)?;
//! let by_cov = nll_covariance_factor(&x, &mean, &scale_tril, Reduction::Sum)?;
//! let by_prec = nll_precision_factor(&x, &mean, &tril, Reduction::Sum)?;
//! let diff = (by_cov - by_prec)?.abs()?.to_scalar::<f64>()?;
//! assert!(diff < 1e-12);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::Tensor;
use gauss_layer::ops;

use crate::check;
use crate::gaussian::{log_det_from_triangular, nll_from_mahalanobis};
use crate::reduction::Reduction;
use gauss_layer::Result;

/// NLL of samples `x` under N(`mean`, Λ Λᵀ), `Λ` the lower triangle of `scale_tril`.
///
/// A sample holding ±∞ is not masked here: its NLL is +∞, or NaN where the projection meets
/// ∞ − ∞ (as in torch's `MultivariateNormal.log_prob`). [`crate::layer_nll()`] and
/// `GaussLayer::log_prob` give +∞ (−∞ log-density) for such a sample.
///
/// # Shapes
/// `x`: (N, d), `mean`: (d), `scale_tril`: (d, d) → (N) for [`Reduction::None`], () otherwise
///
/// # Errors
/// Samples that are not (N, d) with N ≥ 1, a mean or factor of another size, dtype or device;
/// a factor with a zero or non-finite diagonal entry ([`gauss_layer::GaussError::Numerical`]).
pub fn nll_covariance_factor(
    x: &Tensor,
    mean: &Tensor,
    scale_tril: &Tensor,
    reduction: Reduction,
) -> Result<Tensor> {
    let d = check::gaussian_args(x, mean, scale_tril, "covariance factor scale_tril")?;
    check::nonsingular_triangular(scale_tril, "covariance factor scale_tril")?;

    let factor = ops::tril(&scale_tril.unsqueeze(0)?)?;
    let inverse = ops::tril_inverse(&factor)?.squeeze(0)?;
    let centered = x.broadcast_sub(mean)?;
    // Row n of (x − μ) Λ⁻ᵀ is (Λ⁻¹(x_n − μ))ᵀ: the whitened sample.
    let whitened = centered.matmul(&inverse.t()?)?;
    let mahalanobis_sq = whitened.sqr()?.sum(1)?;
    // log det P = −log det S = −2 Σ log Λ_ii.
    let log_det_precision = log_det_from_triangular(&factor)?.squeeze(0)?.neg()?;
    reduction.apply(&nll_from_mahalanobis(
        &mahalanobis_sq,
        &log_det_precision,
        d,
    )?)
}
