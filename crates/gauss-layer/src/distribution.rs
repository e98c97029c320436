//! Neurons as distributions with the shapes of `torch.distributions.MultivariateNormal`:
//! - [`MultivariateNormal`] (`layer.distribution(z)`), one neuron: `log_prob` of (…, d)
//!   samples is (…), `sample`/`rsample` give (n, d), `entropy` and `kl_divergence` are
//!   scalars;
//! - [`MultivariateNormalBatch`] (`layer.distributions()`), all Z neurons as one batch
//!   (torch's `batch_shape` (Z)): `mean` (Z, d), `covariance`/`precision` (Z, d, d),
//!   `entropy` (Z), `kl_divergence` elementwise (Z), `sample`/`rsample` (n, Z, d), and
//!   `log_prob` in torch's batch semantics, (…, Z, d) → (…, Z), each member scoring its own
//!   sample, besides `log_prob_all`, every sample under every member, (…, d) → (…, Z).
//!
//! A single neuron is the batch of one: [`MultivariateNormal`] holds a
//! [`MultivariateNormalBatch`] of Z = 1 and drops the batch dimension, so both run the same
//! code. The views share the layer's tensors (the whole center and raw precision, or a
//! narrow of them), so `rsample`, `log_prob`, `entropy` and `kl_divergence` carry gradients
//! to the layer's variables.
//!
//! Like torch's `validate_args` (on by default there), the view checks its input by default:
//! `log_prob` rejects a sample holding NaN with an error instead of returning NaN (infinities
//! pass, as in torch, and give a log-density of −∞). [`GaussLayer::log_prob`] itself does not
//! check for NaN (the check reads back from the device), and gives −∞ for infinities as the
//! views do; [`GaussLayer::log_prob_validated`] checks.
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
//!
//! All neurons of a layer at once:
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::{GaussLayer, GaussLayerConfig};
//! let device = Device::Cpu;
//! // Two neurons in 2-D: N((0, 0), I) and N((1, 2), diag(4, 1)).
//! let means = Tensor::new(&[[0.0f64, 0.0], [1.0, 2.0]], &device)?;
//! let covariances = Tensor::new(&[[[1.0f64, 0.0], [0.0, 1.0]], [[4.0, 0.0], [0.0, 1.0]]], &device)?;
//! let layer = GaussLayer::from_covariance(&means, &covariances, GaussLayerConfig::default())?;
//! let batch = layer.distributions()?;
//! assert_eq!(batch.mean()?.dims(), &[2, 2]);
//! // torch's batch semantics: x (N, Z, d), member z scores x[:, z] → (N, Z).
//! let x = Tensor::new(&[[[0.0f64, 0.0], [1.0, 2.0]]], &device)?; // each at its own mean
//! let log_p = batch.log_prob(&x)?.to_vec2::<f64>()?;
//! let ln_2pi = (2.0 * std::f64::consts::PI).ln();
//! assert!((log_p[0][0] + ln_2pi).abs() < 1e-12); // −½·ln det(2π I)
//! assert!((log_p[0][1] + ln_2pi + 0.5 * 4f64.ln()).abs() < 1e-12); // −½·ln det(2π Σ₁)
//! // Every sample under every member: (…, d) → (…, Z).
//! assert_eq!(batch.log_prob_all(&x.get(0)?)?.dims(), &[2, 2]);
//! // Entropies (Z) and the elementwise KL against another batch (Z).
//! assert_eq!(batch.entropy()?.dims(), &[2]);
//! assert!(batch.kl_divergence(&batch)?.abs()?.max(0)?.to_scalar::<f64>()? < 1e-12);
//! let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
//! assert_eq!(batch.sample(5, &mut rng)?.dims(), &[5, 2, 2]); // (n, Z, d)
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{Tensor, D};
use rand::Rng;

use crate::config::{GaussLayerConfig, Parameterization};
use crate::density::{infinite_rows, minus_infinity_where};
use crate::error::{check_device, check_dtype, GaussError, Result};
use crate::layer::GaussLayer;
use crate::linalg;
use crate::ops::flatten_leading;
use crate::ops::{log_normalizer, log_prob_from_mahalanobis};
use crate::precision::Precision;
use crate::repair;

/// The Z neurons of a layer as a batch of normals N(c_z, P_z⁻¹), torch's
/// `MultivariateNormal` with `batch_shape` (Z) and `event_shape` (d) (see the module docs).
#[derive(Clone, Debug)]
pub struct MultivariateNormalBatch {
    /// A Gaussian-only layer sharing the source layer's tensors.
    layer: GaussLayer,
    validate_args: bool,
}

/// One neuron's normal N(c, P⁻¹) as a distribution (see the module docs): the batch of one.
#[derive(Clone, Debug)]
pub struct MultivariateNormal {
    batch: MultivariateNormalBatch,
}

impl GaussLayer {
    /// The layer's Gaussian factors as one [`MultivariateNormalBatch`] of Z normals (for a
    /// layer with a linear part, the densities of its Gaussians), sharing the layer's
    /// tensors.
    ///
    /// # Errors
    /// Candle errors (none for a valid layer).
    pub fn distributions(&self) -> Result<MultivariateNormalBatch> {
        let precision = self.precision().clone();
        MultivariateNormalBatch::over(self, self.center().clone(), precision)
    }

    /// Neuron `neuron`'s normal N(c, P⁻¹) as a [`MultivariateNormal`] (its Gaussian factor,
    /// for a layer with a linear part), sharing the layer's tensors.
    ///
    /// # Errors
    /// [`GaussError::IndexOutOfRange`] for `neuron` ≥ Z.
    pub fn distribution(&self, neuron: usize) -> Result<MultivariateNormal> {
        let z = self.out_features();
        if neuron >= z {
            return Err(GaussError::IndexOutOfRange {
                what: "neuron of the layer".into(),
                index: neuron,
                len: z,
            });
        }
        let center = self.center().narrow(0, neuron, 1)?;
        let precision = self.precision();
        let precision = precision.with_raw(precision.raw().narrow(0, neuron, 1)?)?;
        Ok(MultivariateNormal {
            batch: MultivariateNormalBatch::over(self, center, precision)?,
        })
    }

    /// [`GaussLayer::log_prob`] after checking that `x` holds no NaN (torch's
    /// `validate_args`): the checked path; `log_prob` itself returns NaN for a NaN sample.
    /// A sample holding ±∞ (and no NaN) passes and gets −∞, as in `log_prob`.
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
    let (flat, _) = flatten_leading(x, d, "input x")?;
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

impl MultivariateNormalBatch {
    /// The Gaussian-only layer of `center` and `precision` (all of `source`'s neurons or a
    /// narrow of them), input checks on.
    fn over(source: &GaussLayer, center: Tensor, precision: Precision) -> Result<Self> {
        let config = GaussLayerConfig {
            gaussian_only: true,
            tanh: false,
            tied_bias: false,
            ..source.config().clone()
        };
        Ok(Self {
            layer: GaussLayer::new(None, None, center, precision, config)?,
            validate_args: true,
        })
    }

    /// Z normals N(`mean[z]`, `covariance[z]`) held in `config`'s parameterization.
    ///
    /// # Shapes
    /// `mean`: (Z, d), `covariance`: (Z, d, d)
    ///
    /// # Errors
    /// As [`GaussLayer::from_covariance`].
    pub fn from_covariance(
        mean: &Tensor,
        covariance: &Tensor,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        GaussLayer::from_covariance(mean, covariance, config)?.distributions()
    }

    /// Z normals N(`mean[z]`, `precision[z]⁻¹`) held in `config`'s parameterization.
    ///
    /// # Shapes
    /// `mean`: (Z, d), `precision`: (Z, d, d)
    ///
    /// # Errors
    /// As [`GaussLayer::from_precision`].
    pub fn from_precision(
        mean: &Tensor,
        precision: &Tensor,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        GaussLayer::from_precision(mean, precision, config)?.distributions()
    }

    /// The same batch with input checks on (the default) or off.
    pub fn with_validate_args(self, validate_args: bool) -> Self {
        Self {
            validate_args,
            ..self
        }
    }

    /// Whether `log_prob` and `log_prob_all` check their input for NaN (default true, as
    /// torch).
    pub fn validate_args(&self) -> bool {
        self.validate_args
    }

    /// The Gaussian-only layer behind the view.
    pub fn layer(&self) -> &GaussLayer {
        &self.layer
    }

    /// The dimension d (torch's `event_shape` is (d)).
    pub fn dim(&self) -> usize {
        self.layer.in_features()
    }

    /// The number of normals Z (torch's `batch_shape` is (Z)).
    pub fn batch_size(&self) -> usize {
        self.layer.out_features()
    }

    /// The means.
    ///
    /// # Shapes
    /// → (Z, d)
    ///
    /// # Errors
    /// None in practice (the `Result` matches the other accessors).
    pub fn mean(&self) -> Result<Tensor> {
        Ok(self.layer.center().clone())
    }

    /// The covariances `P_z⁻¹`.
    ///
    /// # Shapes
    /// → (Z, d, d)
    ///
    /// # Errors
    /// As [`crate::Precision::covariance_matrix`].
    pub fn covariance(&self) -> Result<Tensor> {
        self.layer.precision().covariance_matrix()
    }

    /// The precisions `P_z`.
    ///
    /// # Shapes
    /// → (Z, d, d)
    ///
    /// # Errors
    /// As [`crate::Precision::precision_matrix`].
    pub fn precision(&self) -> Result<Tensor> {
        self.layer.precision().precision_matrix()
    }

    /// Every sample under every member: `log N(x | c_z, P_z⁻¹)` (as
    /// [`GaussLayer::log_prob`]); with `validate_args`, a sample holding NaN is an error.
    ///
    /// # Shapes
    /// `x`: (…, d) → (…, Z)
    ///
    /// # Errors
    /// As [`GaussLayer::log_prob`]; NaN in `x` when validating.
    pub fn log_prob_all(&self, x: &Tensor) -> Result<Tensor> {
        if self.validate_args {
            check_no_nan(x, self.dim())?;
        } else {
            flatten_leading(x, self.dim(), "input x")?;
        }
        // Checked here to name the layer in the message, as `log_prob` does.
        check_dtype("input x", x, self.layer.center().dtype(), "the layer")?;
        check_device("input x", x, self.layer.center().device(), "the layer")?;
        // The layer gives −∞ for a row holding ±∞ itself.
        self.layer.log_prob(x)
    }

    /// torch's batch semantics: member z scores its own sample, `out[…, z] =
    /// log N(x[…, z, :] | c_z, P_z⁻¹)`; with `validate_args`, a sample holding NaN is an
    /// error.
    ///
    /// # Shapes
    /// `x`: (…, Z, d) → (…, Z)
    ///
    /// # Errors
    /// `x` not ending in (Z, d) or of another dtype than the layer; NaN in `x` when
    /// validating; a `direct` precision that is not positive definite.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let (z, d) = (self.batch_size(), self.dim());
        let dims = x.dims();
        if dims.len() < 2 || dims[dims.len() - 2..] != [z, d] {
            return Err(GaussError::shape(
                "input x",
                format!("(…, {z}, {d}): one sample per member of the batch"),
                dims,
            ));
        }
        check_dtype("input x", x, self.layer.center().dtype(), "the layer")?;
        check_device("input x", x, self.layer.center().device(), "the layer")?;
        if self.validate_args {
            check_no_nan(x, d)?;
        }
        let leading = &dims[..dims.len() - 2];
        let n = leading.iter().product::<usize>();
        let out_shape: Vec<usize> = leading.iter().copied().chain([z]).collect();
        if n == 0 {
            return Ok(Tensor::zeros(out_shape, x.dtype(), x.device())?);
        }
        let precision = self.layer.precision();
        if precision.parameterization() == Parameterization::Direct {
            repair::ensure_positive_definite(precision)?;
        }
        // Samples holding ±∞ get −∞ at the end; they enter the computation as zeros.
        let (infinite, x) = infinite_rows(x, self.layer.config().precision.portable)?;
        // (n, Z, d) → differences per member, (Z, n, d).
        let delta = x
            .reshape((n, z, d))?
            .broadcast_sub(&self.layer.center().unsqueeze(0)?)?
            .transpose(0, 1)?
            .contiguous()?;
        // Sums over d accumulate in f32 for f16 and bf16.
        let m2 = if let Some(diagonal) = precision.diagonal_precision()? {
            let terms = delta.sqr()?.broadcast_mul(&diagonal.unsqueeze(1)?)?;
            linalg::sum_accumulated(&terms, D::Minus1)?
        } else if let Some(factor) = precision.factor()? {
            // P = F Fᵀ: m2 = ‖Fᵀ δ‖² = ‖δᵀ F‖².
            linalg::sum_accumulated(&linalg::matmul(&delta, &factor)?.sqr()?, D::Minus1)?
        } else {
            let projected = linalg::matmul(&delta, &precision.precision_matrix()?)?;
            let m2 = linalg::sum_accumulated(&(projected * &delta)?, D::Minus1)?;
            // Clamped at 0 as in every kernel, keeping NaN (`relu` maps NaN to 0).
            m2.lt(0.0)?.where_cond(&m2.zeros_like()?, &m2)?
        }; // (Z, n)
        let log_det = precision.log_det_precision()?;
        let log_p = log_prob_from_mahalanobis(&m2.t()?, &log_det, d)?.reshape(out_shape)?;
        let infinite = infinite.map(|mask| mask.squeeze(D::Minus1)).transpose()?;
        minus_infinity_where(infinite.as_ref(), log_p)
    }

    /// The differential entropies `½·d·(1 + ln 2π) − ½·ln det P_z`, nats.
    ///
    /// # Shapes
    /// → (Z)
    ///
    /// # Errors
    /// A `direct` precision that is not positive definite; as
    /// [`crate::Precision::log_det_precision`].
    pub fn entropy(&self) -> Result<Tensor> {
        let d = self.dim();
        repair::ensure_positive_definite(self.layer.precision())?;
        let log_det = self.layer.precision().log_det_precision()?;
        Ok(((log_det * -0.5)? + (log_normalizer(d) + 0.5 * d as f64))?)
    }

    /// `KL(self_z ‖ other_z)` per member, in closed form:
    /// `½·[tr(P_o Σ_s) + (c_o − c_s)ᵀ P_o (c_o − c_s) − d + ln det P_s − ln det P_o]`.
    ///
    /// # Shapes
    /// → (Z); `other` has the same Z and d
    ///
    /// # Errors
    /// Another batch size, dimension, dtype or device; a `direct` precision (of either) that
    /// is not positive definite; as [`crate::Precision::covariance_matrix`].
    pub fn kl_divergence(&self, other: &MultivariateNormalBatch) -> Result<Tensor> {
        let (z, d) = (self.batch_size(), self.dim());
        if (other.batch_size(), other.dim()) != (z, d) {
            return Err(GaussError::shape(
                "other distribution's mean",
                format!("({z}, {d}), as this batch's"),
                &[other.batch_size(), other.dim()],
            ));
        }
        let own_mean = self.layer.center();
        let other_mean = other.layer.center();
        check_dtype(
            "other distribution's mean",
            other_mean,
            own_mean.dtype(),
            "this distribution",
        )?;
        check_device(
            "other distribution's mean",
            other_mean,
            own_mean.device(),
            "this distribution",
        )?;
        repair::ensure_positive_definite(self.layer.precision())?;
        repair::ensure_positive_definite(other.layer.precision())?;
        // In f32 for f16 and bf16: the sums over d, and their combination, where the terms
        // cancel (tr = d for equal covariances), so that rounding each to the dtype first
        // would leave only its ulp at d.
        let dtype = own_mean.dtype();
        let accumulation = linalg::accumulation_dtype(dtype);
        let other_precision = other.precision()?; // (Z, d, d)
        let trace = (&other_precision * &self.covariance()?)?
            .to_dtype(accumulation)?
            .sum((1, 2))?;
        let delta = (other_mean - own_mean)?.unsqueeze(2)?; // (Z, d, 1)
        let quadratic = (linalg::matmul(&other_precision, &delta)? * &delta)?
            .to_dtype(accumulation)?
            .sum((1, 2))?;
        let own_log_det = self.layer.precision().log_det_precision()?;
        let other_log_det = other.layer.precision().log_det_precision()?;
        let log_det_difference = (own_log_det - other_log_det)?.to_dtype(accumulation)?;
        let sum = (((trace + quadratic)? + log_det_difference)? - d as f64)?;
        Ok((sum * 0.5)?.to_dtype(dtype)?)
    }

    /// `n` reparameterized draws `c_z + A_z ε` per member (`A_z A_zᵀ = Σ_z`, `ε` standard
    /// normal from `rng` on the host): differentiable in the layer's tensors.
    ///
    /// # Shapes
    /// → (n, Z, d)
    ///
    /// # Errors
    /// As [`GaussLayer::sample`].
    pub fn rsample<R: Rng + ?Sized>(&self, n: usize, rng: &mut R) -> Result<Tensor> {
        self.layer.sample(n, rng)
    }

    /// `n` draws per member, detached from the graph.
    ///
    /// # Shapes
    /// → (n, Z, d)
    ///
    /// # Errors
    /// As [`GaussLayer::sample`].
    pub fn sample<R: Rng + ?Sized>(&self, n: usize, rng: &mut R) -> Result<Tensor> {
        Ok(self.rsample(n, rng)?.detach())
    }
}

/// The shapes of one normal: `mean` (d) and `matrix` (d, d). The layer's constructors also
/// take a batch ((Z, d) and (Z, d, d)), of which a single normal would keep only the first.
fn check_one_normal(mean: &Tensor, matrix: &Tensor, name: &str) -> Result<()> {
    let batch = |what: &str| {
        format!("{what} (one normal; a batch of them is MultivariateNormalBatch::from_{name})")
    };
    let &[d] = mean.dims() else {
        return Err(GaussError::shape("mean", batch("(d)"), mean.dims()));
    };
    if matrix.dims() != [d, d] {
        return Err(GaussError::shape(
            name,
            batch(&format!("({d}, {d}) for a mean of shape ({d})")),
            matrix.dims(),
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
    /// A `mean` that is not (d) or a `covariance` that is not (d, d)
    /// ([`GaussError::Shape`]; a batch of normals is [`MultivariateNormalBatch::from_covariance`]);
    /// otherwise as [`GaussLayer::from_covariance`].
    pub fn from_covariance(
        mean: &Tensor,
        covariance: &Tensor,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        check_one_normal(mean, covariance, "covariance")?;
        GaussLayer::from_covariance(mean, covariance, config)?.distribution(0)
    }

    /// N(`mean`, `precision⁻¹`) held in `config`'s parameterization.
    ///
    /// # Shapes
    /// `mean`: (d), `precision`: (d, d)
    ///
    /// # Errors
    /// A `mean` that is not (d) or a `precision` that is not (d, d)
    /// ([`GaussError::Shape`]; a batch of normals is [`MultivariateNormalBatch::from_precision`]);
    /// otherwise as [`GaussLayer::from_precision`].
    pub fn from_precision(
        mean: &Tensor,
        precision: &Tensor,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        check_one_normal(mean, precision, "precision")?;
        GaussLayer::from_precision(mean, precision, config)?.distribution(0)
    }

    /// The same distribution with input checks on (the default) or off.
    pub fn with_validate_args(self, validate_args: bool) -> Self {
        Self {
            batch: self.batch.with_validate_args(validate_args),
        }
    }

    /// Whether `log_prob` checks its input for NaN (default true, as torch).
    pub fn validate_args(&self) -> bool {
        self.batch.validate_args()
    }

    /// The one-neuron Gaussian-only layer behind the view.
    pub fn layer(&self) -> &GaussLayer {
        self.batch.layer()
    }

    /// The batch of one this view drops the batch dimension of.
    pub fn as_batch(&self) -> &MultivariateNormalBatch {
        &self.batch
    }

    /// The dimension d (torch's `event_shape` is (d)).
    pub fn dim(&self) -> usize {
        self.batch.dim()
    }

    /// The mean c.
    ///
    /// # Shapes
    /// → (d)
    ///
    /// # Errors
    /// Candle errors.
    pub fn mean(&self) -> Result<Tensor> {
        Ok(self.batch.mean()?.squeeze(0)?)
    }

    /// The covariance `P⁻¹`.
    ///
    /// # Shapes
    /// → (d, d)
    ///
    /// # Errors
    /// As [`crate::Precision::covariance_matrix`].
    pub fn covariance(&self) -> Result<Tensor> {
        Ok(self.batch.covariance()?.squeeze(0)?)
    }

    /// The precision P.
    ///
    /// # Shapes
    /// → (d, d)
    ///
    /// # Errors
    /// As [`crate::Precision::precision_matrix`].
    pub fn precision(&self) -> Result<Tensor> {
        Ok(self.batch.precision()?.squeeze(0)?)
    }

    /// `log N(x | c, P⁻¹)`; with `validate_args`, a sample holding NaN is an error.
    ///
    /// # Shapes
    /// `x`: (…, d) → (…)
    ///
    /// # Errors
    /// As [`GaussLayer::log_prob`]; NaN in `x` when validating.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let log_prob = self.batch.log_prob_all(x)?;
        Ok(log_prob.squeeze(log_prob.rank() - 1)?)
    }

    /// The differential entropy `½·d·(1 + ln 2π) − ½·ln det P`, nats.
    ///
    /// # Shapes
    /// → () (a scalar)
    ///
    /// # Errors
    /// As [`MultivariateNormalBatch::entropy`].
    pub fn entropy(&self) -> Result<Tensor> {
        Ok(self.batch.entropy()?.squeeze(0)?)
    }

    /// `KL(self ‖ other)` in closed form:
    /// `½·[tr(P_o Σ_s) + (c_o − c_s)ᵀ P_o (c_o − c_s) − d + ln det P_s − ln det P_o]`.
    ///
    /// # Shapes
    /// → () (a scalar)
    ///
    /// # Errors
    /// As [`MultivariateNormalBatch::kl_divergence`].
    pub fn kl_divergence(&self, other: &MultivariateNormal) -> Result<Tensor> {
        Ok(self.batch.kl_divergence(&other.batch)?.squeeze(0)?)
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
        Ok(self.batch.rsample(n, rng)?.squeeze(1)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Parameterization, PrecisionConfig};
    use candle_core::{DType, Device, Var};

    fn config(parameterization: Parameterization) -> GaussLayerConfig {
        GaussLayerConfig {
            precision: PrecisionConfig::with_parameterization(parameterization),
            ..Default::default()
        }
    }

    /// One normal's constructors take one normal: a batch (means (2, 2), matrices
    /// (2, 2, 2)) was accepted and all but its first member silently dropped; now it is a
    /// Shape error naming the argument and the expected shape (and pointing to the batch
    /// constructors, which take it).
    #[test]
    fn one_normal_refuses_a_batch_and_other_ranks() -> Result<()> {
        let device = Device::Cpu;
        let means = Tensor::new(&[[0.0f64, 0.0], [5.0, 5.0]], &device)?;
        let matrices = Tensor::new(
            &[[[1.0f64, 0.0], [0.0, 1.0]], [[9.0, 0.0], [0.0, 9.0]]],
            &device,
        )?;
        let mean = means.get(0)?;
        let matrix = matrices.get(0)?;
        let cases = [
            (&means, &matrices, "mean", "(d)"),
            (&means, &matrix, "mean", "(d)"),
            (&mean, &matrices, "", "(2, 2) for a mean of shape (2)"),
            (&mean.unsqueeze(0)?.unsqueeze(0)?, &matrix, "mean", "(d)"),
            (&mean, &matrix.narrow(1, 0, 1)?, "", "(2, 2)"),
        ];
        for (mean, matrix, what, expected) in cases {
            for (name, result) in [
                (
                    "covariance",
                    MultivariateNormal::from_covariance(
                        mean,
                        matrix,
                        config(Parameterization::Cholesky),
                    ),
                ),
                (
                    "precision",
                    MultivariateNormal::from_precision(
                        mean,
                        matrix,
                        config(Parameterization::Cholesky),
                    ),
                ),
            ] {
                let what = if what.is_empty() { name } else { what };
                match result {
                    Err(GaussError::Shape {
                        what: got,
                        expected: text,
                        ..
                    }) => {
                        assert_eq!(got, what);
                        assert!(text.contains(expected), "{text}");
                        assert!(
                            text.contains(&format!("MultivariateNormalBatch::from_{name}")),
                            "{text}"
                        );
                    }
                    other => panic!(
                        "{name} {:?} {:?}: expected a Shape error naming {what}, got {:?}",
                        mean.dims(),
                        matrix.dims(),
                        other.map(|n| n.dim())
                    ),
                }
            }
        }
        // The batch itself goes to the batch constructors, which keep both members.
        let batch = MultivariateNormalBatch::from_covariance(
            &means,
            &matrices,
            config(Parameterization::Cholesky),
        )?;
        assert_eq!(batch.batch_size(), 2);
        let one = MultivariateNormal::from_covariance(
            &mean,
            &matrix,
            config(Parameterization::Cholesky),
        )?;
        assert_eq!(one.dim(), 2);
        Ok(())
    }

    /// The view promises (module docs) that a sample holding ±∞ (and no NaN) gets log-density
    /// −∞, as torch gives, and that `log_prob` without `validate_args` returns NaN for a NaN
    /// sample. The full-matrix branch of the batch `log_prob` (direct, lowrank) clamped with
    /// `relu`, which maps NaN to 0: both samples got the density's peak value,
    /// −ln 2π − ½ ln 1.75 = −2.1177, and cholesky gave NaN for ±∞.
    #[test]
    fn infinite_samples_get_minus_infinity_and_nan_samples_stay_nan() -> Result<()> {
        let device = Device::Cpu;
        let mean = Tensor::new(&[[0.0f32, 0.0]], &device)?;
        let full = Tensor::new(&[[[2.0f32, 0.5], [0.5, 1.0]]], &device)?;
        let diagonal = Tensor::new(&[[[2.0f32, 0.0], [0.0, 1.0]]], &device)?;
        let ln_2pi = (2.0 * std::f64::consts::PI).ln();
        for parameterization in [
            Parameterization::Cholesky,
            Parameterization::Direct,
            Parameterization::Expm,
            Parameterization::LowRank { rank: 1 },
            Parameterization::Diag,
        ] {
            let is_diag = parameterization == Parameterization::Diag;
            let covariance = if is_diag { &diagonal } else { &full };
            // Closed form at x = (1, 1): m2 = xᵀ Σ⁻¹ x (Σ⁻¹ = [[1, −½], [−½, 2]]/1.75 for the
            // full Σ, diag(½, 1) for the diagonal one), log p = −m2/2 − ln 2π − ½ ln det Σ.
            let (m2, det) = if is_diag {
                (1.5, 2.0)
            } else {
                (2.0 / 1.75, 1.75f64)
            };
            let finite = -m2 / 2.0 - ln_2pi - 0.5 * det.ln();
            let base = GaussLayer::from_covariance(&mean, covariance, config(parameterization))?;
            // Variables, to see that the infinite sample sends no NaN into the gradient.
            let center = Var::from_tensor(base.center())?;
            let raw = Var::from_tensor(base.precision().raw())?;
            let layer = GaussLayer::new(
                None,
                None,
                center.as_tensor().clone(),
                base.precision().with_raw(raw.as_tensor().clone())?,
                base.config().clone(),
            )?;
            let batch = layer.distributions()?;
            for inf in [f32::INFINITY, f32::NEG_INFINITY] {
                let rows = Tensor::new(&[[inf, 0.0], [1.0, 1.0]], &device)?;
                let all = batch.log_prob_all(&rows)?;
                let own = batch.log_prob(&rows.unsqueeze(1)?)?;
                for (what, log_p) in [("log_prob_all", &all), ("log_prob", &own)] {
                    let v = log_p.flatten_all()?.to_vec1::<f32>()?;
                    assert_eq!(v[0], f32::NEG_INFINITY, "{parameterization} {what} {inf}");
                    assert!(
                        (v[1] as f64 - finite).abs() < 1e-5,
                        "{parameterization} {what}: {} vs {finite}",
                        v[1]
                    );
                    let grads = log_p.narrow(0, 1, 1)?.sum_all()?.backward()?;
                    for (name, var) in [("center", &center), ("raw", &raw)] {
                        let g = grads.get(var).expect("a gradient");
                        assert!(
                            crate::testing::all_finite(g)?,
                            "{parameterization} {what} {inf}: d/d{name} {g}"
                        );
                    }
                }
                // The single normal (the batch of one) says the same.
                let one = layer.distribution(0)?.log_prob(&rows)?.to_vec1::<f32>()?;
                assert_eq!(one[0], f32::NEG_INFINITY, "{parameterization} single");
            }
            // Without validate_args a NaN sample gives NaN, never a density value.
            let unchecked = batch.clone().with_validate_args(false);
            let nan = Tensor::new(&[[[f32::NAN, 0.0]], [[f32::NAN, f32::INFINITY]]], &device)?;
            let v = unchecked.log_prob(&nan)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(v.iter().all(|v| v.is_nan()), "{parameterization}: {v:?}");
            let v = unchecked
                .log_prob_all(&nan.squeeze(1)?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert!(v.iter().all(|v| v.is_nan()), "{parameterization}: {v:?}");
            // With it, the NaN is refused (±∞ passes).
            assert!(batch.log_prob(&nan).is_err());
            // Wrong inputs stay typed errors, checked or not.
            for view in [&batch, &unchecked] {
                let scalar = Tensor::new(1.0f32, &device)?;
                let err = view.log_prob_all(&scalar).unwrap_err();
                assert!(matches!(err, GaussError::Shape { .. }), "{err}");
                let integers = Tensor::new(&[[1u32, 2]], &device)?;
                let err = view.log_prob_all(&integers).unwrap_err();
                assert!(matches!(err, GaussError::DType { .. }), "{err}");
            }
        }
        Ok(())
    }

    /// An empty batch of samples gives an empty answer, as `GaussLayer::log_prob` does:
    /// `log_prob_all` and the single normal's `log_prob` of a (0, d) (or (2, 0, d)) input
    /// were Candle's "empty tensor for reduce" (the ±∞ row mask's max over no rows).
    #[test]
    fn empty_batches_give_empty_log_probs() -> Result<()> {
        let device = Device::Cpu;
        let mean = Tensor::new(&[[0.0f32, 0.0], [1.0, 1.0]], &device)?;
        let eye = Tensor::eye(2, DType::F32, &device)?
            .unsqueeze(0)?
            .repeat((2, 1, 1))?;
        for parameterization in Parameterization::ALL {
            let batch =
                MultivariateNormalBatch::from_covariance(&mean, &eye, config(parameterization))?;
            for (shape, all_dims, one_dims) in [
                (vec![0, 2], vec![0, 2], vec![0]),
                (vec![2, 0, 2], vec![2, 0, 2], vec![2, 0]),
            ] {
                let x = Tensor::zeros(shape.as_slice(), DType::F32, &device)?;
                for view in [&batch, &batch.clone().with_validate_args(false)] {
                    assert_eq!(
                        view.log_prob_all(&x)?.dims(),
                        all_dims,
                        "{parameterization}"
                    );
                }
                let one = batch.layer().distribution(1)?;
                assert_eq!(one.log_prob(&x)?.dims(), one_dims, "{parameterization}");
            }
        }
        Ok(())
    }

    /// f16 sums over d = 256 ran in f16 (Candle's CPU sum accumulates in the tensor's dtype):
    /// `log_prob` of N(0, I) at x = 0.3·1 came out −247.125 instead of −246.75 (3 ulp), and
    /// `kl_divergence` of N(0, I) from N(0.3·1, I) 11.875 instead of 11.52 (and 11.5 with
    /// f32 sums rounded to f16 before `tr + quadratic − d`, where ulp(279) = 0.25 cancels);
    /// the sums, and the KL's combination of them, now run in f32.
    #[test]
    fn half_precision_sums_accumulate_in_f32() -> Result<()> {
        let device = Device::Cpu;
        let d = 256;
        let ln_2pi = (2.0 * std::f64::consts::PI).ln();
        for dtype in [DType::F16, DType::BF16] {
            // 0.3 as the dtype holds it, and the dtype's ulp at a value (the tolerance).
            let (x, ulp): (f64, fn(f64) -> f64) = match dtype {
                DType::F16 => (half::f16::from_f64(0.3).to_f64(), |v| {
                    let h = half::f16::from_f64(v.abs());
                    half::f16::from_bits(h.to_bits() + 1).to_f64() - h.to_f64()
                }),
                _ => (half::bf16::from_f64(0.3).to_f64(), |v| {
                    let h = half::bf16::from_f64(v.abs());
                    half::bf16::from_bits(h.to_bits() + 1).to_f64() - h.to_f64()
                }),
            };
            let zeros = Tensor::zeros((1, d), dtype, &device)?;
            let shifted = (Tensor::ones((1, d), dtype, &device)? * 0.3)?;
            let eye = Tensor::eye(d, dtype, &device)?.unsqueeze(0)?;
            for parameterization in [Parameterization::Diag, Parameterization::Cholesky] {
                let standard = MultivariateNormalBatch::from_covariance(
                    &zeros,
                    &eye,
                    config(parameterization),
                )?;
                let moved = MultivariateNormalBatch::from_covariance(
                    &shifted,
                    &eye,
                    config(parameterization),
                )?;
                // Closed forms: m2 = d·x², log p = −m2/2 − (d/2)·ln 2π; KL(N(0, I) ‖ N(m, I))
                // = |m|²/2 = d·x²/2.
                let m2 = d as f64 * x * x;
                let log_p = standard
                    .log_prob(&shifted.unsqueeze(0)?)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?[0] as f64;
                let expected = -m2 / 2.0 - d as f64 / 2.0 * ln_2pi;
                if dtype == DType::F16 {
                    // (bf16's ulp at 247 is 2: its sums' error hides below it.)
                    assert!(
                        (log_p - expected).abs() <= ulp(expected),
                        "{dtype:?} {parameterization}: log_prob {log_p} vs {expected}"
                    );
                }
                let kl = standard
                    .kl_divergence(&moved)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?[0] as f64;
                assert!(
                    (kl - m2 / 2.0).abs() <= ulp(m2 / 2.0),
                    "{dtype:?} {parameterization}: kl {kl} vs {}",
                    m2 / 2.0
                );
            }
        }
        Ok(())
    }
}
