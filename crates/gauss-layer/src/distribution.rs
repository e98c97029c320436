//! One neuron as a distribution with the shapes of `torch.distributions.MultivariateNormal`:
//! `log_prob` of (…, d) samples is (…), `sample`/`rsample` give (n, d), `entropy` and
//! `kl_divergence` are scalars. The view shares the layer's tensors (a narrow of the center
//! and of the raw precision), so `rsample`, `log_prob`, `entropy` and `kl_divergence` carry
//! gradients to the layer's variables.
//!
//! Like torch's `validate_args` (on by default there), the view checks its input by default:
//! `log_prob` rejects a sample holding NaN with an error instead of returning NaN (infinities
//! pass, as in torch, and give a log-density of −∞). [`GaussLayer::log_prob`] itself does not
//! check (a pass over the input costs a reduction); [`GaussLayer::log_prob_validated`] does.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::{GaussLayerConfig, MultivariateNormal};
//! let device = Device::Cpu;
//! let mean = Tensor::new(&[1.0f64, -1.0], &device)?;
//! let covariance = Tensor::new(&[[2.0f64, 0.5], [0.5, 1.0]], &device)?;
//! let normal = MultivariateNormal::from_covariance(&mean, &covariance, GaussLayerConfig::default())?;
//! let x = Tensor::new(&[[1.0f64, -1.0], [0.0, 0.0]], &device)?;
//! assert_eq!(normal.log_prob(&x)?.dims(), &[2]); // (N), as torch
//! let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
//! assert_eq!(normal.sample(5, &mut rng)?.dims(), &[5, 2]); // (n, d)
//! // The entropy of N(μ, Σ): ½·d·(1 + ln 2π) + ½·ln det Σ, det Σ = 1.75.
//! let expected = (1.0 + (2.0 * std::f64::consts::PI).ln()) + 0.5 * 1.75f64.ln();
//! assert!((normal.entropy()?.to_scalar::<f64>()? - expected).abs() < 1e-12);
//! assert!(normal.kl_divergence(&normal)?.to_scalar::<f64>()?.abs() < 1e-12);
//! let nan = Tensor::new(&[[f64::NAN, 0.0]], &device)?;
//! assert!(normal.log_prob(&nan).is_err());
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::Tensor;
use rand::Rng;

use crate::config::GaussLayerConfig;
use crate::error::{check_dtype, GaussError, Result};
use crate::layer::GaussLayer;
use crate::linalg;
use crate::ops::log_normalizer;

/// One neuron's normal N(c, P⁻¹) as a distribution (see the module docs).
#[derive(Clone, Debug)]
pub struct MultivariateNormal {
    /// A one-neuron Gaussian-only layer sharing the source layer's tensors.
    layer: GaussLayer,
    validate_args: bool,
}

impl GaussLayer {
    /// Neuron `neuron`'s normal N(c, P⁻¹) as a [`MultivariateNormal`] (its Gaussian factor,
    /// for a layer with a linear part), sharing the layer's tensors.
    ///
    /// # Errors
    /// A neuron index out of range.
    pub fn distribution(&self, neuron: usize) -> Result<MultivariateNormal> {
        let z = self.out_features();
        if neuron >= z {
            return Err(GaussError::config(
                "neuron",
                format!("must be below the layer's {z} neurons, got {neuron}"),
            ));
        }
        let center = self.center().narrow(0, neuron, 1)?;
        let precision = self.precision();
        let precision = precision.with_raw(precision.raw().narrow(0, neuron, 1)?)?;
        let config = GaussLayerConfig {
            gaussian_only: true,
            tanh: false,
            tied_bias: false,
            ..self.config().clone()
        };
        let layer = GaussLayer::new(None, None, center, precision, config)?;
        Ok(MultivariateNormal {
            layer,
            validate_args: true,
        })
    }

    /// [`GaussLayer::log_prob`] after checking that `x` holds no NaN (torch's
    /// `validate_args`): the checked path; `log_prob` itself returns NaN for a NaN sample.
    ///
    /// # Shapes
    /// `x`: (…, d) → (…, Z)
    ///
    /// # Errors
    /// As [`GaussLayer::log_prob`]; a sample holding NaN (the message gives the first one's
    /// row).
    pub fn log_prob_validated(&self, x: &Tensor) -> Result<Tensor> {
        check_no_nan(x, self.in_features())?;
        self.log_prob(x)
    }
}

/// Errors when `x` (…, d) holds a NaN, naming the first row that does.
fn check_no_nan(x: &Tensor, d: usize) -> Result<()> {
    let (flat, _) = crate::density::flatten_leading(x, d, "input x")?;
    if flat.dims()[0] == 0 {
        return Ok(());
    }
    // NaN ≠ NaN: count the entries unequal to themselves, per row.
    let nan_rows = flat.ne(&flat)?.to_dtype(candle_core::DType::U32)?.sum(1)?;
    let nan_rows = nan_rows
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<u32>()?;
    if let Some(row) = nan_rows.iter().position(|&c| c > 0) {
        return Err(GaussError::data(
            "input x",
            format!(
                "holds NaN (first in row {row} of {} after flattening the leading dimensions); log_prob is checked because validate_args is on",
                nan_rows.len()
            ),
        ));
    }
    Ok(())
}

impl MultivariateNormal {
    /// N(`mean`, `covariance`) held in `config`'s parameterization.
    ///
    /// # Shapes
    /// `mean`: (d), `covariance`: (d, d)
    ///
    /// # Errors
    /// As [`GaussLayer::from_covariance`].
    pub fn from_covariance(
        mean: &Tensor,
        covariance: &Tensor,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        GaussLayer::from_covariance(mean, covariance, config)?.distribution(0)
    }

    /// N(`mean`, `precision⁻¹`) held in `config`'s parameterization.
    ///
    /// # Shapes
    /// `mean`: (d), `precision`: (d, d)
    ///
    /// # Errors
    /// As [`GaussLayer::from_precision`].
    pub fn from_precision(
        mean: &Tensor,
        precision: &Tensor,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        GaussLayer::from_precision(mean, precision, config)?.distribution(0)
    }

    /// The same distribution with input checks on (the default) or off.
    pub fn with_validate_args(self, validate_args: bool) -> Self {
        Self {
            validate_args,
            ..self
        }
    }

    /// Whether `log_prob` checks its input for NaN (default true, as torch).
    pub fn validate_args(&self) -> bool {
        self.validate_args
    }

    /// The one-neuron Gaussian-only layer behind the view.
    pub fn layer(&self) -> &GaussLayer {
        &self.layer
    }

    /// The dimension d (torch's `event_shape` is (d)).
    pub fn dim(&self) -> usize {
        self.layer.in_features()
    }

    /// The mean c.
    ///
    /// # Shapes
    /// → (d)
    ///
    /// # Errors
    /// Candle errors.
    pub fn mean(&self) -> Result<Tensor> {
        Ok(self.layer.center().squeeze(0)?)
    }

    /// The covariance `P⁻¹`.
    ///
    /// # Shapes
    /// → (d, d)
    ///
    /// # Errors
    /// As [`crate::Precision::covariance_matrix`].
    pub fn covariance(&self) -> Result<Tensor> {
        Ok(self.layer.precision().covariance_matrix()?.squeeze(0)?)
    }

    /// The precision P.
    ///
    /// # Shapes
    /// → (d, d)
    ///
    /// # Errors
    /// As [`crate::Precision::precision_matrix`].
    pub fn precision(&self) -> Result<Tensor> {
        Ok(self.layer.precision().precision_matrix()?.squeeze(0)?)
    }

    /// `log N(x | c, P⁻¹)`; with `validate_args`, a sample holding NaN is an error.
    ///
    /// # Shapes
    /// `x`: (…, d) → (…)
    ///
    /// # Errors
    /// As [`GaussLayer::log_prob`]; NaN in `x` when validating.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let log_prob = if self.validate_args {
            self.layer.log_prob_validated(x)?
        } else {
            self.layer.log_prob(x)?
        };
        Ok(log_prob.squeeze(log_prob.rank() - 1)?)
    }

    /// The differential entropy `½·d·(1 + ln 2π) − ½·ln det P`, nats.
    ///
    /// # Shapes
    /// → () (a scalar)
    ///
    /// # Errors
    /// As [`crate::Precision::log_det_precision`].
    pub fn entropy(&self) -> Result<Tensor> {
        let d = self.dim();
        let log_det = self.layer.precision().log_det_precision()?.squeeze(0)?;
        Ok(((log_det * -0.5)? + (log_normalizer(d) + 0.5 * d as f64))?)
    }

    /// `KL(self ‖ other)` in closed form:
    /// `½·[tr(P_o Σ_s) + (c_o − c_s)ᵀ P_o (c_o − c_s) − d + ln det P_s − ln det P_o]`.
    ///
    /// # Shapes
    /// → () (a scalar)
    ///
    /// # Errors
    /// Another dimension, dtype or device; as [`crate::Precision::covariance_matrix`].
    pub fn kl_divergence(&self, other: &MultivariateNormal) -> Result<Tensor> {
        let d = self.dim();
        if other.dim() != d {
            return Err(GaussError::shape(
                "other distribution's mean",
                format!("({d})"),
                &[other.dim()],
            ));
        }
        let own_mean = self.mean()?;
        let other_mean = other.mean()?;
        check_dtype(
            "other distribution's mean",
            &other_mean,
            own_mean.dtype(),
            "this distribution",
        )?;
        let other_precision = other.precision()?;
        let trace = (&other_precision * &self.covariance()?)?.sum_all()?;
        let delta = (other_mean - own_mean)?.unsqueeze(1)?; // (d, 1)
        let quadratic = linalg::matmul(
            &linalg::transpose(&delta)?,
            &other_precision.matmul(&delta)?,
        )?
        .squeeze(1)?
        .squeeze(0)?;
        let own_log_det = self.layer.precision().log_det_precision()?.squeeze(0)?;
        let other_log_det = other.layer.precision().log_det_precision()?.squeeze(0)?;
        let sum = (((trace + quadratic)? + (own_log_det - other_log_det)?)? - d as f64)?;
        Ok((sum * 0.5)?)
    }

    /// `n` reparameterized draws `c + A ε` (`A Aᵀ = Σ`, `ε` standard normal from `rng` on the
    /// host): differentiable in the layer's tensors.
    ///
    /// # Shapes
    /// → (n, d)
    ///
    /// # Errors
    /// As [`GaussLayer::sample`].
    pub fn rsample<R: Rng + ?Sized>(&self, n: usize, rng: &mut R) -> Result<Tensor> {
        Ok(self.layer.sample(n, rng)?.squeeze(1)?)
    }

    /// `n` draws, detached from the graph.
    ///
    /// # Shapes
    /// → (n, d)
    ///
    /// # Errors
    /// As [`GaussLayer::sample`].
    pub fn sample<R: Rng + ?Sized>(&self, n: usize, rng: &mut R) -> Result<Tensor> {
        Ok(self.rsample(n, rng)?.detach())
    }
}
