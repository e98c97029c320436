//! lowrank (`diag(e^θ) + U Uᵀ` precisions) as a density: mixtures fitted in the family score
//! between the diagonal and the full fits of the same data, honour `reg_covar` and converge;
//! a layer built from its own `precision_matrix()` round-trips for every parameterization;
//! the direct constructor from (diagonal, U).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::{gaussian_mixture, GaussianMixture, MixtureFit, MixtureFitOptions};
use gauss_layer::{GaussLayer, GaussLayerConfig, Parameterization};
use rand::{Rng, SeedableRng};

use crate::common::{get, load};

fn fit(
    x: &Tensor,
    k: usize,
    parameterization: Parameterization,
) -> Result<(MixtureFit, GaussianMixture)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let config = GaussLayerConfig::with_parameterization(parameterization);
    let mixture = gaussian_mixture(x.dim(1)?, k, config, vb)?;
    let options = MixtureFitOptions {
        n_init: 2,
        ..Default::default()
    };
    Ok((mixture.fit(x, &options)?, mixture))
}

/// A mixture of normals N(means[k], A_k A_kᵀ) with weights ∝ `weights`, `n` draws.
fn draws(means: &[Vec<f64>], roots: &[Vec<f64>], n: usize, seed: u64) -> Result<Tensor> {
    let dev = Device::Cpu;
    let (k, d) = (means.len(), means[0].len());
    let covariances: Vec<f64> = roots
        .iter()
        .flat_map(|a| {
            (0..d * d).map(move |ij| {
                let (i, j) = (ij / d, ij % d);
                (0..d).map(|m| a[i * d + m] * a[j * d + m]).sum::<f64>()
            })
        })
        .collect();
    let truth = GaussLayer::from_covariance(
        &Tensor::from_vec(means.concat(), (k, d), &dev)?,
        &Tensor::from_vec(covariances, (k, d, d), &dev)?,
        GaussLayerConfig::with_parameterization(Parameterization::Expm),
    )?;
    let truth = GaussianMixture::new(truth, Tensor::zeros(k, DType::F64, &dev)?)?;
    Ok(truth.sample(n, &mut rand::rngs::StdRng::seed_from_u64(seed))?)
}

/// 5-D, K = 2: one component stretched 200:1 along a random direction, one round.
fn elongated_5d() -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let d = 5;
    let mut stretched: Vec<f64> = (0..d * d).map(|_| rng.random_range(-0.3..0.3)).collect();
    let direction: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
    for i in 0..d {
        stretched[i * d] += 10.0 * direction[i];
        stretched[i * d + i] += 0.05;
    }
    let round: Vec<f64> = (0..d * d)
        .map(|ij| if ij / d == ij % d { 1.0 } else { 0.0 })
        .collect();
    draws(&[vec![0.0; d], vec![3.0; d]], &[stretched, round], 1000, 1)
}

/// 16-D, K = 4: random roots, means 6 apart on average.
fn wide_16d() -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let d = 16;
    let means: Vec<Vec<f64>> = (0..4)
        .map(|_| (0..d).map(|_| rng.random_range(-3.0..3.0)).collect())
        .collect();
    let roots: Vec<Vec<f64>> = (0..4)
        .map(|_| {
            (0..d * d)
                .map(|ij| {
                    rng.random_range(-1.0..1.0) / 4.0 + if ij / d == ij % d { 0.3 } else { 0.0 }
                })
                .collect()
        })
        .collect();
    draws(&means, &roots, 2000, 2)
}

#[test]
fn low_rank_fits_score_between_the_diagonal_and_the_full_fits() -> Result<()> {
    let mut cases: Vec<(String, Tensor, usize, Vec<usize>)> = Vec::new();
    for (name, k) in [
        ("mixture_d2_k3_separated", 3),
        ("mixture_d2_k3_overlapping", 3),
        ("mixture_d10_k4_overlapping", 4),
    ] {
        let ranks = if name.contains("d2") {
            vec![1]
        } else {
            vec![1, 3]
        };
        cases.push((name.into(), get(&load(name)?, "x")?.clone(), k, ranks));
    }
    cases.push(("elongated 5-D".into(), elongated_5d()?, 2, vec![1, 2]));
    cases.push(("16-D".into(), wide_16d()?, 4, vec![1, 4]));
    for (name, x, k, ranks) in cases {
        let (diag, _) = fit(&x, k, Parameterization::Diag)?;
        let (full, _) = fit(&x, k, Parameterization::Cholesky)?;
        for rank in ranks {
            let (low, mixture) = fit(&x, k, Parameterization::LowRank { rank })?;
            let what = format!(
                "{name} lowrank:{rank} {} vs diag {} and full {}",
                low.mean_log_likelihood, diag.mean_log_likelihood, full.mean_log_likelihood
            );
            assert!(low.converged && low.refine_steps == 0, "{what}: {low:?}");
            assert!(
                low.mean_log_likelihood >= diag.mean_log_likelihood - 1e-3,
                "{what}"
            );
            assert!(
                low.mean_log_likelihood <= full.mean_log_likelihood + 1e-3,
                "{what}"
            );
            // What the fit reports is what the mixture holds.
            let held = mixture.score(&x)?;
            assert!(
                (held - low.mean_log_likelihood).abs() < 1e-9,
                "{what}: holds {held}"
            );
        }
    }
    Ok(())
}

#[test]
fn low_rank_fit_honours_reg_covar_on_duplicated_points() -> Result<()> {
    let dev = Device::Cpu;
    // 200 uniform draws in [−2, 2)⁴, plus 100 copies of one far point: a component collapses
    // onto the copies, where only `reg_covar` keeps its covariance positive definite.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut rows: Vec<f64> = (0..200 * 4).map(|_| rng.random_range(-2.0..2.0)).collect();
    rows.extend([6.0, 6.0, 6.0, 6.0].repeat(100));
    let x = Tensor::from_vec(rows, (300, 4), &dev)?;
    let reg_covar = 1e-6;
    let (full, _) = fit(&x, 2, Parameterization::Cholesky)?;
    for rank in [1, 2] {
        let (low, mixture) = fit(&x, 2, Parameterization::LowRank { rank })?;
        assert!(low.converged);
        assert!(
            low.mean_log_likelihood <= full.mean_log_likelihood + 1e-3,
            "lowrank:{rank} {} above full {}",
            low.mean_log_likelihood,
            full.mean_log_likelihood
        );
        // At the optimum the model's variances equal the data's plus reg_covar (∂/∂θ = 0).
        let covariances = mixture.covariances()?.to_vec3::<f64>()?;
        for (component, cov) in covariances.iter().enumerate() {
            for (i, row) in cov.iter().enumerate() {
                assert!(
                    row[i] >= reg_covar * (1.0 - 1e-6),
                    "lowrank:{rank} component {component} variance {i}: {}",
                    row[i]
                );
            }
        }
    }
    Ok(())
}

#[test]
fn every_parameterization_round_trips_its_own_precision_matrix() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (z, d) = (2, 20);
    let mut parameterizations = Parameterization::ALL.to_vec();
    parameterizations.push(Parameterization::LowRank { rank: 4 });
    for parameterization in parameterizations {
        let config = GaussLayerConfig::with_parameterization(parameterization);
        let shape = gauss_layer::Precision::raw_shape(parameterization, z, d);
        let count: usize = shape.iter().product();
        let mut values: Vec<f64> = (0..count).map(|_| rng.random_range(-0.5..0.5)).collect();
        if parameterization == Parameterization::Direct {
            // direct holds A itself: make it symmetric positive definite.
            values = (0..z * d * d)
                .map(|index| {
                    let (i, j) = ((index / d) % d, index % d);
                    if i == j {
                        d as f64
                    } else {
                        0.1 * ((i * 7 + j * 7) % 5) as f64 - 0.2
                    }
                })
                .collect();
        }
        let raw = Tensor::from_vec(values, shape.as_slice(), &dev)?;
        let precision = gauss_layer::Precision::from_raw(raw, d, &config)?;
        let original = precision.precision_matrix()?;
        let center = Tensor::zeros((z, d), DType::F64, &dev)?;
        let layer = GaussLayer::from_precision(&center, &original, config)?;
        let back = layer.precision().precision_matrix()?;
        let scale = original.abs()?.max_all()?.to_scalar::<f64>()?;
        let misfit = (back - &original)?.abs()?.max_all()?.to_scalar::<f64>()? / scale;
        assert!(
            misfit < 1e-9,
            "{parameterization}: relative misfit {misfit:e}"
        );
    }
    Ok(())
}

#[test]
fn low_rank_from_parts_and_errors() -> Result<()> {
    let dev = Device::Cpu;
    let config = GaussLayerConfig::with_parameterization(Parameterization::LowRank { rank: 1 });
    let mean = Tensor::zeros((1, 2), DType::F64, &dev)?;
    let diagonal = Tensor::new(&[[1.0f64, 2.0]], &dev)?;
    let u = Tensor::new(&[[[1.0f64], [-1.0]]], &dev)?;
    let layer = GaussLayer::from_low_rank(&mean, &diagonal, &u, config.clone())?;
    // P = [[2, −1], [−1, 3]]: log det P = ln 5.
    let log_det = layer.precision().log_det_precision()?.to_vec1::<f64>()?[0];
    assert!((log_det - 5f64.ln()).abs() < 1e-12);
    let zero = Tensor::new(&[[1.0f64, 0.0]], &dev)?;
    let text = GaussLayer::from_low_rank(&mean, &zero, &u, config.clone())
        .unwrap_err()
        .to_string();
    assert!(text.contains("finite and > 0"), "{text}");
    let rank2 = Tensor::zeros((1, 2, 2), DType::F64, &dev)?;
    let text = GaussLayer::from_low_rank(&mean, &diagonal, &rank2, config.clone())
        .unwrap_err()
        .to_string();
    assert!(text.contains("lowrank:2"), "{text}");
    // A precision outside the family is still an error that says so.
    let p = Tensor::new(
        &[[[3.0f64, 1.0, 1.0], [1.0, 3.0, -1.0], [1.0, -1.0, 3.0]]],
        &dev,
    )?;
    let three = Tensor::zeros((1, 3), DType::F64, &dev)?;
    let text = GaussLayer::from_precision(&three, &p, config)
        .unwrap_err()
        .to_string();
    assert!(text.contains("not of that form"), "{text}");
    Ok(())
}
