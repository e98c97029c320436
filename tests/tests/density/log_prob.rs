//! `GaussLayer::log_prob` against `scipy.stats.multivariate_normal.logpdf`, recorded by
//! `tools/density/logpdf_reference.py` in `tests/data/density/logpdf_d{2,16,64}.safetensors`:
//! two normals per file, one well conditioned and one with condition number 1e6. The files
//! hold SciPy's values (`log_prob_scipy`) and the same formula in 50-digit mpmath
//! (`log_prob`); SciPy is within 1.5e-11 of mpmath there. f64, 1e-9 relative per entry.

use anyhow::Result;
use candle_core::Tensor;
use gauss_layer::{GaussLayer, GaussLayerConfig, Parameterization, PrecisionConfig};

use crate::common::{get, load};

/// Largest `|a − b| / |b|` over the entries.
fn max_relative(got: &Tensor, expected: &Tensor) -> Result<f64> {
    let got = got.flatten_all()?.to_vec1::<f64>()?;
    let expected = expected.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(got.len(), expected.len());
    Ok(got
        .iter()
        .zip(&expected)
        .map(|(g, e)| (g - e).abs() / e.abs())
        .fold(0.0, f64::max))
}

#[test]
fn log_prob_matches_scipy_for_every_full_parameterization() -> Result<()> {
    for d in [2, 16, 64] {
        let file = load(&format!("logpdf_d{d}"))?;
        let (mean, covariance) = (get(&file, "mean")?, get(&file, "covariance")?);
        let (precision, x) = (get(&file, "precision")?, get(&file, "x")?);
        for parameterization in [
            Parameterization::Cholesky,
            Parameterization::Direct,
            Parameterization::Expm,
        ] {
            let config = GaussLayerConfig::with_parameterization(parameterization);
            let layers = [
                (
                    "from_covariance",
                    GaussLayer::from_covariance(mean, covariance, config.clone())?,
                ),
                (
                    "from_precision",
                    GaussLayer::from_precision(mean, precision, config.clone())?,
                ),
            ];
            for (how, layer) in layers {
                let got = layer.log_prob(x)?;
                assert_eq!(got.dims(), get(&file, "log_prob")?.dims());
                for key in ["log_prob", "log_prob_scipy"] {
                    let err = max_relative(&got, get(&file, key)?)?;
                    assert!(
                        err < 1e-9,
                        "d = {d}, {parameterization}, {how}, {key}: {err:e}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// diag and sphere hold the axis-aligned parts: the log-density of N(c, diag(S_ii)) is a sum
/// of 1-D normals, closed form.
#[test]
fn log_prob_of_diagonal_forms_is_a_sum_of_one_dimensional_normals() -> Result<()> {
    let file = load("logpdf_d16")?;
    let (mean, covariance, x) = (
        get(&file, "mean")?,
        get(&file, "covariance")?,
        get(&file, "x")?,
    );
    let variances = gauss_layer::testing::linalg::diagonal(covariance)?; // (Z, d)
    let diagonal = gauss_layer::testing::linalg::diag_embed(&variances)?;
    let layer = GaussLayer::from_covariance(
        mean,
        &diagonal,
        GaussLayerConfig::with_parameterization(Parameterization::Diag),
    )?;
    let (xs, means, vars) = (
        x.to_vec2::<f64>()?,
        mean.to_vec2::<f64>()?,
        variances.to_vec2::<f64>()?,
    );
    let expected: Vec<Vec<f64>> = xs
        .iter()
        .map(|row| {
            (0..2)
                .map(|z| {
                    (0..16)
                        .map(|i| {
                            let v = vars[z][i];
                            -0.5 * (2.0 * std::f64::consts::PI * v).ln()
                                - 0.5 * (row[i] - means[z][i]).powi(2) / v
                        })
                        .sum()
                })
                .collect()
        })
        .collect();
    let expected = Tensor::new(expected, x.device())?;
    let err = max_relative(&layer.log_prob(x)?, &expected)?;
    assert!(err < 1e-12, "diag: {err:e}");

    // Sphere: every variance 2.5.
    let eye = (Tensor::eye(16, x.dtype(), x.device())?
        .unsqueeze(0)?
        .repeat((2, 1, 1))?
        * 2.5)?;
    let sphere = GaussLayer::from_covariance(
        mean,
        &eye,
        GaussLayerConfig::with_parameterization(Parameterization::Sphere),
    )?;
    let expected: Vec<Vec<f64>> = xs
        .iter()
        .map(|row| {
            (0..2)
                .map(|z| {
                    let r2: f64 = (0..16).map(|i| (row[i] - means[z][i]).powi(2)).sum();
                    -8.0 * (2.0 * std::f64::consts::PI * 2.5).ln() - 0.5 * r2 / 2.5
                })
                .collect()
        })
        .collect();
    let err = max_relative(&sphere.log_prob(x)?, &Tensor::new(expected, x.device())?)?;
    assert!(err < 1e-12, "sphere: {err:e}");
    Ok(())
}

/// `log_prob` takes any (…, d) and equals `−layer_nll` of the losses crate.
#[test]
fn log_prob_takes_any_leading_shape_and_negates_layer_nll() -> Result<()> {
    let file = load("logpdf_d16")?;
    let layer = GaussLayer::from_covariance(
        get(&file, "mean")?,
        get(&file, "covariance")?,
        GaussLayerConfig::default(),
    )?;
    let x = get(&file, "x")?; // (32, 16)
    let flat = layer.log_prob(x)?;
    let shaped = layer.log_prob(&x.reshape((4, 2, 4, 16))?)?;
    assert_eq!(shaped.dims(), &[4, 2, 4, 2]);
    assert_eq!(
        shaped.flatten_all()?.to_vec1::<f64>()?,
        flat.flatten_all()?.to_vec1::<f64>()?
    );
    let single = layer.log_prob(&x.get(3)?)?; // (d) → (Z)
    assert_eq!(single.to_vec1::<f64>()?, flat.get(3)?.to_vec1::<f64>()?);
    let nll = gauss_losses::layer_nll(&layer, x, gauss_losses::Reduction::None)?;
    let err = max_relative(&nll.neg()?, &flat)?;
    assert!(err < 1e-14, "{err:e}");
    Ok(())
}

/// The same SciPy values on every enabled device, through the portable path (what GPUs run),
/// for the well-conditioned d = 16 file: f64 to 1e-9 (left out on Metal) and f32 to 1e-4
/// relative to the log-density's scale.
fn log_prob_matches_scipy_on_the_device(device: &candle_core::Device) -> Result<()> {
    let file = load("logpdf_d16")?;
    let expected = get(&file, "log_prob_scipy")?;
    for dtype in gauss_layer::testing::float_dtypes(device) {
        let on = |name: &str| -> Result<Tensor> {
            Ok(get(&file, name)?.to_dtype(dtype)?.to_device(device)?)
        };
        let (mean, covariance, x) = (on("mean")?, on("covariance")?, on("x")?);
        for parameterization in [Parameterization::Cholesky, Parameterization::Expm] {
            let config = GaussLayerConfig {
                precision: PrecisionConfig {
                    parameterization,
                    portable: true,
                    ..Default::default()
                },
                ..Default::default()
            };
            // Well-conditioned neuron only (index 0): f32 cannot hold condition 1e6 to 1e-4.
            let layer = GaussLayer::from_covariance(&mean, &covariance, config)?;
            let got = layer.log_prob(&x)?.narrow(1, 0, 1)?;
            let want = expected.narrow(1, 0, 1)?;
            let err = gauss_layer::testing::relative_error(&got, &want)?;
            let tolerance = gauss_layer::testing::tolerance(dtype);
            assert!(err < tolerance, "{dtype:?} {parameterization}: {err:e}");
        }
    }
    Ok(())
}
gauss_layer::test_device!(log_prob_matches_scipy_on_the_device);
