//! The maximum-likelihood fit within the parameterization's family that gradient descent
//! should reach: the sample mean and the biased (divide by N) sample covariance, projected
//! onto the family in closed form (diagonal for `diag`, a multiple of the identity for
//! `sphere`). `lowrank:R` below full rank (`diag(e^θ) + U Uᵀ` precisions, R < d) cannot hold
//! the sample covariance and its maximizer has no closed form, so its reference is the
//! library's own maximum-likelihood fit over that family: EM on a one-component
//! `GaussianMixture` (the mean is the sample mean; the M-steps ascend the lowrank likelihood
//! monotonically until it stops changing).

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::{gaussian_mixture, MixtureFitOptions, PrecisionConfig};
use gauss_layer::{GaussLayerConfig, MultivariateNormal, Parameterization};

/// EM's stopping rule for the lowrank reference (nats per sample): far below the 1e-9 the
/// summary prints, so the reference is the maximizer to every printed digit.
const LOW_RANK_TOL: f64 = 1e-12;

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
    /// How the reference was found, for the summary.
    pub method: &'static str,
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
    let mut method = "closed form";
    let covariance = match parameterization {
        Parameterization::Diag => eye.broadcast_mul(&variances.unsqueeze(0)?)?,
        Parameterization::Sphere => (eye * (total_variance / d as f64))?,
        // The full sample covariance is out of reach below full rank: comparing with it
        // would report an error gradient descent can never close.
        Parameterization::LowRank { rank } if rank < d => {
            // Along a null direction of a singular sample covariance the lowrank likelihood
            // grows without bound, so no maximizer exists: refuse it as the full forms do
            // (EM would stop at its variance bound and report that as the MLE).
            let cholesky = GaussLayerConfig::with_parameterization(Parameterization::Cholesky);
            MultivariateNormal::from_covariance(&mean, &full, cholesky)
                .context("the sample covariance is singular")?;
            let (covariance, converged) = low_rank_covariance(x, parameterization)?;
            // Unconverged, the reference is still the best lowrank fit EM found, but gradient
            // descent may beat it: say so rather than fail or pass it off as the maximizer.
            method = if converged {
                "EM within the family"
            } else {
                "EM within the family, stopped before convergence"
            };
            covariance
        }
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
        method,
    })
}

/// The covariance of the maximum-likelihood Gaussian of `x` within `parameterization`'s
/// family, fitted by EM on one component: every responsibility is 1, so each M-step ascends
/// the family's likelihood of the sample covariance, without `reg_covar` (a plain MLE).
///
/// Returns the covariance and whether EM met its tolerance.
///
/// # Shapes
/// `x`: (N, d), f64 → (d, d)
fn low_rank_covariance(x: &Tensor, parameterization: Parameterization) -> Result<(Tensor, bool)> {
    let d = x.dim(1)?;
    let varmap = VarMap::new();
    // f64: fit-gaussian runs on the CPU (`main` fixes the device), in f64 like the samples.
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, x.device());
    let config = GaussLayerConfig {
        precision: PrecisionConfig::with_parameterization(parameterization),
        ..Default::default()
    };
    let mixture = gaussian_mixture(d, 1, config, vb)?;
    let options = MixtureFitOptions {
        tol: LOW_RANK_TOL,
        reg_covar: 0.0,
        // One component: every start and seeding is the same.
        n_init: 1,
        kmeans_inits: 1,
        ..Default::default()
    };
    let fit = mixture
        .fit(x, &options)
        .context("fitting the lowrank maximum-likelihood reference")?;
    Ok((mixture.covariances()?.squeeze(0)?, fit.converged))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A column of standard deviation about 1e9 leaves the sample covariance valid (its
    /// correlation matrix is that of the unscaled data), in 2-D as in 3-D: the 2-D case was
    /// refused as singular (the host eigensolver gave its small eigenvalue as 0). Closed
    /// form: scaling column j by s multiplies det Σ by s², so the mean NLL
    /// `½·d·(1 + ln 2π) + ½·ln det Σ` grows by exactly ln s.
    #[test]
    fn a_wide_column_keeps_the_mle_in_two_dimensions_as_in_three() -> Result<()> {
        let scale = 1e9f64;
        for d in [2usize, 3] {
            let known = crate::data::KnownGaussian::random(d, 5);
            // f64: a unit test on Device::Cpu (the samples are f64, as fit-gaussian reads them).
            let x = known.sample(200, 6, &Device::Cpu)?;
            let factors: Vec<f64> = (0..d).map(|j| if j == 1 { scale } else { 1.0 }).collect();
            let wide = x.broadcast_mul(&Tensor::new(factors, &Device::Cpu)?.unsqueeze(0)?)?;
            let plain = maximum_likelihood(&x, Parameterization::Direct)?;
            let scaled = maximum_likelihood(&wide, Parameterization::Direct)
                .with_context(|| format!("d = {d}"))?;
            let expected = plain.nll + scale.ln();
            assert!(
                ((scaled.nll - expected) / expected).abs() < 1e-12,
                "d = {d}: NLL {} vs {expected}",
                scaled.nll
            );
        }
        Ok(())
    }

    /// lowrank:1 in 3-D cannot hold this correlated sample covariance: the reference must be
    /// what gradient descent within the family converges to (the target it can reach), and
    /// score between the diag fit and the full covariance.
    #[test]
    fn lowrank_reference_is_what_gradient_descent_reaches() -> Result<()> {
        let known = crate::data::KnownGaussian::random(3, 0);
        // f64: a unit test on Device::Cpu (the samples are f64, as fit-gaussian reads them).
        let x = known.sample(200, 1, &Device::Cpu)?;
        let low_rank = Parameterization::LowRank { rank: 1 };
        let reference = maximum_likelihood(&x, low_rank)?;
        let full = maximum_likelihood(&x, Parameterization::Cholesky)?;
        let diag = maximum_likelihood(&x, Parameterization::Diag)?;
        assert!(
            reference.nll > full.nll + 1e-4,
            "{} vs full {}",
            reference.nll,
            full.nll
        );
        assert!(
            reference.nll < diag.nll - 1e-4,
            "{} vs diag {}",
            reference.nll,
            diag.nll
        );

        let options = crate::fit::FitOptions {
            parameterization: low_rank,
            // The CLI's default: close to the reference already (about 1e-3 relative), where
            // the full sample covariance stays 0.1 away; converging takes ~20,000 steps.
            steps: 3000,
            lr: 0.05,
            grad_tol: 1e-7,
            min_eigenvalue: 0.1,
            seed: 2,
        };
        let fitted = crate::fit::fit(&x, &Device::Cpu, &options)?;
        let layer = fitted.net.layers().first().context("one layer")?;
        let covariance = layer.precision().covariance_matrix()?.squeeze(0)?;
        let error = relative_frobenius_error(&covariance, &reference.covariance)?;
        assert!(error < 1e-2, "covariance error {error}");
        let gap = fitted.nll - reference.nll;
        assert!(
            (-1e-9..1e-3).contains(&gap),
            "fitted {} vs {}",
            fitted.nll,
            reference.nll
        );
        assert_eq!(reference.method, "EM within the family");
        Ok(())
    }
}
