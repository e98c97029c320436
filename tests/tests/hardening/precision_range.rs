//! The raw-value policy of issue 17, item 8 (docs/design.md §5): a raw precision value that
//! is NaN, ±∞ or beyond the range where `P` stays finite in its dtype is refused when the
//! precision is built (naming the element); every value inside the range gives a finite `P`,
//! finite outputs and finite gradients. On every parameterization, in f32 and f64.

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, Var};
use gauss_layer::{checkpoint, GaussError, GaussLayer, GaussLayerConfig, PrecisionConfig};
use gauss_layer::{Parameterization, PositiveMap, Precision};
use gauss_tests::{new_net, small_diag_net_config, temp_dir};

const D: usize = 3;
const Z: usize = 2;

/// The bounds of the policy, from the dtype's largest finite value `M`: `½ ln M` for
/// log-scale entries, `M^{1/4}` for factor entries, `√M` for direct entries.
fn bounds(dtype: DType) -> (f64, f64, f64) {
    let max = if dtype == DType::F32 {
        f32::MAX as f64
    } else {
        f64::MAX
    };
    (0.5 * max.ln(), max.powf(0.25), max.sqrt())
}

/// Every layer kind, with the index of one diagonal (log-scale or factor) element and the
/// bound that applies to it, and the index and bound of an off-diagonal factor element.
/// A raw element's index and the bound that applies to it.
type Entry = (Vec<usize>, f64);

fn cases(dtype: DType) -> Vec<(GaussLayerConfig, Vec<usize>, f64, Option<Entry>)> {
    let (log, factor, direct) = bounds(dtype);
    let config = |parameterization, positive_map| GaussLayerConfig {
        precision: PrecisionConfig {
            parameterization,
            positive_map,
            ..Default::default()
        },
        ..Default::default()
    };
    use Parameterization as P;
    vec![
        (
            config(P::Cholesky, PositiveMap::Softplus),
            vec![1, 2, 2],
            factor,
            Some((vec![1, 2, 0], factor)),
        ),
        (
            config(P::Cholesky, PositiveMap::Exp),
            vec![1, 2, 2],
            log,
            Some((vec![1, 2, 0], factor)),
        ),
        (
            config(P::Direct, PositiveMap::Softplus),
            vec![1, 2, 2],
            direct,
            None,
        ),
        (
            config(P::Expm, PositiveMap::Softplus),
            vec![1, 2, 2],
            log,
            None,
        ),
        (
            config(P::Diag, PositiveMap::Softplus),
            vec![1, 2],
            log,
            None,
        ),
        (config(P::Sphere, PositiveMap::Softplus), vec![1], log, None),
        (
            config(P::LowRank { rank: 2 }, PositiveMap::Softplus),
            vec![1, 2, 0],
            log,
            Some((vec![1, 2, 1], factor)),
        ),
    ]
}

/// A valid raw tensor (an identity-like precision) with `value` at `index`.
fn raw_with(
    config: &GaussLayerConfig,
    dtype: DType,
    index: &[usize],
    value: f64,
) -> Result<Tensor> {
    let shape = Precision::raw_shape(config.precision.parameterization, Z, D);
    let n: usize = shape.iter().product();
    let mut values = vec![0.0f64; n];
    // direct: the identity (PD), so the layer's output is meaningful.
    if config.precision.parameterization == Parameterization::Direct {
        for z in 0..Z {
            for i in 0..D {
                values[z * D * D + i * D + i] = 1.0;
            }
        }
    }
    let flat = index
        .iter()
        .zip(&shape)
        .fold(0, |acc, (&i, &s)| acc * s + i);
    values[flat] = value;
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Outputs and gradients (with respect to the raw tensor and the input) of a layer built on
/// `raw`, at the centers and one unit away, all finite.
fn assert_finite_layer(config: &GaussLayerConfig, raw: Tensor, what: &str) -> Result<()> {
    let dtype = raw.dtype();
    let var = Var::from_tensor(&raw)?;
    let precision = Precision::from_raw(var.as_tensor().clone(), D, config)?;
    let p = precision
        .precision_matrix()?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?;
    let p_max = p.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(p_max.is_finite(), "{what}: P is not finite ({p_max})");
    let weight = Tensor::ones((Z, D), dtype, &Device::Cpu)?;
    let bias = Tensor::zeros(Z, dtype, &Device::Cpu)?;
    let center = Tensor::zeros((Z, D), dtype, &Device::Cpu)?;
    let layer = GaussLayer::new(Some(weight), Some(bias), center, precision, config.clone())?;
    let x = Var::from_tensor(
        &Tensor::new(&[[0.0f64; D], [1.0; D], [0.5, -0.25, 2.0]], &Device::Cpu)?.to_dtype(dtype)?,
    )?;
    let y = layer.forward(x.as_tensor())?;
    let values = y
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    assert!(
        values.iter().all(|v| v.is_finite()),
        "{what}: outputs {values:?}"
    );
    let grads = y.sum_all()?.backward()?;
    for (name, v) in [("raw", &var), ("x", &x)] {
        if let Some(g) = grads.get(v) {
            let g = g
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            assert!(
                g.iter().all(|v| v.is_finite()),
                "{what}: gradient of {name} {g:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn raw_values_outside_the_finite_range_are_refused_on_every_parameterization() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for (config, index, bound, off_diagonal) in cases(dtype) {
            let mut entries = vec![(index, bound)];
            entries.extend(off_diagonal);
            for (index, bound) in entries {
                let what = format!(
                    "{} {:?} {dtype:?} at {index:?}",
                    config.precision.parameterization, config.precision.positive_map
                );
                for bad in [bound * 1.01, -bound * 1.01, f64::NAN, f64::INFINITY, 1e38] {
                    // 1e38 is inside the direct range of f64 only.
                    if bad.abs() <= bound {
                        continue;
                    }
                    let raw = raw_with(&config, dtype, &index, bad)?;
                    match Precision::from_raw(raw, D, &config) {
                        Err(GaussError::Numerical {
                            what: tensor,
                            reason,
                        }) => {
                            let name = Precision::tensor_name(config.precision.parameterization);
                            assert!(tensor.contains(name), "{what}: {tensor}");
                            assert!(reason.contains(&format!("{index:?}")), "{what}: {reason}");
                        }
                        other => {
                            panic!("{what} = {bad}: expected a numerical error, got {other:?}")
                        }
                    }
                }
                // Just inside the range, both signs: finite P, outputs and gradients.
                for good in [bound * 0.99, -bound * 0.99] {
                    // A negative direct diagonal is not PD (direct is checked and repaired).
                    if config.precision.parameterization == Parameterization::Direct && good < 0.0 {
                        continue;
                    }
                    let raw = raw_with(&config, dtype, &index, good)?;
                    assert_finite_layer(&config, raw, &format!("{what} = {good:e}"))?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn precision_matrices_with_nan_are_refused() -> Result<()> {
    let config = GaussLayerConfig::with_parameterization(Parameterization::Direct);
    let p = Tensor::new(&[[[1.0f64, f64::NAN], [f64::NAN, 1.0]]], &Device::Cpu)?;
    assert!(Precision::from_precision_matrix(&p, &config).is_err());
    Ok(())
}

#[test]
fn a_checkpoint_with_an_extreme_finite_log_precision_is_refused_at_load() -> Result<()> {
    // The reproduction of the issue: `precision_log_diag` holding 1e38 loaded and gave NaN.
    let dir = temp_dir("hard-extreme")?;
    let (net, mut varmap) = new_net(small_diag_net_config(), DType::F32)?;
    let name = "layers.0.precision_log_diag";
    let mut values = varmap.data().lock().unwrap()[name]
        .as_tensor()
        .flatten_all()?
        .to_vec1::<f32>()?;
    values[5] = 1e38;
    varmap.set_one(name, Tensor::from_vec(values, (4, 3), &Device::Cpu)?)?;
    let path = dir.join("extreme.safetensors");
    // Saving does not check values (the tensor in the network is edited behind its back).
    checkpoint::save(&net, &path)?;
    let e = checkpoint::load(&path, &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layers.0") && e.contains("precision_log_diag") && e.contains("[1, 2]"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_softplus_diagonal_without_a_floor_is_bounded_below() -> Result<()> {
    // With `factor_diag_floor = 0` the diagonal is `softplus(v) ≈ e^v`, which underflows to 0
    // (a singular P: log_prob −∞, NaN gradients) below about ln of the smallest float; the
    // policy bounds it below by −½ ln M, where `softplus(v) ≥ e^v/2 ≥ 1/(2√M)` stays normal.
    // Above, the factor bound still applies.
    for dtype in [DType::F32, DType::F64] {
        let (log, factor, _) = bounds(dtype);
        let config = GaussLayerConfig {
            precision: PrecisionConfig {
                factor_diag_floor: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let index = [1, 2, 2];
        // -800: the value that gave L_ii = 0 in f64 before the bound.
        for bad in [-log * 1.01, -800.0, factor * 1.01] {
            let raw = raw_with(&config, dtype, &index, bad)?;
            match Precision::from_raw(raw, D, &config) {
                Err(GaussError::Numerical { reason, .. }) => {
                    assert!(reason.contains("[1, 2, 2]"), "{dtype:?} {bad}: {reason}")
                }
                other => panic!("{dtype:?} {bad}: expected a numerical error, got {other:?}"),
            }
        }
        for good in [-log * 0.99, factor * 0.99] {
            let raw = raw_with(&config, dtype, &index, good)?;
            assert_finite_layer(&config, raw, &format!("{dtype:?} floor 0, {good:e}"))?;
        }
    }
    Ok(())
}

#[test]
fn expm_is_bounded_by_its_eigenvalues_not_only_its_entries() -> Result<()> {
    // Every entry 0.9·½ ln M (40 in f32) is within the entry bound, but (A + Aᵀ)/2 then has
    // the eigenvalue 3·40 = 120 and P = expm overflows (negative: e^−120 makes P singular).
    // Rows of absolute sum above ½ ln M are refused (Gershgorin bounds the eigenvalues by
    // them), naming the row.
    let config = GaussLayerConfig {
        precision: PrecisionConfig::with_parameterization(Parameterization::Expm),
        ..Default::default()
    };
    for dtype in [DType::F32, DType::F64] {
        let (log, _, _) = bounds(dtype);
        let entry = 0.9 * log;
        for sign in [1.0, -1.0] {
            let raw = Tensor::full(sign * entry, (Z, D, D), &Device::Cpu)?.to_dtype(dtype)?;
            match Precision::from_raw(raw, D, &config) {
                Err(GaussError::Numerical { reason, .. }) => {
                    assert!(reason.contains("row 0 of neuron 0"), "{reason}")
                }
                other => panic!("{dtype:?} {sign}: expected a numerical error, got {other:?}"),
            }
        }
        // Rows summing to just inside the bound: finite P, outputs and gradients.
        let inside = 0.99 * log / D as f64;
        for sign in [1.0, -1.0] {
            let raw = Tensor::full(sign * inside, (Z, D, D), &Device::Cpu)?.to_dtype(dtype)?;
            assert_finite_layer(&config, raw, &format!("expm {dtype:?} {sign}"))?;
        }
    }
    Ok(())
}
