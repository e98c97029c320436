//! The λ-loss over every parameterization, against closed forms computed on the host:
//! values from the precision matrices (`tr P⁻¹/d`, `−log|P|`, `−tr P/d`), the FGN sigma loss
//! for diag and sphere (`mean 1/p`), and gradients with respect to the raw parameters where
//! they have a closed form (direct: `−P⁻²/d`, `−P⁻¹`, `−I/d`; expm: `−S/d`, `−I`, `−P/d`;
//! diag/sphere: `−1/p` per entry), each divided by the number of neurons Z.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gauss_layer::{GaussLayer, GaussLayerConfig, Parameterization, Precision};
use gauss_losses::LambdaLoss;
use rand::{Rng, SeedableRng};

use gauss_tests::{gradient_of, inverse, log_det_spd, matmul, transpose, Matrix};

/// Z random SPD matrices `B Bᵀ + d·0.5 I`, well conditioned.
fn random_spd(seed: u64, z: usize, d: usize) -> Vec<Matrix> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..z)
        .map(|_| {
            let b: Matrix = (0..d)
                .map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect())
                .collect();
            let mut p = matmul(&b, &transpose(&b));
            for (i, row) in p.iter_mut().enumerate() {
                row[i] += 0.5 * d as f64;
            }
            p
        })
        .collect()
}

fn to_tensor(ps: &[Matrix]) -> Result<Tensor> {
    let (z, d) = (ps.len(), ps[0].len());
    let flat: Vec<f64> = ps.iter().flatten().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (z, d, d), &Device::Cpu)?)
}

fn expected_value(variant: LambdaLoss, ps: &[Matrix]) -> f64 {
    let d = ps[0].len() as f64;
    let per: Vec<f64> = ps
        .iter()
        .map(|p| match variant {
            LambdaLoss::TraceCovariance => {
                let s = inverse(p);
                (0..p.len()).map(|i| s[i][i]).sum::<f64>() / d
            }
            LambdaLoss::LogdetCovariance => -log_det_spd(p),
            LambdaLoss::NegTracePrecision => -(0..p.len()).map(|i| p[i][i]).sum::<f64>() / d,
        })
        .collect();
    per.iter().sum::<f64>() / per.len() as f64
}

fn config(parameterization: Parameterization) -> GaussLayerConfig {
    GaussLayerConfig::with_parameterization(parameterization)
}

fn assert_rel(got: f64, expected: f64, tol: f64, what: &str) {
    assert!(
        (got - expected).abs() <= tol * expected.abs().max(1e-12),
        "{what}: got {got}, expected {expected}"
    );
}

/// On each enabled device, in each float dtype it has (f32: the closed form of the f64
/// matrices, so the tolerance covers rounding the inputs as well as the arithmetic).
fn lambda_values_match_closed_forms_for_full_parameterizations(device: &Device) -> Result<()> {
    let ps = random_spd(11, 3, 4);
    for dtype in gauss_layer::testing::float_dtypes(device) {
        let matrices = gauss_tests::on_device(&to_tensor(&ps)?, dtype, device)?;
        for param in [
            Parameterization::Cholesky,
            Parameterization::Direct,
            Parameterization::Expm,
        ] {
            let precision = Precision::from_precision_matrix(&matrices, &config(param))?;
            for variant in LambdaLoss::ALL {
                let got = gauss_tests::host_scalar(&variant.per_neuron(&precision)?.mean_all()?)?;
                // expm goes through a matrix logarithm and back: allow its rounding.
                let tol = match (dtype, param) {
                    (DType::F64, Parameterization::Expm) => 1e-7,
                    (DType::F64, _) => 1e-9,
                    _ => 1e-4,
                };
                assert_rel(
                    got,
                    expected_value(variant, &ps),
                    tol,
                    &format!("{dtype:?} {param} {variant}"),
                );
            }
        }
    }
    Ok(())
}
gauss_layer::test_device!(lambda_values_match_closed_forms_for_full_parameterizations);

/// For diag and sphere the default λ-loss is the FGN sigma loss: the mean covariance
/// eigenvalue `mean_{z,i} 1/p_zi`, gradient `−1/p` over the number of terms, w.r.t. log p.
#[test]
fn lambda_over_diag_and_sphere_is_the_fgn_sigma_loss() -> Result<()> {
    let log_p = [[0.3f64, -1.2, 0.7], [1.5, 0.0, -0.4]];
    let raw = Var::new(&log_p, &Device::Cpu)?;
    let precision =
        Precision::from_raw(raw.as_tensor().clone(), 3, &config(Parameterization::Diag))?;
    let loss = LambdaLoss::TraceCovariance
        .per_neuron(&precision)?
        .mean_all()?;
    let expected: f64 = log_p.iter().flatten().map(|t| (-t).exp()).sum::<f64>() / 6.0;
    assert_rel(loss.to_scalar::<f64>()?, expected, 1e-12, "diag sigma loss");
    let grad = gradient_of(&loss, &raw)?.to_vec2::<f64>()?;
    for (g_row, t_row) in grad.iter().zip(&log_p) {
        for (g, t) in g_row.iter().zip(t_row) {
            assert_rel(*g, -(-t).exp() / 6.0, 1e-12, "diag sigma loss gradient");
        }
    }

    let log_s = [0.25f64, -0.8, 1.1, 0.0];
    let raw = Var::new(&log_s, &Device::Cpu)?;
    let precision = Precision::from_raw(
        raw.as_tensor().clone(),
        5,
        &config(Parameterization::Sphere),
    )?;
    let loss = LambdaLoss::TraceCovariance
        .per_neuron(&precision)?
        .mean_all()?;
    let expected: f64 = log_s.iter().map(|t| (-t).exp()).sum::<f64>() / 4.0;
    assert_rel(
        loss.to_scalar::<f64>()?,
        expected,
        1e-12,
        "sphere sigma loss",
    );
    let grad = gradient_of(&loss, &raw)?.to_vec1::<f64>()?;
    for (g, t) in grad.iter().zip(&log_s) {
        assert_rel(*g, -(-t).exp() / 4.0, 1e-12, "sphere sigma loss gradient");
    }
    // Other variants: log|S| = −Σ θ, −tr P/d = −e^θ.
    let logdet = LambdaLoss::LogdetCovariance
        .per_neuron(&precision)?
        .mean_all()?
        .to_scalar::<f64>()?;
    assert_rel(
        logdet,
        -5.0 * log_s.iter().sum::<f64>() / 4.0,
        1e-12,
        "sphere logdet",
    );
    let neg_tr = LambdaLoss::NegTracePrecision
        .per_neuron(&precision)?
        .mean_all()?
        .to_scalar::<f64>()?;
    let expected: f64 = -log_s.iter().map(|t| t.exp()).sum::<f64>() / 4.0;
    assert_rel(neg_tr, expected, 1e-12, "sphere neg trace");
    Ok(())
}

/// Direct: `P = (A + Aᵀ)/2`, so the gradient w.r.t. A of a function of P with symmetric
/// gradient G is G itself: `tr P⁻¹ → −P⁻²`, `−log|P| → −P⁻¹`, `−tr P → −I`.
#[test]
fn lambda_gradients_for_direct_match_closed_forms() -> Result<()> {
    let ps = random_spd(5, 2, 3);
    let (z, d) = (ps.len() as f64, ps[0].len() as f64);
    for variant in LambdaLoss::ALL {
        let raw = Var::from_tensor(&to_tensor(&ps)?)?;
        let precision = Precision::from_raw(
            raw.as_tensor().clone(),
            3,
            &config(Parameterization::Direct),
        )?;
        let loss = variant.per_neuron(&precision)?.mean_all()?;
        let grad = gradient_of(&loss, &raw)?.to_vec3::<f64>()?;
        for (p, g) in ps.iter().zip(&grad) {
            let s = inverse(p);
            let expected: Matrix = match variant {
                LambdaLoss::TraceCovariance => matmul(&s, &s)
                    .iter()
                    .map(|r| r.iter().map(|v| -v / (d * z)).collect())
                    .collect(),
                LambdaLoss::LogdetCovariance => s
                    .iter()
                    .map(|r| r.iter().map(|v| -v / z).collect())
                    .collect(),
                LambdaLoss::NegTracePrecision => (0..p.len())
                    .map(|i| {
                        (0..p.len())
                            .map(|j| if i == j { -1.0 / (d * z) } else { 0.0 })
                            .collect()
                    })
                    .collect(),
            };
            for (gr, er) in g.iter().zip(&expected) {
                for (gv, ev) in gr.iter().zip(er) {
                    assert!(
                        (gv - ev).abs() <= 1e-9 * (1.0 / z),
                        "direct {variant}: got {gv}, expected {ev}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Expm: `P = expm(A)` for symmetric A, so `tr S = tr e^{−A} → −S`, `−log|P| = −tr A → −I`,
/// `−tr P → −P` (gradients of traces of matrix functions of a symmetric argument).
#[test]
fn lambda_gradients_for_expm_match_closed_forms() -> Result<()> {
    let ps = random_spd(9, 2, 3);
    let (z, d) = (ps.len() as f64, ps[0].len() as f64);
    let matrices = to_tensor(&ps)?;
    let reference = Precision::from_precision_matrix(&matrices, &config(Parameterization::Expm))?;
    for variant in LambdaLoss::ALL {
        let raw = Var::from_tensor(reference.raw())?;
        let precision =
            Precision::from_raw(raw.as_tensor().clone(), 3, &config(Parameterization::Expm))?;
        let loss = variant.per_neuron(&precision)?.mean_all()?;
        let grad = gradient_of(&loss, &raw)?.to_vec3::<f64>()?;
        for (p, g) in ps.iter().zip(&grad) {
            let s = inverse(p);
            for i in 0..p.len() {
                for j in 0..p.len() {
                    let expected = match variant {
                        LambdaLoss::TraceCovariance => -s[i][j] / (d * z),
                        LambdaLoss::LogdetCovariance => {
                            if i == j {
                                -1.0 / z
                            } else {
                                0.0
                            }
                        }
                        LambdaLoss::NegTracePrecision => -p[i][j] / (d * z),
                    };
                    // The matrix exponential is a truncated series: allow its rounding.
                    assert!(
                        (g[i][j] - expected).abs() <= 1e-7 * (1.0 / z).max(expected.abs()),
                        "expm {variant}[{i},{j}]: got {}, expected {expected}",
                        g[i][j]
                    );
                }
            }
        }
    }
    Ok(())
}

/// Over several layers the λ-loss is the mean over all their neurons.
#[test]
fn lambda_over_layers_pools_neurons() -> Result<()> {
    let a = random_spd(1, 2, 3);
    let b = random_spd(2, 5, 3);
    let cfg = GaussLayerConfig {
        gaussian_only: true,
        ..config(Parameterization::Cholesky)
    };
    let layer = |ps: &[Matrix]| -> Result<GaussLayer> {
        let precision = Precision::from_precision_matrix(&to_tensor(ps)?, &cfg)?;
        let center = Tensor::zeros((ps.len(), 3), DType::F64, &Device::Cpu)?;
        Ok(GaussLayer::new(None, None, center, precision, cfg.clone())?)
    };
    let (la, lb) = (layer(&a)?, layer(&b)?);
    let all: Vec<Matrix> = a.iter().chain(&b).cloned().collect();
    for variant in LambdaLoss::ALL {
        let pooled = variant.of_layers([&la, &lb])?.to_scalar::<f64>()?;
        assert_rel(pooled, expected_value(variant, &all), 1e-9, variant.name());
    }
    assert!(LambdaLoss::default()
        .of_layers(std::iter::empty::<&GaussLayer>())
        .is_err());
    assert_eq!(
        "logdet_covariance".parse::<LambdaLoss>()?,
        LambdaLoss::LogdetCovariance
    );
    assert!("volume".parse::<LambdaLoss>().is_err());
    Ok(())
}

/// The Hutchinson trace estimate through the λ-loss, on every device: its mean over many
/// draws is the closed-form `tr P⁻¹/d` (host inverse) within 5 standard errors, each draw is
/// finite and differentiable, and an estimator without probes is refused.
fn lambda_trace_estimate_is_unbiased(device: &Device) -> Result<()> {
    use gauss_losses::TraceEstimator;
    let ps = random_spd(5, 2, 6);
    let expected = expected_value(LambdaLoss::TraceCovariance, &ps);
    for dtype in gauss_layer::testing::float_dtypes(device) {
        let config = config(Parameterization::Cholesky);
        let mut portable = config.clone();
        portable.precision.portable = true;
        for config in [config, portable] {
            let p = to_tensor(&ps)?.to_dtype(dtype)?.to_device(device)?;
            let precision = Precision::from_precision_matrix(&p, &config)?;
            let raw = Var::from_tensor(precision.raw())?;
            let precision = precision.with_raw(raw.as_tensor().clone())?;
            let estimator = TraceEstimator::Hutchinson { probes: 4 };
            let draws: Vec<f64> = (0..300)
                .map(|_| -> Result<f64> {
                    let value = LambdaLoss::TraceCovariance
                        .per_neuron_with(&precision, estimator)?
                        .mean_all()?;
                    Ok(value
                        .to_device(&Device::Cpu)?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?)
                })
                .collect::<Result<_>>()?;
            let n = draws.len() as f64;
            let mean = draws.iter().sum::<f64>() / n;
            let sd = (draws.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            let what = format!("{dtype:?} portable={}", config.precision.portable);
            assert!(sd > 0.0, "{what}: the draws do not vary");
            assert!(
                (mean - expected).abs() < 5.0 * sd / n.sqrt(),
                "{what}: mean {mean} vs {expected} (sd {sd})"
            );
            let loss = LambdaLoss::TraceCovariance
                .per_neuron_with(&precision, estimator)?
                .mean_all()?;
            let grads = loss.backward()?;
            assert!(grads.get(raw.as_tensor()).is_some(), "{what}: no gradient");
            assert!(LambdaLoss::TraceCovariance
                .per_neuron_with(&precision, TraceEstimator::Hutchinson { probes: 0 })
                .is_err());
        }
    }
    Ok(())
}
gauss_layer::test_device!(lambda_trace_estimate_is_unbiased);
