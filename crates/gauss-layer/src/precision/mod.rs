//! Precision parameterizations: raw learnable tensors → per-neuron precision `P`, covariance
//! `S = P⁻¹`, `log det P`, `tr S`, `tr P`.
//!
//! | parameterization | raw tensor | `P` |
//! |---|---|---|
//! | cholesky | `R` (Z, d, d) | `L Lᵀ`, `L = strict_lower(R) + diag(map(R_ii) + factor_diag_floor)` |
//! | direct | `A` (Z, d, d) | `(A + Aᵀ)/2` (positive definite only if kept so: see [`crate::repair`]) |
//! | expm | `A` (Z, d, d) | `expm((A + Aᵀ)/2)` |
//! | diag | `θ` (Z, d) | `diag(exp θ)` |
//! | sphere | `θ` (Z) | `exp(θ) I` |
//! | lowrank (rank r) | `θ` and `U` side by side (Z, d, r + 1) | `diag(exp θ) + U Uᵀ` |
//!
//! Every quantity has a tensor-op form in the raw tensor's dtype, which runs and
//! differentiates on every device (what CUDA, Metal and `portable: true` run); on the
//! [`crate::route`] `CpuFused` route, Candle CPU ops with closed-form backward ops take the
//! costly ones (the full forms' `log det P`, `tr Σ`, `tr P` in `stats_op`, the Hutchinson
//! estimate in `trace_estimate`, diag's, sphere's and lowrank's `e^θ` and `tr Σ` through
//! `cpu::exp`). Host work: [`Precision::from_precision_matrix`], `from_low_rank` and the
//! initial value (once, at construction), and the check of the raw values
//! ([`Precision::from_raw`], `bounds`). diag and sphere never build a (Z, d, d) tensor unless
//! one is asked for ([`Precision::precision_matrix`] and friends).
//!
//! # Width floor
//! With `width_floor = σ` the Gaussian is never narrower than σ in any direction: the
//! effective covariance is `S + σ² I`, so the effective precision is `(S + σ² I)⁻¹`. Every
//! method here returns the *effective* quantities. For diag and sphere that is the
//! elementwise `p / (1 + σ² p)`. For the full forms with a factor `P = F Fᵀ` (cholesky,
//! expm) the effective factor is `F K⁻ᵀ` with `K = cholesky(I + σ² FᵀF)`, and
//! `log det` drops by `log det(I + σ² FᵀF)`. For direct, `P_eff = P − σ² (P K⁻ᵀ)(P K⁻ᵀ)ᵀ`
//! with `K = cholesky(I + σ² P)`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::{GaussLayerConfig, Parameterization, Precision};
//! let config = GaussLayerConfig::with_parameterization(Parameterization::Diag);
//! // Two neurons over 3 inputs: P = diag(e^0, e^0, e^0) and diag(e^1, e^1, e^1).
//! let raw = Tensor::new(&[[0.0f64, 0.0, 0.0], [1.0, 1.0, 1.0]], &Device::Cpu)?;
//! let precision = Precision::from_raw(raw, 3, &config)?;
//! let log_det = precision.log_det_precision()?.to_vec1::<f64>()?;
//! assert!((log_det[1] - 3.0).abs() < 1e-12);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Tensor};

use crate::config::{Parameterization, PrecisionConfig};
use crate::error::{check_float_dtype, GaussError, Result};
use crate::linalg;

mod bounds;
mod diagonal;
mod full;
mod init;
mod inverse;
pub(crate) mod low_rank;
mod low_rank_fit;
pub(crate) mod maps;
mod operand;
mod stats_op;
mod trace_estimate;

pub(crate) use low_rank_fit::LowRankFit;
pub(crate) use operand::DistanceOperand;
pub use trace_estimate::seed_trace_probes;

/// Whether converting from `from` to `to` keeps every value and every range (the same dtype,
/// or a wider float: f16 and bf16 both fit in f32).
fn widens(from: DType, to: DType) -> bool {
    from == to
        || matches!(
            (from, to),
            (DType::F16 | DType::BF16, DType::F32 | DType::F64) | (DType::F32, DType::F64)
        )
}

/// `Σ_j e^{−x_ij}` per row of a (Z, d) tensor: `cpu::sum_exp_negated` (one fused op on the
/// `CpuFused` route), its sum [`linalg::sum_accumulated`] in f16 and bf16 (always the
/// portable route).
///
/// # Shapes
/// `x`: (Z, d) → (Z)
pub(crate) fn sum_exp_negated(x: &Tensor, portable: bool) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => linalg::sum_accumulated(&x.neg()?.exp()?, 1),
        _ => Ok(crate::cpu::sum_exp_negated(x, portable)?),
    }
}

/// How a full precision's raw (Z, d, d) tensor maps to `P`, where ops can read the raw
/// tensor directly ([`Precision::raw_map`]): the one place that rule is written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RawMap {
    /// `P = F Fᵀ`, `F = tril(raw, −1) + diag(map(diag raw) + floor)`.
    Cholesky {
        positive_map: crate::config::PositiveMap,
        floor: f64,
    },
    /// `P = (raw + rawᵀ)/2`.
    Direct,
    /// `P = expm((raw + rawᵀ)/2)`.
    Expm,
}

/// The precision matrices of a layer's Z neurons over d inputs, in one parameterization.
#[derive(Clone, Debug)]
pub struct Precision {
    config: PrecisionConfig,
    raw: Tensor,
    dim: usize,
}

impl Precision {
    /// Wraps a raw parameter tensor (the one stored under [`Precision::tensor_name`]).
    ///
    /// `config` is a [`PrecisionConfig`] or anything that gives one, such as a
    /// `&GaussLayerConfig`.
    ///
    /// # Shapes
    /// `raw`: cholesky, direct, expm (Z, d, d); diag (Z, d); sphere (Z); lowrank with rank r
    /// (Z, d, r + 1) (column 0 the log diagonal θ, then `U`).
    /// `dim` is d (needed for sphere, checked for the others).
    ///
    /// # Errors
    /// An invalid config, `dim = 0`, a raw tensor that is not a float or has the wrong shape
    /// for the parameterization (the message names the tensor); a raw value that is NaN, ±∞
    /// or beyond the range where `P` stays finite in the raw dtype ([`GaussError::Numerical`]
    /// naming the element; the ranges are in `docs/design.md`, §5).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use gauss_layer::{GaussLayerConfig, Precision};
    /// let raw = Tensor::zeros((4, 3, 3), DType::F32, &Device::Cpu)?; // cholesky: (Z, d, d)
    /// let precision = Precision::from_raw(raw, 3, &GaussLayerConfig::default())?;
    /// assert_eq!(precision.num_neurons(), 4);
    /// # Ok::<(), gauss_layer::GaussError>(())
    /// ```
    pub fn from_raw(raw: Tensor, dim: usize, config: impl Into<PrecisionConfig>) -> Result<Self> {
        let config = config.into();
        config.validate()?;
        if dim == 0 {
            return Err(GaussError::config("in_features", "must be >= 1, got 0"));
        }
        let parameterization = config.parameterization;
        let name = Self::tensor_name(parameterization);
        let what = format!("precision tensor `{name}` ({parameterization})");
        check_float_dtype(&what, raw.dtype())?;
        let dims = raw.dims();
        let z = dims.first().copied().unwrap_or(0);
        let expected = Self::raw_shape(parameterization, z, dim);
        if dims != expected.as_slice() || z == 0 {
            let expected = match parameterization {
                Parameterization::Diag => format!("(Z, {dim})"),
                Parameterization::Sphere => "(Z)".to_string(),
                // In u128: a rank of usize::MAX (refused later by the layer) must not overflow.
                Parameterization::LowRank { rank } => format!("(Z, {dim}, {})", rank as u128 + 1),
                _ => format!("(Z, {dim}, {dim})"),
            };
            return Err(GaussError::shape(
                what,
                format!("{expected} with Z >= 1"),
                dims,
            ));
        }
        bounds::check_raw_values(&raw, &config)?;
        Ok(Self { config, raw, dim })
    }

    /// The VarBuilder / checkpoint name of the raw tensor for a parameterization:
    /// `precision_factor` (cholesky), `precision` (direct), `precision_log` (expm),
    /// `precision_log_diag` (diag), `precision_log_scale` (sphere), `precision_low_rank`
    /// (lowrank).
    pub fn tensor_name(parameterization: Parameterization) -> &'static str {
        match parameterization {
            Parameterization::Cholesky => "precision_factor",
            Parameterization::Direct => "precision",
            Parameterization::Expm => "precision_log",
            Parameterization::Diag => "precision_log_diag",
            Parameterization::Sphere => "precision_log_scale",
            Parameterization::LowRank { .. } => "precision_low_rank",
        }
    }

    /// The shape of the raw tensor for Z neurons over d inputs.
    pub fn raw_shape(parameterization: Parameterization, z: usize, d: usize) -> Vec<usize> {
        match parameterization {
            Parameterization::Cholesky | Parameterization::Direct | Parameterization::Expm => {
                vec![z, d, d]
            }
            Parameterization::Diag => vec![z, d],
            Parameterization::Sphere => vec![z],
            // Saturating: a rank the config would refuse (rank ≤ d) must not overflow here;
            // the element-count check then refuses the shape.
            Parameterization::LowRank { rank } => vec![z, d, rank.saturating_add(1)],
        }
    }

    /// The same precision with another raw tensor (e.g. after a repair), checked like
    /// [`Precision::from_raw`].
    ///
    /// # Shapes
    /// `raw`: as in [`Precision::from_raw`]
    ///
    /// # Errors
    /// As [`Precision::from_raw`].
    pub fn with_raw(&self, raw: Tensor) -> Result<Self> {
        Self::from_raw(raw, self.dim, self.config)
    }

    /// The same precision with its raw tensor converted to `dtype` (differentiable: the
    /// conversion is a tensor op). A conversion to a wider dtype (f16 or bf16 to f32 or f64,
    /// f32 to f64) keeps every value, and the ranges [`Precision::from_raw`] holds raw values
    /// to only widen with the dtype, so it checks nothing again (and reads nothing from the
    /// device); a narrower one is checked as `from_raw`.
    ///
    /// # Errors
    /// A dtype that is not a float; for a narrower dtype, as [`Precision::from_raw`].
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        check_float_dtype("precision dtype", dtype)?;
        let raw = self.raw.to_dtype(dtype)?;
        if widens(self.raw.dtype(), dtype) {
            return Ok(Self {
                config: self.config,
                raw,
                dim: self.dim,
            });
        }
        self.with_raw(raw)
    }

    /// The map from the raw tensor to `P` (parameterization, positive map, floors).
    pub fn config(&self) -> PrecisionConfig {
        self.config
    }

    /// The parameterization.
    pub fn parameterization(&self) -> Parameterization {
        self.config.parameterization
    }

    /// The raw learnable tensor.
    pub fn raw(&self) -> &Tensor {
        &self.raw
    }

    /// Input dimension d.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of neurons Z.
    pub fn num_neurons(&self) -> usize {
        self.raw.dims()[0]
    }

    /// Whether `P` is diagonal plus low rank (lowrank).
    pub(crate) fn is_low_rank(&self) -> bool {
        matches!(self.parameterization(), Parameterization::LowRank { .. })
    }

    /// Whether `P` is diagonal (diag, sphere): such precisions are handled as (Z, d)
    /// diagonals and never as (Z, d, d) matrices.
    pub(crate) fn is_diagonal(&self) -> bool {
        matches!(
            self.parameterization(),
            Parameterization::Diag | Parameterization::Sphere
        )
    }

    /// A factor `F` with `P = F Fᵀ` where one is cheap: cholesky (`L`, lower triangular),
    /// expm (`expm(A/2)`), diag/sphere (diagonal); `None` for direct and lowrank. With a width floor it
    /// is the factor of the effective precision (see the module docs).
    ///
    /// # Shapes
    /// → (Z, d, d)
    ///
    /// # Errors
    /// Candle errors; for expm an overflowing exponential ([`GaussError::Numerical`]).
    pub fn factor(&self) -> Result<Option<Tensor>> {
        if self.is_low_rank() {
            return Ok(None);
        }
        if self.is_diagonal() {
            let p = diagonal::effective_diagonal(self)?;
            return Ok(Some(linalg::diag_embed(&p.sqrt()?)?));
        }
        full::factor(self)
    }

    /// Whether [`Precision::factor`] is lower triangular: cholesky without a width floor.
    pub(crate) fn is_factor_lower_triangular(&self) -> bool {
        matches!(self.raw_map(), Some(RawMap::Cholesky { .. }))
    }

    /// How the raw tensor maps to `P` where an op may read it directly instead of the
    /// effective precision: cholesky, direct and expm without a width floor (the floor adds
    /// `σ² I` to the covariance, which no raw map holds); `None` for every other form.
    pub(crate) fn raw_map(&self) -> Option<RawMap> {
        let config = self.config();
        if config.width_floor.is_some() {
            return None;
        }
        match config.parameterization {
            Parameterization::Cholesky => Some(RawMap::Cholesky {
                positive_map: config.positive_map,
                floor: config.factor_diag_floor,
            }),
            Parameterization::Direct => Some(RawMap::Direct),
            Parameterization::Expm => Some(RawMap::Expm),
            _ => None,
        }
    }

    /// The diagonal of `P` for diag and sphere (sphere broadcast to d), `None` otherwise.
    ///
    /// # Shapes
    /// → (Z, d)
    ///
    /// # Errors
    /// Candle errors.
    pub fn diagonal_precision(&self) -> Result<Option<Tensor>> {
        if self.is_diagonal() {
            return Ok(Some(diagonal::effective_diagonal(self)?));
        }
        Ok(None)
    }

    /// The precision matrices `P`.
    ///
    /// # Shapes
    /// → (Z, d, d)
    ///
    /// # Errors
    /// Candle errors; for expm an overflowing exponential.
    pub fn precision_matrix(&self) -> Result<Tensor> {
        if self.is_low_rank() {
            return low_rank::precision_matrix(self);
        }
        if self.is_diagonal() {
            return linalg::diag_embed(&diagonal::effective_diagonal(self)?);
        }
        full::precision_matrix(self)
    }

    /// The covariance matrices `S = P⁻¹` (with a width floor: `S_base + σ² I`). For direct,
    /// `P` must be positive definite (a Cholesky factorization is used; NaN otherwise).
    ///
    /// # Shapes
    /// → (Z, d, d)
    ///
    /// # Errors
    /// Candle errors; for expm an overflowing exponential.
    pub fn covariance_matrix(&self) -> Result<Tensor> {
        if self.is_low_rank() {
            return low_rank::covariance_matrix(self);
        }
        if self.is_diagonal() {
            return linalg::diag_embed(&diagonal::effective_variance(self)?);
        }
        full::covariance_matrix(self)
    }

    /// `log det P` per neuron. For direct, `P` must be positive definite (a Cholesky
    /// factorization is used; NaN otherwise).
    ///
    /// # Shapes
    /// → (Z)
    ///
    /// # Errors
    /// Candle errors; for expm with a width floor an overflowing exponential.
    pub fn log_det_precision(&self) -> Result<Tensor> {
        if self.is_low_rank() {
            return low_rank::log_det_precision(self);
        }
        if self.is_diagonal() {
            return diagonal::log_det_precision(self);
        }
        full::log_det_precision(self)
    }

    /// `tr S` (sum of covariance eigenvalues) per neuron. For cholesky `‖L⁻¹‖²_F` through a
    /// triangular inverse built from matmuls (no general inverse). In the raw tensor's dtype:
    /// f16 overflows past 65504 (a default layer's `tr S = d²` from d = 256), so for half
    /// precision take it from [`Precision::to_dtype`]`(F32)`, as the λ-loss does.
    ///
    /// # Shapes
    /// → (Z)
    ///
    /// # Errors
    /// Candle errors; for expm an overflowing exponential.
    pub fn trace_covariance(&self) -> Result<Tensor> {
        if self.is_low_rank() {
            return low_rank::trace_covariance(self);
        }
        if self.is_diagonal() {
            return diagonal::trace_covariance(self);
        }
        full::trace_covariance(self)
    }

    /// An unbiased estimate of `tr S` per neuron from `probes` random ±1 vectors
    /// (Hutchinson: `‖L⁻¹V‖²_F / k`), for cholesky without a width floor, where the exact
    /// trace and its gradient cost O(d³) per neuron and the estimate O(d²·probes); the exact
    /// [`Precision::trace_covariance`] for every other form (diag, sphere and lowrank are
    /// cheap exactly; direct and expm factor anyway). Fresh probes are drawn on every call,
    /// so the value is random while its expectation, and that of its gradient, is the exact
    /// trace's: on the CPU from the [`seed_trace_probes`] generator once it is seeded (a
    /// repeatable sequence), else from the device's generator (on CUDA seeded by
    /// `Device::set_seed`).
    ///
    /// # Shapes
    /// → (Z)
    ///
    /// # Errors
    /// `probes` of 0, or so many that the (Z, d, probes) probe tensor exceeds one allocation
    /// (cholesky); as [`Precision::trace_covariance`].
    pub fn trace_covariance_estimate(&self, probes: usize) -> Result<Tensor> {
        if probes == 0 {
            return Err(GaussError::config(
                "probes",
                "the trace estimate needs at least 1 probe vector",
            ));
        }
        if self.is_low_rank() || self.is_diagonal() {
            return self.trace_covariance();
        }
        full::trace_covariance_estimate(self, probes)
    }

    /// `tr P` per neuron.
    ///
    /// # Shapes
    /// → (Z)
    ///
    /// # Errors
    /// Candle errors; for expm an overflowing exponential.
    pub fn trace_precision(&self) -> Result<Tensor> {
        if self.is_low_rank() {
            return low_rank::trace_precision(self);
        }
        if self.is_diagonal() {
            return linalg::sum_accumulated(&diagonal::effective_diagonal(self)?, 1);
        }
        full::trace_precision(self)
    }
}

#[cfg(test)]
mod tests;
