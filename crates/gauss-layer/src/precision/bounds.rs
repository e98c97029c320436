//! The raw values a [`Precision`] accepts: finite, and small enough that `P` and the
//! products the layer forms with it stay finite in the raw tensor's dtype (`docs/design.md` §5: a PD,
//! *finite* `P` for every accepted raw value). With `M` the dtype's largest finite value:
//!
//! | raw entry | accepted | why |
//! |---|---|---|
//! | log-scale: diag and sphere `θ`, lowrank's `θ` column, the cholesky diagonal under the `exp` map, every expm entry | `abs(v) ≤ ½ ln M` (f32 44.36, f64 354.9, f16 5.545) | `e^v ≤ √M`, so `P` is finite and `P·δ²` stays finite for `abs(δ) ≤ M^{1/4}`; `e^{−v}` (the covariance) likewise |
//! | expm: each row of `(A + Aᵀ)/2` | absolute sum `≤ ½ ln M` | bounds its eigenvalues `λ` (Gershgorin), so `e^{±λ} ≤ √M` |
//! | factor: cholesky's lower triangle (the diagonal under `softplus` too), lowrank's `U` | `abs(v) ≤ M^{1/4}` (f32 4.3e9, f64 1.2e77) | the products `v·v` of `L Lᵀ` and `U Uᵀ` stay below `√M` |
//! | the cholesky diagonal under `softplus` with a `factor_diag_floor` below `1/√M` (0) | also `v ≥ −½ ln M` | `softplus(v) ≥ e^v/2` stays a normal number: `L` invertible, `log det P` and the covariance finite (below, `softplus` underflows to 0) |
//! | direct `A` | `abs(v) ≤ √M` (f32 1.8e19) | `P = (A + Aᵀ)/2` is finite |
//!
//! Everything else (NaN, ±∞, a finite value beyond its bound) is refused when the precision
//! is built ([`Precision::from_raw`], so also when a checkpoint is loaded or a network
//! imported), naming the tensor and the element: the alternative, an infinite `P`, gives NaN
//! outputs and gradients. The check is two reductions on the raw tensor's device; the host
//! sees the tensor only when some entry exceeds the smallest bound.

use candle_core::{DType, Device, Tensor};

use super::Precision;
use crate::config::{Parameterization, PositiveMap, PrecisionConfig};
use crate::error::{GaussError, Result};

/// The bound of log-scale entries, `½ ln M`.
pub(crate) fn log_bound(dtype: DType) -> f64 {
    0.5 * crate::linalg::max_finite(dtype).ln()
}

/// The bound of factor entries, `M^{1/4}`.
pub(crate) fn factor_bound(dtype: DType) -> f64 {
    crate::linalg::max_finite(dtype).sqrt().sqrt()
}

/// The bound of direct entries, `√M`.
fn direct_bound(dtype: DType) -> f64 {
    crate::linalg::max_finite(dtype).sqrt()
}

/// The accepted interval `[low, high]` of the element at multi-index `index` (`None`:
/// unbounded, only finite), and which kind of entry it is.
fn bound_at(
    config: &PrecisionConfig,
    dtype: DType,
    index: &[usize],
) -> (Option<(f64, f64)>, &'static str) {
    let symmetric = |b: f64| Some((-b, b));
    match (config.parameterization, index) {
        (Parameterization::Diag | Parameterization::Sphere, _) => {
            (symmetric(log_bound(dtype)), "log-precision")
        }
        (Parameterization::Expm, _) => (symmetric(log_bound(dtype)), "matrix-log entry"),
        (Parameterization::Direct, _) => (symmetric(direct_bound(dtype)), "precision entry"),
        (Parameterization::LowRank { .. }, [_, _, 0]) => {
            (symmetric(log_bound(dtype)), "log-diagonal")
        }
        (Parameterization::LowRank { .. }, _) => (symmetric(factor_bound(dtype)), "U entry"),
        (Parameterization::Cholesky, [_, i, j]) if i == j => match config.positive_map {
            PositiveMap::Exp => (symmetric(log_bound(dtype)), "log-diagonal (exp map)"),
            // Without a floor that keeps L_ii normal, softplus(v) ≈ e^v must: v ≥ −½ ln M.
            PositiveMap::Softplus if config.factor_diag_floor < direct_bound(dtype).recip() => (
                Some((-log_bound(dtype), factor_bound(dtype))),
                "factor diagonal (softplus, no floor)",
            ),
            PositiveMap::Softplus => (symmetric(factor_bound(dtype)), "factor diagonal"),
        },
        (Parameterization::Cholesky, [_, i, j]) if i > j => {
            (symmetric(factor_bound(dtype)), "factor entry")
        }
        // Above the diagonal: ignored by the map, only required finite.
        _ => (None, "ignored entry"),
    }
}

/// Checks every raw value of `raw` for `config` (see the module docs).
///
/// # Errors
/// [`GaussError::Numerical`] naming the tensor, the element's index, its value and the
/// accepted range (for expm, the neuron and row whose absolute sum is too large).
pub(super) fn check_raw_values(raw: &Tensor, config: &PrecisionConfig) -> Result<()> {
    check_entries(raw, config)?;
    if config.parameterization == Parameterization::Expm {
        check_expm_spectrum(raw, config)?;
    }
    Ok(())
}

/// expm's eigenvalues: `P = expm(S)`, `S = (A + Aᵀ)/2`, has eigenvalues `e^λ` for those `λ` of
/// `S`, which entries within `½ ln M` do not bound (d entries of 44 give λ = 44·d in f32).
/// Gershgorin's bound `|λ| ≤ max_i Σ_j |S_ij|` does: every row's absolute sum within `½ ln M`
/// keeps `e^{±λ} ≤ √M`, so `P` and the covariance `e^{−S}` stay finite and invertible. One
/// reduction on the device and one scalar read; the host sees the tensor only on a failure.
fn check_expm_spectrum(raw: &Tensor, config: &PrecisionConfig) -> Result<()> {
    let bound = log_bound(raw.dtype());
    // Summed in f32 for f16 and bf16, whose running sums lose digits over d terms (a sum
    // that comes out short accepts a matrix beyond the bound).
    let row_sums =
        crate::linalg::sum_accumulated(&((raw + raw.transpose(1, 2)?)? * 0.5)?.abs()?, 2)?; // (Z, d)
    let largest = row_sums
        .max_all()?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if largest <= bound {
        return Ok(());
    }
    let sums = row_sums
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let (neuron, row, sum) = sums
        .iter()
        .enumerate()
        .flat_map(|(z, rows)| rows.iter().enumerate().map(move |(i, &s)| (z, i, s)))
        .find(|&(_, _, s)| s > bound)
        .unwrap_or((0, 0, largest));
    Err(GaussError::Numerical {
        what: format!(
            "precision tensor `{}` ({})",
            Precision::tensor_name(config.parameterization),
            config.parameterization
        ),
        reason: format!(
            "row {row} of neuron {neuron} of (A + Aᵀ)/2 has absolute sum {sum:e}; expected at most {bound:.6e} (½ ln of the largest {:?}), which bounds the eigenvalues λ of (A + Aᵀ)/2 so that P = expm keeps e^(±λ) finite",
            raw.dtype()
        ),
    })
}

/// Every entry within its interval (see [`bound_at`]).
fn check_entries(raw: &Tensor, config: &PrecisionConfig) -> Result<()> {
    let dtype = raw.dtype();
    let scalar = |t: Tensor| -> Result<f64> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    };
    // NaN or ±∞ anywhere makes 0·v NaN, and a sum propagates NaN (a max may skip it).
    let non_finite = scalar((raw * 0.0)?.sum_all()?)?.is_nan();
    let largest = scalar(raw.abs()?.max_all()?)?;
    let smallest_bound = log_bound(dtype).min(factor_bound(dtype));
    if !non_finite && largest <= smallest_bound {
        return Ok(());
    }
    let dims = raw.dims().to_vec();
    let values = raw
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mut index = vec![0usize; dims.len()];
    for (flat, &v) in values.iter().enumerate() {
        let mut rest = flat;
        for (k, &d) in dims.iter().enumerate().rev() {
            index[k] = rest % d.max(1);
            rest /= d.max(1);
        }
        let (bound, kind) = bound_at(config, dtype, &index);
        let outside = !v.is_finite() || bound.is_some_and(|(low, high)| v < low || v > high);
        if outside {
            let name = Precision::tensor_name(config.parameterization);
            let range = match bound {
                Some((low, high)) => format!("finite values in [{low:.6e}, {high:.6e}] (the range in which P, the covariance and the products P·δ² the layer forms stay finite in {dtype:?})"),
                None => "finite values".to_string(),
            };
            return Err(GaussError::Numerical {
                what: format!("precision tensor `{name}` ({})", config.parameterization),
                reason: format!("{kind} at index {index:?} is {v:e}; expected {range}"),
            });
        }
    }
    Ok(())
}
