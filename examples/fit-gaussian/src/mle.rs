//! The closed-form maximum-likelihood fit that gradient descent should reach: the sample mean
//! and the biased (divide by N) sample covariance, projected onto the parameterization's
//! family (diagonal for `diag`, a multiple of the identity for `sphere`).

use anyhow::Result;
use candle_core::Tensor;
use gauss_layer::{GaussLayerConfig, MultivariateNormal, Parameterization};

/// The maximum-likelihood Gaussian of a data set within one family.
pub struct MaximumLikelihood {
    /// Sample mean (d).
    pub mean: Tensor,
    /// Covariance (d, d).
    pub covariance: Tensor,
    /// Trace of the full sample covariance (the data's total variance).
    pub total_variance: f64,
    /// Mean NLL of the data at this fit.
    pub nll: f64,
}

/// The MLE of `x` within the family of `parameterization`.
///
/// # Shapes
/// `x`: (N, d)
pub fn maximum_likelihood(
    x: &Tensor,
    parameterization: Parameterization,
) -> Result<MaximumLikelihood> {
    let (n, d) = x.dims2()?;
    let mean = x.mean(0)?;
    let centered = x.broadcast_sub(&mean)?;
    let full = (centered.t()?.matmul(&centered)? / n as f64)?;
    // The variances: the diagonal of the full covariance (the identity masks the rest).
    let eye = Tensor::eye(d, x.dtype(), x.device())?;
    let variances = (&full * &eye)?.sum(1)?;
    let total_variance = variances.sum_all()?.to_scalar::<f64>()?;
    let covariance = match parameterization {
        Parameterization::Diag => eye.broadcast_mul(&variances.unsqueeze(0)?)?,
        Parameterization::Sphere => (eye * (total_variance / d as f64))?,
        _ => full,
    };
    // The NLL through the library's own density (`direct` holds any SPD matrix as it is).
    let config = GaussLayerConfig::with_parameterization(Parameterization::Direct);
    let normal = MultivariateNormal::from_covariance(&mean, &covariance, config)?;
    let nll = normal.log_prob(x)?.mean_all()?.neg()?.to_scalar::<f64>()?;
    Ok(MaximumLikelihood {
        mean,
        covariance,
        total_variance,
        nll,
    })
}

/// `max_i |a_i − b_i|`.
pub fn max_abs_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()?)
}

/// `|A − B|_F / |B|_F`.
pub fn relative_frobenius_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = (a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    let norm = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    Ok(diff / norm)
}
