//! Sampling statistics with seeded generators and tolerances from the sampling distributions.
//!
//! Draws x ~ N(c, Σ) are whitened on the host, w = Lᵀ(x − c) with P = Σ⁻¹ = L Lᵀ (an
//! independent Cholesky), so w ~ N(0, I) exactly when the sampler is right. For n draws each
//! coordinate of the sample mean of w is N(0, 1/n) and each entry of its sample covariance
//! has standard deviation √(2/n) (diagonal) or √(1/n) (off-diagonal). The tests allow 5
//! standard deviations per entry: a correct sampler fails one of the ≤ 100 checked entries
//! with probability below 1e-4 for a random seed (and never for these fixed seeds), while a
//! wrong scale, rotation or mean of a few percent is caught.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gauss_layer::GaussianMixture;
use gauss_layer::{GaussLayer, GaussLayerConfig, Parameterization};
use gauss_tests::{cholesky, inverse, Matrix};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Checks that `draws` (n rows of d) are N(mean, cov) by whitening (see the module docs).
fn assert_normal(draws: &[Vec<f64>], mean: &[f64], cov: &Matrix, what: &str) {
    let (n, d) = (draws.len(), mean.len());
    let lower = cholesky(&inverse(cov));
    let white: Vec<Vec<f64>> = draws
        .iter()
        .map(|x| {
            (0..d)
                .map(|j| (j..d).map(|i| lower[i][j] * (x[i] - mean[i])).sum())
                .collect()
        })
        .collect();
    let nf = n as f64;
    let avg: Vec<f64> = (0..d)
        .map(|j| white.iter().map(|w| w[j]).sum::<f64>() / nf)
        .collect();
    for (j, a) in avg.iter().enumerate() {
        assert!(
            a.abs() <= 5.0 / nf.sqrt(),
            "{what}: mean of whitened coordinate {j} is {a}"
        );
    }
    for i in 0..d {
        for j in 0..=i {
            let c = white
                .iter()
                .map(|w| (w[i] - avg[i]) * (w[j] - avg[j]))
                .sum::<f64>()
                / (nf - 1.0);
            let (expected, sd) = if i == j {
                (1.0, (2.0 / nf).sqrt())
            } else {
                (0.0, (1.0 / nf).sqrt())
            };
            assert!(
                (c - expected).abs() <= 5.0 * sd,
                "{what}: whitened covariance ({i}, {j}) is {c}, expected {expected} ± {}",
                5.0 * sd
            );
        }
    }
}

fn normals(parameterization: Parameterization) -> Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let mean = Tensor::new(&[[1.0f64, -2.0, 0.5, 3.0], [-4.0, 0.0, 2.0, 1.0]], &dev)?;
    let cov: Vec<Vec<Vec<f64>>> = match parameterization {
        Parameterization::Diag => vec![diag(&[2.0, 0.5, 1.0, 4.0]), diag(&[0.1, 3.0, 1.5, 0.7])],
        Parameterization::Sphere => vec![diag(&[2.0; 4]), diag(&[0.3; 4])],
        _ => vec![
            vec![
                vec![2.0, 0.6, -0.3, 0.1],
                vec![0.6, 1.5, 0.2, 0.0],
                vec![-0.3, 0.2, 0.8, 0.3],
                vec![0.1, 0.0, 0.3, 1.0],
            ],
            // Condition number about 1e3.
            vec![
                vec![10.0, 9.9, 0.0, 0.0],
                vec![9.9, 10.0, 0.0, 0.0],
                vec![0.0, 0.0, 0.05, 0.0],
                vec![0.0, 0.0, 0.0, 1.0],
            ],
        ],
    };
    Ok((mean, Tensor::new(cov, &dev)?))
}

fn diag(values: &[f64]) -> Matrix {
    (0..values.len())
        .map(|i| {
            (0..values.len())
                .map(|j| if i == j { values[i] } else { 0.0 })
                .collect()
        })
        .collect()
}

#[test]
fn layer_samples_have_the_neurons_mean_and_covariance() -> Result<()> {
    let n = 20_000;
    for parameterization in Parameterization::ALL {
        // lowrank at full rank (d = 4) holds these covariances exactly.
        let parameterization = match parameterization {
            Parameterization::LowRank { .. } => Parameterization::LowRank { rank: 4 },
            other => other,
        };
        let (mean, cov) = normals(parameterization)?;
        let config = GaussLayerConfig::with_parameterization(parameterization);
        let layer = GaussLayer::from_covariance(&mean, &cov, config)?;
        let mut rng = StdRng::seed_from_u64(7);
        let draws = layer.sample(n, &mut rng)?;
        assert_eq!(draws.dims(), &[n, 2, 4]);
        let means = mean.to_vec2::<f64>()?;
        let covs = cov.to_vec3::<f64>()?;
        for z in 0..2 {
            let rows = draws.narrow(1, z, 1)?.squeeze(1)?.to_vec2::<f64>()?;
            assert_normal(
                &rows,
                &means[z],
                &covs[z],
                &format!("{parameterization} neuron {z}"),
            );
        }
        // Seeded: the same draws again.
        let again = layer.sample(n, &mut StdRng::seed_from_u64(7))?;
        assert_eq!(
            draws.flatten_all()?.to_vec1::<f64>()?,
            again.flatten_all()?.to_vec1::<f64>()?
        );
    }
    // f32 layers sample in f32.
    let (mean, cov) = normals(Parameterization::Cholesky)?;
    let layer = GaussLayer::from_covariance(
        &mean.to_dtype(DType::F32)?,
        &cov.to_dtype(DType::F32)?,
        GaussLayerConfig::default(),
    )?;
    assert_eq!(
        layer.sample(3, &mut StdRng::seed_from_u64(0))?.dtype(),
        DType::F32
    );
    Ok(())
}

/// Mixture draws: each component's count is Binomial(n, π_k) (within 5 standard deviations)
/// and the draws of each component are its normal.
#[test]
fn mixture_samples_follow_weights_and_components() -> Result<()> {
    let n = 30_000;
    let (mean, cov) = normals(Parameterization::Cholesky)?;
    let layer = GaussLayer::from_covariance(&mean, &cov, GaussLayerConfig::default())?;
    let weights = [0.3f64, 0.7];
    let logits = Tensor::new(
        &[weights[0].ln() + 1.0, weights[1].ln() + 1.0],
        &Device::Cpu,
    )?;
    let mixture = GaussianMixture::new(layer, logits)?;
    let (draws, components) = mixture.sample_with_components(n, &mut StdRng::seed_from_u64(3))?;
    assert_eq!(draws.dims(), &[n, 4]);
    let rows = draws.to_vec2::<f64>()?;
    let (means, covs) = (mean.to_vec2::<f64>()?, cov.to_vec3::<f64>()?);
    for (k, w) in weights.iter().enumerate() {
        let mine: Vec<Vec<f64>> = rows
            .iter()
            .zip(&components)
            .filter(|(_, &c)| c == k)
            .map(|(r, _)| r.clone())
            .collect();
        let sd = (n as f64 * w * (1.0 - w)).sqrt();
        assert!(
            (mine.len() as f64 - n as f64 * w).abs() <= 5.0 * sd,
            "component {k}: {} draws, expected {} ± {}",
            mine.len(),
            n as f64 * w,
            5.0 * sd
        );
        assert_normal(
            &mine,
            &means[k],
            &covs[k],
            &format!("mixture component {k}"),
        );
    }
    Ok(())
}
