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

use super::{sum_exp_negated, Precision};
use crate::config::{Parameterization, PrecisionConfig};
use crate::error::{check_device, check_dtype, GaussError, Result};
use crate::linalg::sum_accumulated;
use crate::linalg::{self, host};

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
fn capacitance(theta: &Tensor, u: &Tensor, portable: bool) -> Result<(Tensor, Tensor)> {
    let rank = u.dim(2)?;
    let inverse_diagonal = theta.neg()?.exp()?.unsqueeze(2)?; // (Z, d, 1)
    let scaled = u.broadcast_mul(&inverse_diagonal)?; // D⁻¹ U
    let inner = linalg::matmul(&linalg::transpose(u)?, &scaled)?; // Uᵀ D⁻¹ U
    let eye = linalg::eye_like(rank, u)?;
    let lower = linalg::cholesky_routed(&inner.broadcast_add(&eye)?, portable)?;
    Ok((lower, scaled))
}

/// `θ` and `Y = C⁻¹ (D⁻¹U)ᵀ` (Z, r, d), with `C` the capacitance's Cholesky factor: the
/// Woodbury correction to `D⁻¹` is `Yᵀ Y`.
fn woodbury_factor(precision: &Precision) -> Result<(Tensor, Tensor)> {
    let (theta, u) = parts(precision)?;
    let (lower, scaled) = capacitance(&theta, &u, precision.config().portable)?;
    let y = linalg::matmul(
        &linalg::tril_inverse_routed(&lower, precision.config().portable)?,
        &linalg::transpose(&scaled)?,
    )?;
    Ok((theta, y))
}

/// The dense precision matrices (asked for explicitly).
pub(super) fn precision_matrix(precision: &Precision) -> Result<Tensor> {
    let (theta, u) = parts(precision)?;
    Ok((linalg::diag_embed(&theta.exp()?)? + linalg::gram(&u)?)?)
}

/// The dense covariance by Woodbury: `D⁻¹ − (D⁻¹U) (I + K)⁻¹ (D⁻¹U)ᵀ`.
pub(super) fn covariance_matrix(precision: &Precision) -> Result<Tensor> {
    let (theta, y) = woodbury_factor(precision)?;
    // (D⁻¹U)(I + K)⁻¹(D⁻¹U)ᵀ = Yᵀ Y.
    let correction = linalg::matmul(&linalg::transpose(&y)?, &y)?;
    Ok((linalg::diag_embed(&theta.neg()?.exp()?)? - correction)?)
}

/// `log det P = Σ θ + 2 Σ log C_ii`.
pub(super) fn log_det_precision(precision: &Precision) -> Result<Tensor> {
    let (theta, u) = parts(precision)?;
    let (lower, _) = capacitance(&theta, &u, precision.config().portable)?;
    let log_det_capacitance =
        (sum_accumulated(&linalg::diagonal(&lower)?.log()?, D::Minus1)? * 2.0)?;
    Ok((sum_accumulated(&theta, D::Minus1)? + log_det_capacitance)?)
}

/// `tr Σ = Σ e^{−θ} − ‖C⁻¹ (D⁻¹U)ᵀ‖²_F`.
pub(super) fn trace_covariance(precision: &Precision) -> Result<Tensor> {
    let (theta, y) = woodbury_factor(precision)?;
    let inverse_diagonal = sum_exp_negated(&theta, precision.config().portable)?;
    Ok((inverse_diagonal - sum_accumulated(&y.sqr()?, (1, 2))?)?)
}

/// `tr P = Σ e^θ + ‖U‖²_F`.
pub(super) fn trace_precision(precision: &Precision) -> Result<Tensor> {
    let (theta, u) = parts(precision)?;
    Ok((sum_accumulated(&theta.exp()?, D::Minus1)? + sum_accumulated(&u.sqr()?, (1, 2))?)?)
}

impl Precision {
    /// lowrank's precision `P = diag(diagonal) + U Uᵀ` from its parts, with no factorization:
    /// the raw tensor is `[ln diagonal | U]`, so `precision_matrix()` gives back exactly
    /// `diag(diagonal) + U Uᵀ` (to rounding). lowrank takes no width floor (a config with
    /// one is refused).
    ///
    /// # Shapes
    /// `diagonal`: (Z, d), `factor` U: (Z, d, r) for `lowrank:r`.
    ///
    /// # Errors
    /// A config that is not lowrank of rank r; shapes that do not match; a diagonal entry that
    /// is not finite and positive; dtypes or devices that differ.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use gauss_layer::{GaussLayerConfig, Parameterization, Precision};
    /// let config = GaussLayerConfig::with_parameterization(Parameterization::LowRank { rank: 1 });
    /// // P = diag(1, 2) + u uᵀ with u = (1, 1).
    /// let diagonal = Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?;
    /// let u = Tensor::new(&[[[1.0f64], [1.0]]], &Device::Cpu)?;
    /// let precision = Precision::from_low_rank(&diagonal, &u, &config)?;
    /// let p = precision.precision_matrix()?.to_vec3::<f64>()?;
    /// assert!((p[0][0][0] - 2.0).abs() < 1e-12 && (p[0][1][1] - 3.0).abs() < 1e-12);
    /// # Ok::<(), gauss_layer::GaussError>(())
    /// ```
    pub fn from_low_rank(
        diagonal: &Tensor,
        factor: &Tensor,
        config: impl Into<PrecisionConfig>,
    ) -> Result<Self> {
        let config: PrecisionConfig = config.into();
        let (z, d, r) = factor
            .dims3()
            .map_err(|_| GaussError::shape("low-rank factor U", "(Z, d, r)", factor.dims()))?;
        if config.parameterization != (Parameterization::LowRank { rank: r }) {
            return Err(GaussError::config(
                "parameterization",
                format!(
                    "a diagonal plus a rank-{r} factor needs `lowrank:{r}`, got `{}`",
                    config.parameterization
                ),
            ));
        }
        if diagonal.dims() != [z, d] {
            return Err(GaussError::shape(
                "low-rank diagonal",
                format!("({z}, {d}) for a factor of shape ({z}, {d}, {r})"),
                diagonal.dims(),
            ));
        }
        check_dtype("low-rank diagonal", diagonal, factor.dtype(), "the factor")?;
        check_device("low-rank diagonal", diagonal, factor.device(), "the factor")?;
        let values = host::to_host_values(diagonal)?;
        if let Some(bad) = values.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            return Err(GaussError::data(
                "low-rank diagonal",
                format!("every entry must be finite and > 0, got {bad}"),
            ));
        }
        let raw = Tensor::cat(&[&diagonal.log()?.unsqueeze(2)?, factor], 2)?;
        Self::from_raw(raw, d, config)
    }
}
