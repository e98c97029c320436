//! The inverse maps: precision matrices → the raw tensor that represents them, on the host
//! in f64 (faer eigendecompositions and Cholesky factorizations, one d×d block at a time).

use candle_core::{DType, Tensor};

use super::{maps, LowRankFit, Precision};
use crate::config::{Parameterization, PrecisionConfig};
use crate::error::{GaussError, Result};
use crate::linalg::host;

/// `x > 0`, false for NaN.
fn is_positive(x: f64) -> bool {
    x > 0.0
}

impl Precision {
    /// Builds the raw tensor that represents the given precision matrices exactly (inverse
    /// of the parameterization's map): used by importers, conversions and tests.
    ///
    /// `P` is the *effective* precision: with a width floor σ, the stored base is
    /// `(P⁻¹ − σ² I)⁻¹`, which must be positive definite (P no wider than σ allows).
    /// Runs once on the host in f64 (faer eigendecompositions for expm and the width
    /// floor): the matrices are copied to the CPU, and the raw tensor comes back on
    /// `precision`'s device and dtype.
    ///
    /// # Shapes
    /// `precision`: (Z, d, d)
    ///
    /// # Errors
    /// A matrix that is not representable: not positive definite
    /// ([`GaussError::NotPositiveDefinite`]; direct stores any matrix, as its raw tensor
    /// does, and is checked where it is used: [`crate::repair`]), not diagonal for diag, not a multiple of the
    /// identity for sphere, a Cholesky diagonal at or below `factor_diag_floor`, or narrower
    /// than the width floor allows (the message names the neuron and the floor); a lowrank
    /// rank above d ([`GaussError::InvalidConfig`], as [`crate::gauss_layer`] refuses it).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use gauss_layer::{GaussLayerConfig, Precision};
    /// // P = [[4, 2], [2, 3]] as a Cholesky parameterization: P = L Lᵀ exactly.
    /// let p = Tensor::new(&[[[4.0f64, 2.0], [2.0, 3.0]]], &Device::Cpu)?;
    /// let precision = Precision::from_precision_matrix(&p, &GaussLayerConfig::default())?;
    /// let back = precision.precision_matrix()?.to_vec3::<f64>()?;
    /// assert!((back[0][0][1] - 2.0).abs() < 1e-12 && (back[0][1][1] - 3.0).abs() < 1e-12);
    /// # Ok::<(), gauss_layer::GaussError>(())
    /// ```
    pub fn from_precision_matrix(
        precision: &Tensor,
        config: impl Into<PrecisionConfig>,
    ) -> Result<Self> {
        let tolerance = if precision.dtype() == DType::F64 {
            1e-9
        } else {
            1e-5
        };
        Self::from_precision_matrix_within(precision, config, tolerance)
    }

    /// [`Precision::from_precision_matrix`] accepting a relative misfit up to `tolerance`
    /// where the parameterization cannot hold `P` exactly (`f64::INFINITY`: the nearest
    /// representable precision, e.g. lowrank's δ·I plus its r largest eigenpairs).
    pub(crate) fn from_precision_matrix_within(
        precision: &Tensor,
        config: impl Into<PrecisionConfig>,
        tolerance: f64,
    ) -> Result<Self> {
        let config: PrecisionConfig = config.into();
        config.validate()?;
        let (z, d, values) = host::to_host_matrices(precision, "precision matrix")?;
        if z == 0 || d == 0 {
            return Err(GaussError::shape(
                "precision matrix",
                "(Z, d, d) with Z, d >= 1",
                precision.dims(),
            ));
        }
        // lowrank's U has at most d columns, as a layer's (`gauss_layer` refuses more): a
        // larger rank only adds zero columns, and `d * (rank + 1)` below overflowed (a panic)
        // or asked for more memory than exists (an abort) for ranks near `usize::MAX`.
        crate::config::GaussLayerConfig {
            precision: config,
            ..Default::default()
        }
        .check_rank(d)?;
        // Every map below but the eigensolvers' skips NaN (`f64::max` drops it), so diag and
        // sphere would silently drop a NaN off-diagonal entry: refuse non-finite input here.
        if let Some(k) = values.iter().position(|v| !v.is_finite()) {
            let (neuron, i, j) = (k / (d * d), k % (d * d) / d, k % d);
            return Err(GaussError::Numerical {
                what: "precision matrix".to_string(),
                reason: format!(
                    "neuron {neuron} holds a non-finite entry ({} at ({i}, {j})); a precision matrix must be finite",
                    values[k]
                ),
            });
        }
        let (dtype, device) = (precision.dtype(), precision.device());
        let mut raw = Vec::with_capacity(z * d * d);
        for neuron in 0..z {
            let block = &values[neuron * d * d..(neuron + 1) * d * d];
            let base = base_precision_block(block, d, config.width_floor, neuron)?;
            raw.extend(raw_from_precision_block(
                &base, d, config, neuron, tolerance,
            )?);
        }
        let shape = Self::raw_shape(config.parameterization, z, d);
        let raw = host::from_host(raw, &shape, dtype, device)?;
        Self::from_raw(raw, d, config)
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
    let (eigenvalues, vectors) = host::symmetric_eigen(&host::symmetric_block(block, d), neuron)?;
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
    Ok(host::from_eigen(&eigenvalues, &vectors, |l| {
        l / (1.0 - s2 * l)
    }))
}

/// The raw values of one neuron for its base precision block, on the host in f64.
pub(super) fn raw_from_precision_block(
    block: &[f64],
    d: usize,
    config: impl Into<PrecisionConfig>,
    neuron: usize,
    tolerance: f64,
) -> Result<Vec<f64>> {
    let config: PrecisionConfig = config.into();
    let not_pd = |block: &[f64]| -> GaussError {
        let min_eigenvalue = host::symmetric_eigen(&host::symmetric_block(block, d), neuron)
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
        Parameterization::LowRank { rank } => low_rank_block(block, d, rank, neuron, tolerance),
        Parameterization::Direct => Ok(block.to_vec()),
        Parameterization::Cholesky => {
            let mut raw = host::cholesky_lower(block, d).ok_or_else(|| not_pd(block))?;
            for i in 0..d {
                let diagonal = raw[i * d + i];
                let above_floor = diagonal - config.factor_diag_floor;
                if !is_positive(above_floor) {
                    return Err(GaussError::config(
                        "factor_diag_floor",
                        format!(
                            "neuron {neuron}: P needs a Cholesky diagonal entry L_{i}{i} = {diagonal:e}, but the cholesky parameterization keeps every L_ii above factor_diag_floor = {:e} (so P's smallest eigenvalues must stay above about floor² = {:e}); lower factor_diag_floor (0 is allowed) or rescale the data",
                            config.factor_diag_floor,
                            config.factor_diag_floor * config.factor_diag_floor
                        ),
                    ));
                }
                raw[i * d + i] = maps::inverse(config.positive_map, above_floor);
            }
            Ok(raw)
        }
        Parameterization::Expm => {
            let (eigenvalues, vectors) =
                host::symmetric_eigen(&host::symmetric_block(block, d), neuron)?;
            if !is_positive(eigenvalues[0]) {
                return Err(not_pd(block));
            }
            Ok(host::from_eigen(&eigenvalues, &vectors, f64::ln))
        }
        Parameterization::Diag | Parameterization::Sphere => {
            if off_diagonal_max > tolerance * scale {
                return Err(GaussError::config(
                    "parameterization",
                    format!(
                        "neuron {neuron}: P has off-diagonal entries up to {off_diagonal_max:.3e}, so `{}` cannot represent it",
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

/// lowrank's raw block (d, r + 1) for `P = δ I + Q_r (Λ_r − δ) Q_rᵀ`: the r largest
/// eigenpairs over an isotropic rest δ (the probabilistic-PCA form). Exact when `r ≥ d`
/// (δ is half the smallest eigenvalue) or when P's `d − r` smallest eigenvalues are equal
/// (within `tolerance`). Otherwise `P = diag(e^θ) + U Uᵀ` is recovered when it has that form
/// (within `tolerance`, see [`diagonal_plus_low_rank`]); any other `P` is an error naming
/// the spread.
fn low_rank_block(
    block: &[f64],
    d: usize,
    rank: usize,
    neuron: usize,
    tolerance: f64,
) -> Result<Vec<f64>> {
    let (eigenvalues, vectors) = host::symmetric_eigen(&host::symmetric_block(block, d), neuron)?;
    if !is_positive(eigenvalues[0]) {
        return Err(GaussError::NotPositiveDefinite {
            neuron,
            min_eigenvalue: eigenvalues[0],
        });
    }
    let rest = d.saturating_sub(rank);
    let delta = if rest == 0 {
        eigenvalues[0] / 2.0
    } else {
        let tail = &eigenvalues[..rest];
        let mean = tail.iter().sum::<f64>() / rest as f64;
        let spread = tail.iter().fold(0f64, |m, l| m.max((l - mean).abs()));
        let largest = eigenvalues[d - 1];
        if spread > tolerance * largest {
            if let Some(raw) = diagonal_plus_low_rank(block, d, rank, neuron, tolerance)? {
                return Ok(raw);
            }
            return Err(GaussError::config(
                "parameterization",
                format!(
                    "neuron {neuron}: lowrank:{rank} holds P = diag(e^θ) + U Uᵀ with U of rank {rank}, but this P is not of that form within {tolerance:e} (nor δ·I plus rank {rank}: its {rest} smallest eigenvalues spread over [{:e}, {:e}]); use a rank of at least {d} for an exact copy",
                    tail[0],
                    tail[rest - 1]
                ),
            ));
        }
        mean
    };
    let mut raw = vec![0f64; d * (rank + 1)];
    for i in 0..d {
        raw[i * (rank + 1)] = delta.ln();
    }
    // The top eigenpairs fill U's columns.
    for (column, k) in (rest..d).rev().enumerate() {
        let scale = (eigenvalues[k] - delta).max(0.0).sqrt();
        for i in 0..d {
            raw[i * (rank + 1) + 1 + column] = vectors[(i, k)] * scale;
        }
    }
    Ok(raw)
}

/// `P = diag(e^θ) + U Uᵀ` recovered exactly (max entry misfit within `tolerance` of P's
/// largest entry), or `None` when P is not of that form: the maximum-likelihood lowrank
/// precision for the covariance `P⁻¹` is P itself when P is in the family (the unconstrained
/// maximizer), so the profile ascent of [`LowRankFit`] from the diagonal start converges
/// to it.
fn diagonal_plus_low_rank(
    block: &[f64],
    d: usize,
    rank: usize,
    neuron: usize,
    tolerance: f64,
) -> Result<Option<Vec<f64>>> {
    let Some(covariance) = host::spd_inverse(&host::symmetric_block(block, d)) else {
        return Ok(None);
    };
    let s: Vec<f64> = (0..d * d).map(|ij| covariance[(ij / d, ij % d)]).collect();
    let theta: Vec<f64> = (0..d).map(|i| -s[i * d + i].ln()).collect();
    let mut fit = LowRankFit::from_theta(&theta, rank);
    fit.ascend(&s, 1e-14, 5000, neuron)?;
    let scale = block.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let misfit = fit
        .precision()
        .iter()
        .zip(block)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    Ok((misfit <= tolerance * scale).then(|| fit.raw()))
}
