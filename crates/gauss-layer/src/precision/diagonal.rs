//! diag and sphere: `P = diag(e^θ)` (θ of shape (Z, d)) and `P = e^θ I` (θ of shape (Z)),
//! handled as (Z, d) diagonals: nothing here builds a (Z, d, d) tensor.

use candle_core::Tensor;

use super::{sum_exp_negated, Precision};
use crate::config::Parameterization;
use crate::cpu;
use crate::error::Result;
use crate::linalg::sum_accumulated;

/// `log p` of the base precision, (Z, d) (sphere broadcast over d).
fn log_diagonal(precision: &Precision) -> Result<Tensor> {
    let raw = precision.raw();
    Ok(match precision.parameterization() {
        Parameterization::Sphere => raw
            .unsqueeze(1)?
            .broadcast_as((precision.num_neurons(), precision.dim()))?
            .contiguous()?,
        _ => raw.clone(),
    })
}

/// The effective variances `1/p_eff = e^{−θ} + σ²`, (Z, d).
pub(super) fn effective_variance(precision: &Precision) -> Result<Tensor> {
    let variance = cpu::exp(
        &log_diagonal(precision)?.neg()?,
        precision.config().portable,
    )?;
    Ok(match precision.config().width_floor {
        Some(sigma) => (variance + sigma * sigma)?,
        None => variance,
    })
}

/// `tr Σ` per neuron, (Z): without a width floor `Σ_i e^{−θ_i}` in one op (sphere `d e^{−θ}`).
pub(super) fn trace_covariance(precision: &Precision) -> Result<Tensor> {
    let portable = precision.config().portable;
    let raw = precision.raw();
    match (precision.config().width_floor, precision.parameterization()) {
        (None, Parameterization::Sphere) => {
            Ok((cpu::exp(&raw.neg()?, portable)? * precision.dim() as f64)?)
        }
        (None, _) => sum_exp_negated(raw, portable),
        (Some(_), _) => sum_accumulated(&effective_variance(precision)?, 1),
    }
}

/// The effective diagonal precision `p_eff = e^θ / (1 + σ² e^θ)`, (Z, d).
pub(super) fn effective_diagonal(precision: &Precision) -> Result<Tensor> {
    match precision.config().width_floor {
        None => Ok(cpu::exp(
            &log_diagonal(precision)?,
            precision.config().portable,
        )?),
        Some(_) => Ok(effective_variance(precision)?.recip()?),
    }
}

/// `log det P_eff`, (Z): `Σ θ` (sphere `d θ`) without a width floor.
pub(super) fn log_det_precision(precision: &Precision) -> Result<Tensor> {
    let raw = precision.raw();
    match (precision.config().width_floor, precision.parameterization()) {
        (None, Parameterization::Sphere) => Ok((raw * precision.dim() as f64)?),
        (None, _) => sum_accumulated(raw, 1),
        (Some(_), _) => Ok(sum_accumulated(&effective_variance(precision)?.log()?, 1)?.neg()?),
    }
}
