//! The positive maps of the Cholesky diagonal (`softplus`, `exp`): values, slopes and
//! inverses on host scalars (for the fused CPU kernels and the inverse maps) and the value
//! as tensor ops (for the portable path).
//!
//! Softplus is evaluated as `max(r, 0) + log1p(e^{−|r|})`: exact to a few ulps for every
//! finite `r`, including very negative `r` where `softplus(r) ≈ e^r` and the naive
//! `log(1 + e^r)` rounds `1 + e^r` to 1 and loses every digit.

use candle_core::Tensor;

use crate::config::PositiveMap;
use crate::error::Result;

/// `map(r)` on a host scalar.
pub(crate) fn value(map: PositiveMap, r: f64) -> f64 {
    match map {
        PositiveMap::Softplus => r.max(0.0) + (-r.abs()).exp().ln_1p(),
        PositiveMap::Exp => r.exp(),
    }
}

/// `map'(r)` on a host scalar: the sigmoid for softplus, `e^r` for exp.
pub(crate) fn slope(map: PositiveMap, r: f64) -> f64 {
    match map {
        PositiveMap::Softplus => {
            // σ(r) without overflow of e^{−r} for very negative r.
            if r >= 0.0 {
                1.0 / (1.0 + (-r).exp())
            } else {
                let e = r.exp();
                e / (1.0 + e)
            }
        }
        PositiveMap::Exp => r.exp(),
    }
}

/// `map⁻¹(y)` for `y > 0`, on a host scalar.
pub(crate) fn inverse(map: PositiveMap, y: f64) -> f64 {
    match map {
        // softplus⁻¹(y) = log(e^y − 1) = y + log(1 − e^{−y}).
        PositiveMap::Softplus => y + (-(-y).exp_m1()).ln(),
        PositiveMap::Exp => y.ln(),
    }
}

/// `log1p(u)` for `u ≥ 0` in tensor ops (Candle has no `log1p`): with `w = 1 + u` rounded,
/// `log(w) · u / (w − 1)` is accurate to a few ulps (Goldberg's correction); where `w`
/// rounds to 1, `log1p(u) = u` to working precision. The denominator is made safe before the
/// division so that the unselected branch carries no infinity into the backward pass.
fn log1p_non_negative(u: &Tensor) -> Result<Tensor> {
    let w = (u + 1.0)?;
    let w_minus_one = (&w - 1.0)?;
    let rounds_to_one = w_minus_one.eq(0.0)?;
    let safe_denominator = rounds_to_one.where_cond(&w.ones_like()?, &w_minus_one)?;
    let corrected = ((w.log()? * u)? / safe_denominator)?;
    Ok(rounds_to_one.where_cond(u, &corrected)?)
}

/// `map(raw)` elementwise in tensor ops (every device, differentiable).
///
/// # Shapes
/// `raw`: any → the same
pub(crate) fn value_tensor(map: PositiveMap, raw: &Tensor) -> Result<Tensor> {
    match map {
        PositiveMap::Softplus => {
            let tail = log1p_non_negative(&raw.abs()?.neg()?.exp()?)?;
            Ok((raw.relu()? + tail)?)
        }
        PositiveMap::Exp => Ok(raw.exp()?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn softplus_tensor_is_exact_for_very_negative_raw_values() {
        // softplus(r) = log1p(e^r), exact on the host through `ln_1p`; the naive
        // log(1 + e^r) would give 0 in f32 for every one of these.
        let raws = [-80.0f64, -40.0, -20.0, -12.0];
        let raw = Tensor::new(&raws, &Device::Cpu).unwrap();
        // f64: a unit test on Device::Cpu (the tensors above are built there)
        for dtype in [DType::F32, DType::F64] {
            let got = value_tensor(PositiveMap::Softplus, &raw.to_dtype(dtype).unwrap())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let tolerance = if dtype == DType::F64 { 1e-13 } else { 1e-6 };
            for (g, r) in got.iter().zip(raws) {
                // The raw value as the dtype holds it.
                let r = if dtype == DType::F32 {
                    r as f32 as f64
                } else {
                    r
                };
                let expected = r.exp().ln_1p();
                assert!(
                    ((g - expected) / expected).abs() < tolerance,
                    "{dtype:?} r = {r}: {g} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn softplus_tensor_matches_the_host_value_and_its_gradient_is_the_slope() {
        let raws = [-800.0f64, -30.0, -3.0, -1e-3, 0.0, 0.7, 30.0, 800.0];
        let var = Var::new(&raws, &Device::Cpu).unwrap();
        let y = value_tensor(PositiveMap::Softplus, var.as_tensor()).unwrap();
        let grad = y.sum_all().unwrap().backward().unwrap();
        let grad = grad.get(var.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let y = y.to_vec1::<f64>().unwrap();
        for (k, &r) in raws.iter().enumerate() {
            let expected = value(PositiveMap::Softplus, r);
            let scale = expected.abs().max(f64::MIN_POSITIVE);
            assert!(((y[k] - expected) / scale).abs() < 1e-13, "value at {r}");
            let slope = slope(PositiveMap::Softplus, r);
            assert!(
                (grad[k] - slope).abs() <= 1e-13 * slope.max(1e-300),
                "slope at {r}: {} vs {slope}",
                grad[k]
            );
        }
    }

    #[test]
    fn inverse_undoes_the_value() {
        for map in [PositiveMap::Softplus, PositiveMap::Exp] {
            for r in [-30.0, -5.0, 0.0, 0.5, 7.0] {
                let back = inverse(map, value(map, r));
                assert!((back - r).abs() < 1e-9 * r.abs().max(1.0), "{map:?} {r}");
            }
        }
    }
}
