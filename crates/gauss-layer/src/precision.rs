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
//!
//! # Width floor
//! With `width_floor = σ` the Gaussian is never narrower than σ in any direction: the
//! effective covariance is `S + σ² I`, so the effective precision is `(S + σ² I)⁻¹`. Every
//! method here returns the *effective* quantities. For diag and sphere that is the
//! elementwise `p / (1 + σ² p)`. For the full forms with a factor `P = F Fᵀ` (cholesky,
//! expm) the effective factor is `F K⁻ᵀ` with `K = cholesky(I + σ² FᵀF)`, and
//! `log det` drops by `log det(I + σ² FᵀF)`: one extra d×d Cholesky (d sequential tensor
//! steps), one triangular inverse and three batched matmuls per evaluation. The effective
//! factor is then no longer triangular. For direct, `P_eff = P − σ² (P K⁻ᵀ)(P K⁻ᵀ)ᵀ` with
//! `K = cholesky(I + σ² P)`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::{GaussLayerConfig, Parameterization, Precision};
//! let config = GaussLayerConfig { parameterization: Parameterization::Diag, ..Default::default() };
//! // Two neurons over 3 inputs: P = diag(e^0, e^0, e^0) and diag(e^1, e^1, e^1).
//! let raw = Tensor::new(&[[0.0f64, 0.0, 0.0], [1.0, 1.0, 1.0]], &Device::Cpu)?;
//! let precision = Precision::from_raw(raw, 3, &config)?;
//! let log_det = precision.log_det_precision()?.to_vec1::<f64>()?;
//! assert!((log_det[1] - 3.0).abs() < 1e-12);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Device, Tensor, D};

use crate::config::{GaussLayerConfig, Parameterization, PositiveMap};
use crate::error::{GaussError, Result};
use crate::init;
use crate::linalg;
use crate::repair;

/// The precision matrices of a layer's Z neurons over d inputs, in one parameterization.
#[derive(Clone, Debug)]
pub struct Precision {
    parameterization: Parameterization,
    raw: Tensor,
    positive_map: PositiveMap,
    factor_diag_floor: f64,
    dim: usize,
    width_floor: Option<f64>,
}

/// `log(1 + e^r)`, stable for any finite `r` (no overflow for large `r`).
fn softplus(raw: &Tensor) -> Result<Tensor> {
    Ok((raw.relu()? + ((raw.abs()?.neg()?.exp()? + 1.0)?.log()?))?)
}

fn map_positive(map: PositiveMap, raw: &Tensor) -> Result<Tensor> {
    match map {
        PositiveMap::Softplus => softplus(raw),
        PositiveMap::Exp => Ok(raw.exp()?),
    }
}

/// Inverse of the positive map for `y > 0`, in f64 on the host.
pub fn positive_map_inverse(map: PositiveMap, y: f64) -> f64 {
    match map {
        // softplus⁻¹(y) = log(e^y − 1) = y + log(1 − e^{−y}).
        PositiveMap::Softplus => y + (-(-y).exp_m1()).ln(),
        PositiveMap::Exp => y.ln(),
    }
}

/// Derivative of the positive map at `raw`, in f64 on the host (sigmoid for softplus,
/// `exp` for exp): chains gradients between a raw diagonal and the factor's diagonal.
pub fn positive_map_derivative(map: PositiveMap, raw: f64) -> f64 {
    match map {
        PositiveMap::Softplus => 1.0 / (1.0 + (-raw).exp()),
        PositiveMap::Exp => raw.exp(),
    }
}

/// `x > 0`, false for NaN.
fn is_positive(x: f64) -> bool {
    x > 0.0
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

impl Precision {
    /// Wraps a raw parameter tensor (the one stored under [`Precision::tensor_name`]).
    ///
    /// # Shapes
    /// `raw`: cholesky, direct, expm (Z, d, d); diag (Z, d); sphere (Z).
    /// `dim` is d (needed for sphere, checked for the others).
    pub fn from_raw(raw: Tensor, dim: usize, config: &GaussLayerConfig) -> Result<Self> {
        config.validate()?;
        if dim == 0 {
            return Err(GaussError::config("in_features", "must be >= 1, got 0"));
        }
        let parameterization = config.parameterization;
        let name = Self::tensor_name(parameterization);
        let what = format!("precision tensor `{name}` ({parameterization})");
        if !is_float(raw.dtype()) {
            return Err(GaussError::DType {
                what,
                expected: DType::F32,
                got: raw.dtype(),
            });
        }
        let dims = raw.dims();
        let (ok, expected) = match parameterization {
            Parameterization::Cholesky | Parameterization::Direct | Parameterization::Expm => (
                dims.len() == 3 && dims[1] == dim && dims[2] == dim,
                format!("(Z, {dim}, {dim})"),
            ),
            Parameterization::Diag => (dims.len() == 2 && dims[1] == dim, format!("(Z, {dim})")),
            Parameterization::Sphere => (dims.len() == 1, "(Z)".to_string()),
        };
        if !ok || dims[0] == 0 {
            return Err(GaussError::shape(
                what,
                format!("{expected} with Z >= 1"),
                dims,
            ));
        }
        Ok(Self {
            parameterization,
            raw,
            positive_map: config.positive_map,
            factor_diag_floor: config.factor_diag_floor,
            dim,
            width_floor: config.width_floor,
        })
    }

    /// Builds the raw tensor that represents the given precision matrices exactly (inverse
    /// of the parameterization's map): used by importers, conversions and tests.
    /// Errors if `P` is not representable (not PD; not diagonal for diag; not a multiple of
    /// the identity for sphere).
    ///
    /// `P` is the *effective* precision: with a width floor σ, the stored base is
    /// `(P⁻¹ − σ² I)⁻¹`, which must be positive definite (P no wider than σ allows).
    /// Runs once on the host in f64 (faer eigendecompositions for expm and the width
    /// floor); the raw tensor comes back on `precision`'s device and dtype.
    ///
    /// # Shapes
    /// `precision`: (Z, d, d)
    pub fn from_precision_matrix(precision: &Tensor, config: &GaussLayerConfig) -> Result<Self> {
        config.validate()?;
        let (z, d, values) = repair::to_host_matrices(precision, "precision matrix")?;
        if z == 0 || d == 0 {
            return Err(GaussError::shape(
                "precision matrix",
                "(Z, d, d) with Z, d >= 1",
                precision.dims(),
            ));
        }
        let (dtype, device) = (precision.dtype(), precision.device());
        let tolerance = if dtype == DType::F64 { 1e-9 } else { 1e-5 };
        let mut raw = Vec::with_capacity(z * d * d);
        for neuron in 0..z {
            let block = &values[neuron * d * d..(neuron + 1) * d * d];
            let base = base_precision_block(block, d, config.width_floor, neuron)?;
            raw.extend(raw_from_precision_block(
                &base, d, config, neuron, tolerance,
            )?);
        }
        let raw = match config.parameterization {
            Parameterization::Diag => repair::from_host(raw, &[z, d], dtype, device)?,
            Parameterization::Sphere => repair::from_host(raw, &[z], dtype, device)?,
            _ => repair::from_host(raw, &[z, d, d], dtype, device)?,
        };
        Self::from_raw(raw, d, config)
    }

    /// The VarBuilder / checkpoint name of the raw tensor for a parameterization:
    /// `precision_factor` (cholesky), `precision` (direct), `precision_log` (expm),
    /// `precision_log_diag` (diag), `precision_log_scale` (sphere).
    pub fn tensor_name(parameterization: Parameterization) -> &'static str {
        match parameterization {
            Parameterization::Cholesky => "precision_factor",
            Parameterization::Direct => "precision",
            Parameterization::Expm => "precision_log",
            Parameterization::Diag => "precision_log_diag",
            Parameterization::Sphere => "precision_log_scale",
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
        }
    }

    /// The same precision with another raw tensor (e.g. after a repair), checked like
    /// [`Precision::from_raw`].
    ///
    /// # Shapes
    /// `raw`: as in [`Precision::from_raw`]
    pub fn with_raw(&self, raw: Tensor) -> Result<Self> {
        Self::from_raw(raw, self.dim, &self.config_view())
    }

    /// The same precision with its raw tensor converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        self.with_raw(self.raw.to_dtype(dtype)?)
    }

    fn config_view(&self) -> GaussLayerConfig {
        GaussLayerConfig {
            parameterization: self.parameterization,
            positive_map: self.positive_map,
            factor_diag_floor: self.factor_diag_floor,
            width_floor: self.width_floor,
            ..Default::default()
        }
    }

    /// The parameterization.
    pub fn parameterization(&self) -> Parameterization {
        self.parameterization
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

    /// The positive map of the Cholesky diagonal.
    pub fn positive_map(&self) -> PositiveMap {
        self.positive_map
    }

    /// The floor added to the mapped Cholesky diagonal.
    pub fn factor_diag_floor(&self) -> f64 {
        self.factor_diag_floor
    }

    /// The width floor σ, if any (see the module docs).
    pub fn width_floor(&self) -> Option<f64> {
        self.width_floor
    }

    /// Whether [`Precision::factor`] is lower triangular (cholesky without a width floor).
    pub fn is_factor_lower_triangular(&self) -> bool {
        self.parameterization == Parameterization::Cholesky && self.width_floor.is_none()
    }

    fn z(&self) -> usize {
        self.raw.dims()[0]
    }

    /// The base Cholesky factor `L` (no width floor).
    fn cholesky_factor(&self) -> Result<Tensor> {
        let diag = (map_positive(self.positive_map, &linalg::diagonal(&self.raw)?)?
            + self.factor_diag_floor)?;
        Ok((linalg::strict_tril(&self.raw)? + linalg::diag_embed(&diag)?)?)
    }

    /// The base diagonal precision (no width floor), diag and sphere only.
    fn base_diagonal(&self) -> Result<Option<Tensor>> {
        match self.parameterization {
            Parameterization::Diag => Ok(Some(self.raw.exp()?)),
            Parameterization::Sphere => Ok(Some(
                self.raw
                    .exp()?
                    .unsqueeze(1)?
                    .broadcast_as((self.z(), self.dim))?
                    .contiguous()?,
            )),
            _ => Ok(None),
        }
    }

    /// `1/p_eff = e^{−θ} + σ²` for diag/sphere, broadcast to (Z, d).
    fn diagonal_variance(&self) -> Result<Option<Tensor>> {
        let log_p = match self.parameterization {
            Parameterization::Diag => self.raw.clone(),
            Parameterization::Sphere => self
                .raw
                .unsqueeze(1)?
                .broadcast_as((self.z(), self.dim))?
                .contiguous()?,
            _ => return Ok(None),
        };
        let variance = log_p.neg()?.exp()?;
        Ok(Some(match self.width_floor {
            Some(sigma) => (variance + sigma * sigma)?,
            None => variance,
        }))
    }

    /// The base factor `F` with `P_base = F Fᵀ` (no width floor), `None` for direct.
    fn base_factor(&self) -> Result<Option<Tensor>> {
        match self.parameterization {
            Parameterization::Cholesky => Ok(Some(self.cholesky_factor()?)),
            Parameterization::Expm => Ok(Some(linalg::expm_symmetric(
                &(linalg::symmetrize(&self.raw)? * 0.5)?,
            )?)),
            Parameterization::Direct => Ok(None),
            Parameterization::Diag | Parameterization::Sphere => match self.base_diagonal()? {
                Some(p) => Ok(Some(linalg::diag_embed(&p.sqrt()?)?)),
                None => Ok(None),
            },
        }
    }

    /// Cholesky factor of `M = I + σ² FᵀF` (or `I + σ² P` for direct).
    fn floor_cholesky(&self, sigma: f64, gram_like: &Tensor) -> Result<Tensor> {
        let eye = linalg::eye_like(self.dim, gram_like)?;
        let m = (gram_like * (sigma * sigma))?.broadcast_add(&eye)?;
        linalg::cholesky(&m)
    }

    /// A factor `F` with `P = F Fᵀ` where one is cheap: cholesky (`L`, lower triangular),
    /// expm (`expm(A/2)`), diag/sphere (diagonal); `None` for direct. With a width floor it
    /// is the factor of the effective precision (see the module docs).
    ///
    /// # Shapes
    /// → (Z, d, d)
    pub fn factor(&self) -> Result<Option<Tensor>> {
        if let Some(variance) = self.diagonal_variance()? {
            return Ok(Some(linalg::diag_embed(&variance.recip()?.sqrt()?)?));
        }
        let Some(base) = self.base_factor()? else {
            return Ok(None);
        };
        match self.width_floor {
            None => Ok(Some(base)),
            Some(sigma) => {
                let k = self
                    .floor_cholesky(sigma, &linalg::matmul(&linalg::transpose(&base)?, &base)?)?;
                let k_inv = linalg::tril_inverse(&k)?;
                Ok(Some(linalg::matmul(&base, &linalg::transpose(&k_inv)?)?))
            }
        }
    }

    /// The diagonal of `P` for diag and sphere (sphere broadcast to d), `None` otherwise.
    ///
    /// # Shapes
    /// → (Z, d)
    pub fn diagonal_precision(&self) -> Result<Option<Tensor>> {
        match self.diagonal_variance()? {
            Some(variance) => Ok(Some(variance.recip()?)),
            None => Ok(None),
        }
    }

    /// The precision matrices `P`.
    ///
    /// # Shapes
    /// → (Z, d, d)
    pub fn precision_matrix(&self) -> Result<Tensor> {
        if let Some(p) = self.diagonal_precision()? {
            return linalg::diag_embed(&p);
        }
        match (self.parameterization, self.width_floor) {
            (Parameterization::Direct, None) => linalg::symmetrize(&self.raw),
            (Parameterization::Direct, Some(sigma)) => {
                let p = linalg::symmetrize(&self.raw)?;
                let k = self.floor_cholesky(sigma, &p)?;
                let pk = linalg::matmul(&p, &linalg::transpose(&linalg::tril_inverse(&k)?)?)?;
                Ok((p - (linalg::gram(&pk)? * (sigma * sigma))?)?)
            }
            (Parameterization::Expm, None) => {
                linalg::expm_symmetric(&linalg::symmetrize(&self.raw)?)
            }
            _ => match self.factor()? {
                Some(f) => linalg::gram(&f),
                None => linalg::symmetrize(&self.raw),
            },
        }
    }

    /// Base covariance `P_base⁻¹` of the full forms, through triangular inverses.
    fn base_covariance_full(&self) -> Result<Tensor> {
        let lower = match self.parameterization {
            Parameterization::Expm => {
                return linalg::expm_symmetric(&linalg::symmetrize(&self.raw)?.neg()?)
            }
            Parameterization::Direct => linalg::cholesky(&linalg::symmetrize(&self.raw)?)?,
            _ => self.cholesky_factor()?,
        };
        let inv = linalg::tril_inverse(&lower)?;
        linalg::matmul(&linalg::transpose(&inv)?, &inv)
    }

    /// The covariance matrices `S = P⁻¹` (with a width floor: `S_base + σ² I`). For direct,
    /// `P` must be positive definite (a Cholesky factorization is used).
    ///
    /// # Shapes
    /// → (Z, d, d)
    pub fn covariance_matrix(&self) -> Result<Tensor> {
        if let Some(variance) = self.diagonal_variance()? {
            return linalg::diag_embed(&variance);
        }
        let base = self.base_covariance_full()?;
        match self.width_floor {
            None => Ok(base),
            Some(sigma) => {
                let eye = (linalg::eye_like(self.dim, &base)? * (sigma * sigma))?;
                Ok(base.broadcast_add(&eye)?)
            }
        }
    }

    /// `log det P` per neuron. For direct, `P` must be positive definite (a Cholesky
    /// factorization is used).
    ///
    /// # Shapes
    /// → (Z)
    pub fn log_det_precision(&self) -> Result<Tensor> {
        if let Some(variance) = self.diagonal_variance()? {
            return Ok(variance.log()?.sum(D::Minus1)?.neg()?);
        }
        let two_sum_log_diag = |lower: &Tensor| -> Result<Tensor> {
            Ok((linalg::diagonal(lower)?.log()?.sum(D::Minus1)? * 2.0)?)
        };
        let base = match self.parameterization {
            Parameterization::Expm => linalg::trace(&self.raw)?,
            Parameterization::Direct => {
                two_sum_log_diag(&linalg::cholesky(&linalg::symmetrize(&self.raw)?)?)?
            }
            _ => two_sum_log_diag(&self.cholesky_factor()?)?,
        };
        let Some(sigma) = self.width_floor else {
            return Ok(base);
        };
        let gram_like = match self.base_factor()? {
            Some(f) => linalg::matmul(&linalg::transpose(&f)?, &f)?,
            None => linalg::symmetrize(&self.raw)?,
        };
        let k = self.floor_cholesky(sigma, &gram_like)?;
        Ok((base - two_sum_log_diag(&k)?)?)
    }

    /// `tr S` (sum of covariance eigenvalues) per neuron. For cholesky `‖L⁻¹‖²_F` through a
    /// triangular inverse built from matmuls (no general inverse).
    ///
    /// # Shapes
    /// → (Z)
    pub fn trace_covariance(&self) -> Result<Tensor> {
        if let Some(variance) = self.diagonal_variance()? {
            return Ok(variance.sum(D::Minus1)?);
        }
        let base = match self.parameterization {
            Parameterization::Expm => {
                linalg::trace_expm_symmetric(&linalg::symmetrize(&self.raw)?.neg()?)?
            }
            Parameterization::Direct => {
                linalg::tril_inverse(&linalg::cholesky(&linalg::symmetrize(&self.raw)?)?)?
                    .sqr()?
                    .sum((1, 2))?
            }
            _ => linalg::tril_inverse(&self.cholesky_factor()?)?
                .sqr()?
                .sum((1, 2))?,
        };
        match self.width_floor {
            None => Ok(base),
            Some(sigma) => Ok((base + self.dim as f64 * sigma * sigma)?),
        }
    }

    /// `tr P` per neuron.
    ///
    /// # Shapes
    /// → (Z)
    pub fn trace_precision(&self) -> Result<Tensor> {
        if let Some(p) = self.diagonal_precision()? {
            return Ok(p.sum(D::Minus1)?);
        }
        match (self.parameterization, self.width_floor) {
            (Parameterization::Direct, None) => linalg::trace(&self.raw),
            (Parameterization::Cholesky, None) => Ok(self.cholesky_factor()?.sqr()?.sum((1, 2))?),
            _ => linalg::trace(&self.precision_matrix()?),
        }
    }

    /// The FGN initial raw tensor: `P ≈ scale · I` with a tiny symmetric random perturbation
    /// of relative size `config.init.perturbation` (`scale = config.init.precision_scale`,
    /// default `1/d`), mapped through the inverse of the parameterization. The noise comes from
    /// the seeded host stream [`crate::init::InitStream::Precision`] when `config.init.seed` is
    /// set (the same bits on every device), else from Candle's generator on `device`.
    ///
    /// # Shapes
    /// → the raw shape for (Z, d) (see [`Precision::raw_shape`])
    pub fn initial_raw(
        z: usize,
        d: usize,
        config: &GaussLayerConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        config.validate_sizes(d, z)?;
        let scale = config.init.precision_scale.unwrap_or(1.0 / d as f64);
        let eps = config.init.perturbation;
        let noise = match config.init.seed {
            Some(seed) => {
                let mut rng = init::stream_rng(seed, init::InitStream::Precision);
                init::normal(&mut rng, z * d * d, 0.0, 1.0)?
            }
            None => {
                let noise = Tensor::randn(0f32, 1f32, (z, d, d), device)?;
                repair::to_host_matrices(&noise, "initial noise")?.2
            }
        };
        let mut values = vec![0.0; z * d * d];
        for neuron in 0..z {
            for i in 0..d {
                for j in 0..d {
                    let n = |a: usize, b: usize| noise[neuron * d * d + a * d + b];
                    let off = match config.parameterization {
                        // Diagonal forms only take a diagonal perturbation.
                        Parameterization::Diag => (i == j) as u8 as f64 * n(i, i),
                        Parameterization::Sphere => (i == j) as u8 as f64 * n(0, 0),
                        _ => 0.5 * (n(i, j) + n(j, i)),
                    };
                    let eye = (i == j) as u8 as f64;
                    values[neuron * d * d + i * d + j] = scale * (eye + eps * off);
                }
            }
        }
        let precision = Tensor::from_vec(values, (z, d, d), &Device::Cpu)?;
        // The initial P is the base precision: no width floor in the inverse map.
        let base_config = GaussLayerConfig {
            width_floor: None,
            ..config.clone()
        };
        let raw = Self::from_precision_matrix(&precision, &base_config)?.raw;
        Ok(raw.to_dtype(dtype)?.to_device(device)?)
    }
}

/// The base precision block (width floor removed): `(P⁻¹ − σ² I)⁻¹` through the
/// eigendecomposition, eigenvalue by eigenvalue `λ / (1 − σ² λ)`.
fn base_precision_block(
    block: &[f64],
    d: usize,
    width_floor: Option<f64>,
    neuron: usize,
) -> Result<Vec<f64>> {
    let Some(sigma) = width_floor else {
        return Ok(block.to_vec());
    };
    let (eigenvalues, vectors) = repair::symmetric_eigen(&repair::symmetric_block(block, d))?;
    let s2 = sigma * sigma;
    for &l in &eigenvalues {
        if !is_positive(l) {
            return Err(GaussError::NotPositiveDefinite {
                neuron,
                min_eigenvalue: eigenvalues[0],
            });
        }
        if !is_positive(1.0 - s2 * l) {
            return Err(GaussError::config(
                "width_floor",
                format!(
                    "neuron {neuron}: precision eigenvalue {l:e} is narrower than the width floor {sigma:e} allows (at most {:e})",
                    1.0 / s2
                ),
            ));
        }
    }
    Ok(repair::from_eigen(&eigenvalues, &vectors, |l| {
        l / (1.0 - s2 * l)
    }))
}

/// The raw values of one neuron for its base precision block, on the host in f64.
fn raw_from_precision_block(
    block: &[f64],
    d: usize,
    config: &GaussLayerConfig,
    neuron: usize,
    tolerance: f64,
) -> Result<Vec<f64>> {
    let not_pd = |block: &[f64]| -> GaussError {
        let min_eigenvalue = repair::symmetric_eigen(&repair::symmetric_block(block, d))
            .map(|(values, _)| values[0])
            .unwrap_or(f64::NAN);
        GaussError::NotPositiveDefinite {
            neuron,
            min_eigenvalue,
        }
    };
    let scale = block.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let off_diagonal_max = (0..d)
        .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
        .fold(0.0f64, |m, (i, j)| m.max(block[i * d + j].abs()));
    match config.parameterization {
        Parameterization::Direct => Ok(block.to_vec()),
        Parameterization::Cholesky => {
            let llt = repair::symmetric_block(block, d)
                .llt(faer::Side::Lower)
                .map_err(|_| not_pd(block))?;
            let l = llt.L();
            let mut raw = vec![0.0; d * d];
            for i in 0..d {
                for j in 0..i {
                    raw[i * d + j] = l[(i, j)];
                }
                let above_floor = l[(i, i)] - config.factor_diag_floor;
                if !is_positive(above_floor) {
                    return Err(GaussError::config(
                        "factor_diag_floor",
                        format!(
                            "neuron {neuron}: Cholesky diagonal {:e} is not above the floor {:e}, so P is not representable",
                            l[(i, i)],
                            config.factor_diag_floor
                        ),
                    ));
                }
                raw[i * d + i] = positive_map_inverse(config.positive_map, above_floor);
            }
            Ok(raw)
        }
        Parameterization::Expm => {
            let (eigenvalues, vectors) =
                repair::symmetric_eigen(&repair::symmetric_block(block, d))?;
            if !is_positive(eigenvalues[0]) {
                return Err(not_pd(block));
            }
            Ok(repair::from_eigen(&eigenvalues, &vectors, f64::ln))
        }
        Parameterization::Diag | Parameterization::Sphere => {
            if off_diagonal_max > tolerance * scale {
                return Err(GaussError::config(
                    "parameterization",
                    format!(
                        "neuron {neuron}: P has off-diagonal entries up to {off_diagonal_max:e}, so `{}` cannot represent it",
                        config.parameterization
                    ),
                ));
            }
            let diagonal: Vec<f64> = (0..d).map(|i| block[i * d + i]).collect();
            if diagonal.iter().any(|&p| !is_positive(p)) {
                return Err(not_pd(block));
            }
            if config.parameterization == Parameterization::Diag {
                return Ok(diagonal.iter().map(|p| p.ln()).collect());
            }
            let (lo, hi) = diagonal
                .iter()
                .fold((f64::INFINITY, 0.0f64), |(lo, hi), &p| {
                    (lo.min(p), hi.max(p))
                });
            if hi - lo > tolerance * hi {
                return Err(GaussError::config(
                    "parameterization",
                    format!(
                        "neuron {neuron}: P's diagonal ranges over [{lo:e}, {hi:e}], not a multiple of the identity, so `sphere` cannot represent it"
                    ),
                ));
            }
            let mean = diagonal.iter().sum::<f64>() / d as f64;
            Ok(vec![mean.ln()])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::relative_error;

    fn config(parameterization: Parameterization, width_floor: Option<f64>) -> GaussLayerConfig {
        GaussLayerConfig {
            parameterization,
            width_floor,
            ..Default::default()
        }
    }

    /// A random SPD (or diagonal / scaled identity) batch for a parameterization.
    fn random_precision(parameterization: Parameterization, z: usize, d: usize) -> Tensor {
        let dev = Device::Cpu;
        match parameterization {
            Parameterization::Diag => linalg::diag_embed(
                &Tensor::randn(0f64, 1.0, (z, d), &dev)
                    .unwrap()
                    .exp()
                    .unwrap(),
            )
            .unwrap(),
            Parameterization::Sphere => {
                let s = Tensor::randn(0f64, 1.0, (z, 1, 1), &dev)
                    .unwrap()
                    .exp()
                    .unwrap();
                Tensor::eye(d, DType::F64, &dev)
                    .unwrap()
                    .broadcast_mul(&s)
                    .unwrap()
            }
            _ => {
                let a = Tensor::randn(0f64, 0.5, (z, d, d), &dev).unwrap();
                let eye = Tensor::eye(d, DType::F64, &dev).unwrap();
                linalg::gram(&a).unwrap().broadcast_add(&eye).unwrap()
            }
        }
    }

    /// Host reference: eigenvalues of each symmetric block.
    fn eigenvalues(matrices: &Tensor) -> Vec<Vec<f64>> {
        let (z, d, values) = repair::to_host_matrices(matrices, "m").unwrap();
        (0..z)
            .map(|n| {
                let block = repair::symmetric_block(&values[n * d * d..(n + 1) * d * d], d);
                repair::symmetric_eigen(&block).unwrap().0
            })
            .collect()
    }

    #[test]
    fn every_parameterization_round_trips_and_is_consistent() {
        let (z, d) = (3, 5);
        for parameterization in Parameterization::ALL {
            for width_floor in [None, Some(0.3)] {
                let cfg = config(parameterization, width_floor);
                // Under a width floor the matrix handed in is the effective precision; keep it
                // wider than the floor allows by shrinking it.
                let mut p = random_precision(parameterization, z, d);
                if let Some(s) = width_floor {
                    let biggest = eigenvalues(&p)
                        .iter()
                        .flatten()
                        .fold(0.0f64, |m, v| m.max(*v));
                    p = (p * (0.5 / (s * s * biggest))).unwrap();
                }
                let what = format!("{parameterization} floor {width_floor:?}");
                let precision = Precision::from_precision_matrix(&p, &cfg).unwrap();
                let back = precision.precision_matrix().unwrap();
                assert!(
                    relative_error(&back, &p).unwrap() < 1e-10,
                    "{what}: P round trip"
                );

                // S P = I.
                let s = precision.covariance_matrix().unwrap();
                let eye = Tensor::eye(d, DType::F64, &Device::Cpu)
                    .unwrap()
                    .broadcast_as((z, d, d))
                    .unwrap();
                let product = linalg::matmul(&s, &p).unwrap();
                assert!(
                    relative_error(&product, &eye).unwrap() < 1e-9,
                    "{what}: S P = I"
                );

                // log det and traces against the eigenvalues (closed forms).
                let eig = eigenvalues(&p);
                let log_det: Vec<f64> =
                    eig.iter().map(|e| e.iter().map(|l| l.ln()).sum()).collect();
                let tr_s: Vec<f64> = eig
                    .iter()
                    .map(|e| e.iter().map(|l| 1.0 / l).sum())
                    .collect();
                let tr_p: Vec<f64> = eig.iter().map(|e| e.iter().sum()).collect();
                let t = |v: Vec<f64>| Tensor::new(v, &Device::Cpu).unwrap();
                assert!(
                    relative_error(&precision.log_det_precision().unwrap(), &t(log_det)).unwrap()
                        < 1e-9,
                    "{what}: log det"
                );
                assert!(
                    relative_error(&precision.trace_covariance().unwrap(), &t(tr_s)).unwrap()
                        < 1e-9,
                    "{what}: tr S"
                );
                assert!(
                    relative_error(&precision.trace_precision().unwrap(), &t(tr_p)).unwrap() < 1e-9,
                    "{what}: tr P"
                );

                // The factor reproduces P.
                if let Some(f) = precision.factor().unwrap() {
                    assert!(
                        relative_error(&linalg::gram(&f).unwrap(), &p).unwrap() < 1e-9,
                        "{what}: F Fᵀ"
                    );
                }
                if let Some(diag) = precision.diagonal_precision().unwrap() {
                    assert!(
                        relative_error(&diag, &linalg::diagonal(&p).unwrap()).unwrap() < 1e-12,
                        "{what}: diagonal"
                    );
                }
            }
        }
    }

    #[test]
    fn width_floor_adds_to_the_covariance() {
        // diag: p = e^θ, σ = 0.5: effective variance e^{−θ} + 0.25 (closed form).
        let cfg = config(Parameterization::Diag, Some(0.5));
        let raw = Tensor::new(&[[0.0f64, 2.0, -1.0]], &Device::Cpu).unwrap();
        let precision = Precision::from_raw(raw, 3, &cfg).unwrap();
        let p = precision
            .diagonal_precision()
            .unwrap()
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (got, theta) in p[0].iter().zip([0.0f64, 2.0, -1.0]) {
            let expected = 1.0 / ((-theta).exp() + 0.25);
            assert!((got - expected).abs() < 1e-14 * expected);
        }
        // Full forms: covariance = S_base + σ² I.
        let cfg = config(Parameterization::Cholesky, Some(0.5));
        let raw = Tensor::randn(0f64, 1.0, (2, 4, 4), &Device::Cpu).unwrap();
        let floored = Precision::from_raw(raw.clone(), 4, &cfg).unwrap();
        let base = Precision::from_raw(raw, 4, &config(Parameterization::Cholesky, None)).unwrap();
        let eye = (Tensor::eye(4, DType::F64, &Device::Cpu).unwrap() * 0.25).unwrap();
        let expected = base
            .covariance_matrix()
            .unwrap()
            .broadcast_add(&eye)
            .unwrap();
        assert!(relative_error(&floored.covariance_matrix().unwrap(), &expected).unwrap() < 1e-12);
        assert!(!floored.is_factor_lower_triangular());
    }

    #[test]
    fn softplus_is_stable_for_large_raw_values() {
        let raw = Tensor::new(&[-800.0f32, -30.0, 0.0, 30.0, 800.0], &Device::Cpu).unwrap();
        let y = softplus(&raw).unwrap().to_vec1::<f32>().unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        assert!((y[4] - 800.0).abs() < 1e-3 && (y[2] - 2f32.ln()).abs() < 1e-6);
        for r in [-5.0, 0.0, 0.5, 7.0] {
            let y = positive_map_inverse(PositiveMap::Softplus, (1.0f64 + f64::exp(r)).ln());
            assert!((y - r).abs() < 1e-12);
        }
    }

    #[test]
    fn unrepresentable_matrices_are_errors() {
        let not_pd = Tensor::new(&[[[1.0f64, 2.0], [2.0, 1.0]]], &Device::Cpu).unwrap();
        for parameterization in [Parameterization::Cholesky, Parameterization::Expm] {
            let err = Precision::from_precision_matrix(&not_pd, &config(parameterization, None));
            assert!(matches!(
                err,
                Err(GaussError::NotPositiveDefinite { neuron: 0, .. })
            ));
        }
        let full = Tensor::new(&[[[2.0f64, 0.5], [0.5, 2.0]]], &Device::Cpu).unwrap();
        assert!(
            Precision::from_precision_matrix(&full, &config(Parameterization::Diag, None)).is_err()
        );
        let diag = Tensor::new(&[[[2.0f64, 0.0], [0.0, 3.0]]], &Device::Cpu).unwrap();
        assert!(
            Precision::from_precision_matrix(&diag, &config(Parameterization::Sphere, None))
                .is_err()
        );
        // Wrong raw shapes name the tensor.
        let err = Precision::from_raw(
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
            4,
            &config(Parameterization::Diag, None),
        )
        .unwrap_err();
        assert!(err.to_string().contains("precision_log_diag"), "{err}");
    }

    #[test]
    fn initial_raw_is_close_to_scaled_identity() {
        for parameterization in Parameterization::ALL {
            let cfg = config(parameterization, None);
            let raw = Precision::initial_raw(3, 4, &cfg, DType::F64, &Device::Cpu).unwrap();
            let p = Precision::from_raw(raw, 4, &cfg)
                .unwrap()
                .precision_matrix()
                .unwrap();
            let eye = (Tensor::eye(4, DType::F64, &Device::Cpu).unwrap() * 0.25).unwrap();
            let err = relative_error(&p, &eye.broadcast_as((3, 4, 4)).unwrap()).unwrap();
            assert!(err < 0.02 && err > 0.0, "{parameterization}: {err}");
        }
    }
}
