//! The λ-loss: a penalty on the eigenvalues of each neuron's covariance `S_z = P_z⁻¹`,
//! computed through traces and log-determinants (no eigendecomposition), with gradients,
//! for every parameterization.
//!
//! | variant | value | per neuron |
//! |---|---|---|
//! | [`LambdaLoss::TraceCovariance`] (default) | `mean_z tr(S_z)/d` | mean covariance eigenvalue; the FGN "sigma loss" for diag and sphere |
//! | [`LambdaLoss::LogdetCovariance`] | `mean_z log det S_z` | log volume |
//! | [`LambdaLoss::NegTracePrecision`] | `−mean_z tr(P_z)/d` | the FGN proxy for full matrices |
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_losses::LambdaLoss;
//! // One neuron with P = diag(4, 1): S = diag(1/4, 1), mean eigenvalue 5/8.
//! let tril = Tensor::new(&[[[2.0f64, 0.0], [0.0, 1.0]]], &Device::Cpu)?;
//! let value = LambdaLoss::TraceCovariance
//!     .per_neuron_from_factor(&tril)?
//!     .mean_all()?
//!     .to_scalar::<f64>()?;
//! assert!((value - 0.625).abs() < 1e-12);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Tensor};
use gauss_layer::repair::ensure_positive_definite;
use gauss_layer::{ops, GaussError, GaussLayer, Precision, Result};
use serde::{Deserialize, Serialize};

use crate::check;
use crate::gaussian::log_det_from_triangular;
use crate::reduction::mean_over_layers;

/// Which penalty on the covariance eigenvalues to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LambdaLoss {
    /// `mean_z tr(S_z)/d`: the mean eigenvalue of the covariances.
    #[default]
    TraceCovariance,
    /// `mean_z log|S_z| = −mean_z log|P_z|`: the mean log volume.
    LogdetCovariance,
    /// `−mean_z tr(P_z)/d`: the FGN proxy for full matrices.
    NegTracePrecision,
}

/// How [`LambdaLoss::TraceCovariance`] gets `tr Σ`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TraceEstimator {
    /// The exact trace (and gradient): O(d³) per neuron for the full forms.
    #[default]
    Exact,
    /// An unbiased Hutchinson estimate from `probes` random ±1 vectors per neuron and step,
    /// O(d²·probes) for cholesky ([`gauss_layer::Precision::trace_covariance_estimate`]); the
    /// exact trace for every other form. For wide inputs (d in the hundreds) with full
    /// covariance, where the exact trace dominates a training step.
    Hutchinson {
        /// Probe vectors per neuron and step (≥ 1); the estimate's variance falls as 1/probes.
        probes: usize,
    },
}

impl TraceEstimator {
    /// Checks that a Hutchinson estimator has at least one probe.
    ///
    /// # Errors
    /// [`GaussError::InvalidConfig`] for `probes: 0`.
    pub fn validate(self) -> Result<()> {
        match self {
            TraceEstimator::Hutchinson { probes: 0 } => Err(GaussError::config(
                "trace_estimator.probes",
                "must be at least 1",
            )),
            _ => Ok(()),
        }
    }
}

impl LambdaLoss {
    /// All variants, in a fixed order.
    pub const ALL: [LambdaLoss; 3] = [
        LambdaLoss::TraceCovariance,
        LambdaLoss::LogdetCovariance,
        LambdaLoss::NegTracePrecision,
    ];

    /// The snake-case name used in configs, CLIs and reference files.
    pub fn name(self) -> &'static str {
        match self {
            LambdaLoss::TraceCovariance => "trace_covariance",
            LambdaLoss::LogdetCovariance => "logdet_covariance",
            LambdaLoss::NegTracePrecision => "neg_trace_precision",
        }
    }

    /// The per-neuron term whose mean is the loss (of one layer: `per_neuron(..).mean_all()`).
    /// For an f16 or bf16 precision the term is computed in f32 and rounded to the working
    /// dtype once: the traces it divides by d overflow f16 from d = 256 at the default init.
    ///
    /// # Shapes
    /// → (Z)
    ///
    /// # Errors
    /// A `direct` precision that is not positive definite
    /// ([`gauss_layer::repair::ensure_positive_definite`]); for expm, an overflowing
    /// exponential.
    pub fn per_neuron(self, precision: &Precision) -> Result<Tensor> {
        self.per_neuron_with(precision, TraceEstimator::Exact)
    }

    /// As [`LambdaLoss::per_neuron`], with `tr Σ` from `estimator` (only
    /// [`LambdaLoss::TraceCovariance`] uses it).
    ///
    /// # Shapes
    /// → (Z)
    ///
    /// # Errors
    /// As [`LambdaLoss::per_neuron`]; an invalid estimator.
    pub fn per_neuron_with(
        self,
        precision: &Precision,
        estimator: TraceEstimator,
    ) -> Result<Tensor> {
        estimator.validate()?;
        let working = precision.raw().dtype();
        if is_half(working) {
            // The traces are sums over d (tr Σ = d² for a default f16 layer at d = 256, past
            // f16's 65504) and f16/bf16 lose digits along them: the term is computed in f32,
            // where it fits, and rounded back once (the mean eigenvalue fits where tr Σ does
            // not). The positive-definiteness check runs there too, once.
            let wide = self.per_neuron_with(&precision.to_dtype(DType::F32)?, estimator)?;
            return Ok(wide.to_dtype(working)?);
        }
        ensure_positive_definite(precision)?;
        let d = precision.dim() as f64;
        Ok(match self {
            LambdaLoss::TraceCovariance => {
                let trace = match estimator {
                    TraceEstimator::Exact => precision.trace_covariance()?,
                    TraceEstimator::Hutchinson { probes } => {
                        precision.trace_covariance_estimate(probes)?
                    }
                };
                (trace / d)?
            }
            LambdaLoss::LogdetCovariance => precision.log_det_precision()?.neg()?,
            LambdaLoss::NegTracePrecision => (precision.trace_precision()? / -d)?,
        })
    }

    /// The loss of one or several layers: the mean of the per-neuron terms over all neurons
    /// of all layers (so a layer weighs by its width, and the value does not grow with depth).
    /// f16 and bf16 terms are summed in f32 and the mean rounded back once (a half-precision
    /// sum of many neurons would overflow where the mean does not).
    ///
    /// # Shapes
    /// → ()
    ///
    /// # Errors
    /// No layers ([`GaussError::NoLayers`]); layers of different dtypes
    /// ([`GaussError::DType`]); as [`LambdaLoss::per_neuron`].
    pub fn of_layers<'a>(self, layers: impl IntoIterator<Item = &'a GaussLayer>) -> Result<Tensor> {
        self.of_layers_with(layers, TraceEstimator::Exact)
    }

    /// As [`LambdaLoss::of_layers`], with `tr Σ` from `estimator`.
    ///
    /// # Shapes
    /// → ()
    ///
    /// # Errors
    /// As [`LambdaLoss::of_layers`]; an invalid estimator.
    pub fn of_layers_with<'a>(
        self,
        layers: impl IntoIterator<Item = &'a GaussLayer>,
        estimator: TraceEstimator,
    ) -> Result<Tensor> {
        let terms = layers
            .into_iter()
            .map(|layer| self.per_neuron_with(layer.precision(), estimator).map(Some));
        mean_over_layers("λ-loss terms", terms)?.ok_or(GaussError::NoLayers { what: "λ-loss" })
    }

    /// The per-neuron term from precision factors `P_z = L_z L_z ᵀ` given directly (the
    /// functional core; `L` is the lower triangle of `tril`): `tr S = |L⁻¹|²_F`,
    /// `log|S| = −2 Σ log|L_ii|`, `tr P = |L|²_F`.
    ///
    /// # Shapes
    /// `tril`: (Z, d, d) → (Z)
    ///
    /// # Errors
    /// `tril` not a (Z, d, d) batch with Z ≥ 1 or not of a float dtype; for the two
    /// covariance terms, which invert `L`, a zero or non-finite diagonal entry
    /// ([`gauss_layer::GaussError::Numerical`] naming the neuron; reads the Z·d diagonal on
    /// the host).
    pub fn per_neuron_from_factor(self, tril: &Tensor) -> Result<Tensor> {
        let (_, d) = check::square_batch(tril, "precision factors tril")?;
        check::float_dtype(tril, "precision factors tril")?;
        if is_half(tril.dtype()) {
            // As in `per_neuron_with`: in f32, rounded back once.
            let wide = self.per_neuron_from_factor(&tril.to_dtype(DType::F32)?)?;
            return Ok(wide.to_dtype(tril.dtype())?);
        }
        let factor = ops::tril(tril)?;
        if self != LambdaLoss::NegTracePrecision {
            check::nonsingular_triangular_batch(&factor, "precision factors tril")?;
        }
        let d = d as f64;
        Ok(match self {
            LambdaLoss::TraceCovariance => (ops::tril_inverse(&factor)?.sqr()?.sum((1, 2))? / d)?,
            LambdaLoss::LogdetCovariance => log_det_from_triangular(&factor)?.neg()?,
            LambdaLoss::NegTracePrecision => (factor.sqr()?.sum((1, 2))? / -d)?,
        })
    }
}

/// f16 and bf16, whose per-neuron λ terms are computed in f32.
fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

impl std::fmt::Display for LambdaLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LambdaLoss {
    type Err = GaussError;
    fn from_str(s: &str) -> Result<Self> {
        LambdaLoss::ALL
            .into_iter()
            .find(|variant| variant.name() == s)
            .ok_or_else(|| {
                GaussError::config(
                    "lambda_loss",
                    format!(
                        "must be one of trace_covariance, logdet_covariance, neg_trace_precision; got {s:?}"
                    ),
                )
            })
    }
}
