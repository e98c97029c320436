//! cholesky, expm and direct: full (Z, d, d) precisions in tensor ops, with the width floor
//! of the module docs.

use candle_core::{Tensor, D};

use super::stats_op::{PrecisionStat, Stat};
use super::trace_estimate;
use super::{maps, Precision, RawMap};
use crate::config::Parameterization;
use crate::error::Result;
use crate::linalg;
use crate::linalg::{sum_accumulated, trace as trace_accumulated};
use crate::route::{backend, Backend};

/// The fused statistic op where it applies: a full precision without a width floor, f32 or
/// f64 on the CPU, not on the portable path.
fn fused_stat(precision: &Precision, stat: Stat) -> Result<Option<Tensor>> {
    match fused_raw_map(precision) {
        Some(map) => Ok(Some(
            precision.raw().apply_op1(PrecisionStat { stat, map })?,
        )),
        None => Ok(None),
    }
}

/// The raw map the fused CPU statistics read, where they run: a precision with a
/// [`Precision::raw_map`] on the [`Backend::CpuFused`] route.
fn fused_raw_map(precision: &Precision) -> Option<RawMap> {
    let raw = precision.raw();
    match backend(raw.device(), raw.dtype(), precision.config().portable) {
        Backend::CpuFused => precision.raw_map(),
        Backend::Cuda | Backend::Portable => None,
    }
}

/// An unbiased estimate of `tr Σ` per neuron from `probes` Rademacher vectors (see the
/// `trace_estimate` module) for cholesky without a width floor; the exact value otherwise.
pub(super) fn trace_covariance_estimate(precision: &Precision, probes: usize) -> Result<Tensor> {
    if !precision.is_factor_lower_triangular() {
        return trace_covariance(precision);
    }
    let raw = precision.raw();
    let (z, d) = (precision.num_neurons(), precision.dim());
    let vectors = trace_estimate::rademacher_probes(z, d, probes, raw)?;
    if let Some(RawMap::Cholesky {
        positive_map,
        floor,
    }) = fused_raw_map(precision)
    {
        let op = trace_estimate::TraceCovarianceEstimate {
            positive_map,
            floor,
        };
        return Ok(raw.apply_op2(&vectors, op)?);
    }
    trace_estimate::estimate_in_tensor_ops(
        &cholesky_factor(precision)?,
        &vectors,
        precision.config().portable,
    )
}

/// The base Cholesky factor `L` (no width floor) of a cholesky precision:
/// `tril(raw, −1) + diag(map(diag raw) + floor)`.
///
/// # Shapes
/// `raw`: (Z, d, d) → (Z, d, d)
pub(crate) fn cholesky_factor(precision: &Precision) -> Result<Tensor> {
    let config = precision.config();
    let raw = precision.raw();
    let diag = (maps::value_tensor(config.positive_map, &linalg::diagonal(raw)?)?
        + config.factor_diag_floor)?;
    Ok((linalg::strict_tril(raw)? + linalg::diag_embed(&diag)?)?)
}

/// The base factor `F` with `P_base = F Fᵀ` (no width floor), `None` for direct.
fn base_factor(precision: &Precision) -> Result<Option<Tensor>> {
    match precision.parameterization() {
        Parameterization::Cholesky => Ok(Some(cholesky_factor(precision)?)),
        Parameterization::Expm => Ok(Some(linalg::expm_symmetric(
            &(linalg::symmetrize(precision.raw())? * 0.5)?,
        )?)),
        _ => Ok(None),
    }
}

/// Cholesky factor of `M = I + σ² FᵀF` (or `I + σ² P` for direct).
fn floor_cholesky(precision: &Precision, sigma: f64, gram_like: &Tensor) -> Result<Tensor> {
    let eye = linalg::eye_like(precision.dim(), gram_like)?;
    let m = (gram_like * (sigma * sigma))?.broadcast_add(&eye)?;
    linalg::cholesky_routed(&m, precision.config().portable)
}

/// The effective factor (see [`Precision::factor`]).
pub(super) fn factor(precision: &Precision) -> Result<Option<Tensor>> {
    let Some(base) = base_factor(precision)? else {
        return Ok(None);
    };
    match precision.config().width_floor {
        None => Ok(Some(base)),
        Some(sigma) => {
            let gram_t = linalg::matmul(&linalg::transpose(&base)?, &base)?;
            let k = floor_cholesky(precision, sigma, &gram_t)?;
            let k_inv = linalg::tril_inverse_routed(&k, precision.config().portable)?;
            Ok(Some(linalg::matmul(&base, &linalg::transpose(&k_inv)?)?))
        }
    }
}

/// The effective precision matrices.
pub(super) fn precision_matrix(precision: &Precision) -> Result<Tensor> {
    let raw = precision.raw();
    match (precision.parameterization(), precision.config().width_floor) {
        (Parameterization::Direct, None) => linalg::symmetrize(raw),
        (Parameterization::Direct, Some(sigma)) => {
            let p = linalg::symmetrize(raw)?;
            let k = floor_cholesky(precision, sigma, &p)?;
            let pk = linalg::matmul(
                &p,
                &linalg::transpose(&linalg::tril_inverse_routed(
                    &k,
                    precision.config().portable,
                )?)?,
            )?;
            Ok((p - (linalg::gram(&pk)? * (sigma * sigma))?)?)
        }
        (Parameterization::Expm, None) => linalg::expm_symmetric(&linalg::symmetrize(raw)?),
        _ => match factor(precision)? {
            Some(f) => linalg::gram(&f),
            None => linalg::symmetrize(raw),
        },
    }
}

/// The lower Cholesky factor of the base precision: cholesky's own `L`, or a factorization
/// of direct's `(A + Aᵀ)/2` (NaN where it is not positive definite).
fn base_lower(precision: &Precision) -> Result<Tensor> {
    match precision.parameterization() {
        Parameterization::Direct => linalg::cholesky_routed(
            &linalg::symmetrize(precision.raw())?,
            precision.config().portable,
        ),
        _ => cholesky_factor(precision),
    }
}

/// The effective covariance matrices, through triangular inverses (expm: `expm(−A)`).
pub(super) fn covariance_matrix(precision: &Precision) -> Result<Tensor> {
    let base = match precision.parameterization() {
        Parameterization::Expm => {
            linalg::expm_symmetric(&linalg::symmetrize(precision.raw())?.neg()?)?
        }
        _ => {
            let inverse =
                linalg::tril_inverse_routed(&base_lower(precision)?, precision.config().portable)?;
            linalg::matmul(&linalg::transpose(&inverse)?, &inverse)?
        }
    };
    match precision.config().width_floor {
        None => Ok(base),
        Some(sigma) => {
            let eye = (linalg::eye_like(precision.dim(), &base)? * (sigma * sigma))?;
            Ok(base.broadcast_add(&eye)?)
        }
    }
}

fn two_sum_log_diagonal(lower: &Tensor) -> Result<Tensor> {
    Ok((sum_accumulated(&linalg::diagonal(lower)?.log()?, D::Minus1)? * 2.0)?)
}

/// `log det P_eff` per neuron.
pub(super) fn log_det_precision(precision: &Precision) -> Result<Tensor> {
    if let Some(value) = fused_stat(precision, Stat::LogDetPrecision)? {
        return Ok(value);
    }
    let base = match precision.parameterization() {
        Parameterization::Expm => trace_accumulated(precision.raw())?,
        _ => two_sum_log_diagonal(&base_lower(precision)?)?,
    };
    let Some(sigma) = precision.config().width_floor else {
        return Ok(base);
    };
    let gram_like = match base_factor(precision)? {
        Some(f) => linalg::matmul(&linalg::transpose(&f)?, &f)?,
        None => linalg::symmetrize(precision.raw())?,
    };
    let k = floor_cholesky(precision, sigma, &gram_like)?;
    Ok((base - two_sum_log_diagonal(&k)?)?)
}

/// `tr S_eff` per neuron.
pub(super) fn trace_covariance(precision: &Precision) -> Result<Tensor> {
    if let Some(value) = fused_stat(precision, Stat::TraceCovariance)? {
        return Ok(value);
    }
    let base = match precision.parameterization() {
        Parameterization::Expm => {
            linalg::trace_expm_symmetric(&linalg::symmetrize(precision.raw())?.neg()?)?
        }
        _ => sum_accumulated(
            &linalg::tril_inverse_routed(&base_lower(precision)?, precision.config().portable)?
                .sqr()?,
            (1, 2),
        )?,
    };
    match precision.config().width_floor {
        None => Ok(base),
        Some(sigma) => Ok((base + precision.dim() as f64 * sigma * sigma)?),
    }
}

/// `tr P_eff` per neuron.
pub(super) fn trace_precision(precision: &Precision) -> Result<Tensor> {
    if let Some(value) = fused_stat(precision, Stat::TracePrecision)? {
        return Ok(value);
    }
    match (precision.parameterization(), precision.config().width_floor) {
        (Parameterization::Direct, None) => trace_accumulated(precision.raw()),
        (Parameterization::Cholesky, None) => {
            sum_accumulated(&cholesky_factor(precision)?.sqr()?, (1, 2))
        }
        _ => trace_accumulated(&precision_matrix(precision)?),
    }
}
