//! scikit-learn's `GaussianMixture` methods by their names there: `predict`,
//! `predict_proba`, `score_samples`, `score`, `bic`, `aic`, with the free-parameter count
//! that the criteria charge.

use candle_core::{DType, Tensor, D};

use crate::config::Parameterization;
use crate::error::{GaussError, Result};
use crate::linalg;

use super::{leading_dims, GaussianMixture};
use crate::linalg::accumulation_dtype;

impl GaussianMixture {
    /// The most probable component of each sample (scikit-learn's `predict`): the argmax of
    /// `log π_k + log N(x | c_k, P_k⁻¹)`.
    ///
    /// The input is not checked: a sample holding NaN or ±∞, or one so far away that every
    /// component gives it log-density −∞ (see [`GaussianMixture::log_prob`]), has no most
    /// probable component, and gets some component below K (component 0 on the CPU), where
    /// scikit-learn raises. Refusing it would take a read back from the device, which
    /// `predict` does not otherwise do (the labels stay on the device). To find such samples,
    /// look for the non-finite entries of [`GaussianMixture::log_prob`] (−∞, or NaN for a
    /// sample holding NaN).
    ///
    /// # Shapes
    /// `x`: (…, d) → (…), u32
    ///
    /// # Errors
    /// As [`crate::GaussLayer::log_prob`].
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        let joint = self.joint_log_prob(x)?;
        if joint.elem_count() == 0 {
            // No samples: Candle refuses an argmax over an empty tensor.
            return Ok(Tensor::zeros(
                leading_dims(&joint),
                DType::U32,
                joint.device(),
            )?);
        }
        Ok(joint.argmax(D::Minus1)?)
    }

    /// The posterior probability of each component (scikit-learn's `predict_proba`; the
    /// same as [`GaussianMixture::responsibilities`], NaN rows included).
    ///
    /// # Shapes
    /// `x`: (…, d) → (…, K)
    ///
    /// # Errors
    /// As [`crate::GaussLayer::log_prob`].
    pub fn predict_proba(&self, x: &Tensor) -> Result<Tensor> {
        self.responsibilities(x)
    }

    /// The log-density of each sample under the mixture (scikit-learn's `score_samples`;
    /// the same as [`GaussianMixture::log_prob`]).
    ///
    /// # Shapes
    /// `x`: (…, d) → (…)
    ///
    /// # Errors
    /// As [`crate::GaussLayer::log_prob`].
    pub fn score_samples(&self, x: &Tensor) -> Result<Tensor> {
        self.log_prob(x)
    }

    /// The mean log-density of the samples, nats per sample (scikit-learn's `score`): −∞
    /// when one sample's log-density is −∞ (see [`GaussianMixture::log_prob`]).
    ///
    /// # Shapes
    /// `x`: (…, d)
    ///
    /// # Errors
    /// As [`crate::GaussLayer::log_prob`]; no samples (scikit-learn refuses an empty `X`
    /// too).
    pub fn score(&self, x: &Tensor) -> Result<f64> {
        let log_prob = self.log_prob(x)?;
        if log_prob.elem_count() == 0 {
            return Err(GaussError::shape(
                "samples x",
                format!(
                    "(…, {}) with at least one sample (a mean over none is undefined)",
                    self.dim()
                ),
                x.dims(),
            ));
        }
        // Summed in f32 for f16 and bf16, whose own sums stall (a bf16 sum stops growing
        // once the next term is below half its last bit).
        let log_prob = log_prob.to_dtype(accumulation_dtype(log_prob.dtype()))?;
        linalg::read_scalar(&log_prob.mean_all()?)
    }

    /// The number of free parameters: K·d means, K − 1 weights, and per component the
    /// covariance's: d(d + 1)/2 (cholesky, direct, expm: scikit-learn's `full`), d (diag),
    /// 1 (sphere: `spherical`), and for lowrank:r the diagonal plus the factor up to its
    /// rotations, `d + d·r − r(r − 1)/2` (at most d(d + 1)/2). A tied mixture counts its
    /// one covariance once (scikit-learn's `tied`: K·d + d(d + 1)/2 + K − 1 for the full
    /// forms). A width floor adds none.
    pub fn num_parameters(&self) -> usize {
        let (k, d) = (self.num_components(), self.dim());
        let full = d * (d + 1) / 2;
        let per_component = match self.layer.config().precision.parameterization {
            Parameterization::Cholesky | Parameterization::Direct | Parameterization::Expm => full,
            Parameterization::Diag => d,
            Parameterization::Sphere => 1,
            Parameterization::LowRank { rank } => {
                let r = rank.min(d);
                (d + d * r - r * r.saturating_sub(1) / 2).min(full)
            }
        };
        let covariances = if self.is_tied() { 1 } else { k };
        covariances * per_component + k * d + k - 1
    }

    /// The Bayesian information criterion `−2·N·score + p·ln N` (scikit-learn's `bic`; lower
    /// is better), p from [`GaussianMixture::num_parameters`].
    ///
    /// # Shapes
    /// `x`: (…, d)
    ///
    /// # Errors
    /// As [`GaussianMixture::score`].
    pub fn bic(&self, x: &Tensor) -> Result<f64> {
        let n = (x.elem_count() / self.dim().max(1)) as f64;
        Ok(-2.0 * self.score(x)? * n + self.num_parameters() as f64 * n.ln())
    }

    /// The Akaike information criterion `−2·N·score + 2p` (scikit-learn's `aic`; lower is
    /// better).
    ///
    /// # Shapes
    /// `x`: (…, d)
    ///
    /// # Errors
    /// As [`GaussianMixture::score`].
    pub fn aic(&self, x: &Tensor) -> Result<f64> {
        let n = (x.elem_count() / self.dim().max(1)) as f64;
        Ok(-2.0 * self.score(x)? * n + 2.0 * self.num_parameters() as f64)
    }
}
