//! scikit-learn's `GaussianMixture` methods on fixed parameters and data: the expected values
//! were computed by scikit-learn 1.x, setting `weights_`, `means_`, `covariances_` and
//! `precisions_cholesky_ = _compute_precision_cholesky(covariances_, covariance_type)` on
//! `GaussianMixture(2, covariance_type=t)` and calling `predict`, `predict_proba`,
//! `score_samples`, `score`, `bic`, `aic` on `X`. Then the fit options `warm_start` and
//! `means_init`, and the error for fewer distinct samples than components.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::testing::tolerance;
use gauss_layer::{gaussian_mixture, GaussLayerConfig, MixtureFitOptions, Parameterization};
use gauss_tests::{host_matrix, host_values, on_device};

const X: [[f64; 2]; 6] = [
    [0.1, 0.2],
    [1.0, 0.5],
    [2.5, 1.5],
    [-1.0, -0.3],
    [1.8, 0.2],
    [0.9, 1.1],
];

struct Expected {
    parameterization: Parameterization,
    covariances: [[[f64; 2]; 2]; 2],
    proba_1: [f64; 6],
    score_samples: [f64; 6],
    score: f64,
    bic: f64,
    aic: f64,
    parameters: usize,
}

fn cases() -> [Expected; 3] {
    [
        Expected {
            parameterization: Parameterization::Cholesky,
            covariances: [[[1.0, 0.3], [0.3, 0.5]], [[0.8, -0.2], [-0.2, 1.2]]],
            proba_1: [
                0.07730001628943313,
                0.5305630680138642,
                0.9806984242588678,
                0.00148777555414008,
                0.8658827140884269,
                0.7147865947901124,
            ],
            score_samples: [
                -2.5558435714806924,
                -2.388609979373368,
                -2.459457879063703,
                -3.094561927702255,
                -2.347985826991407,
                -2.5866551736060246,
            ],
            score: -2.572185726369575,
            bic: 50.5755828779435,
            aic: 52.8662287164349,
            parameters: 11,
        },
        Expected {
            parameterization: Parameterization::Diag,
            covariances: [[[1.0, 0.0], [0.0, 0.5]], [[0.8, 0.0], [0.0, 1.2]]],
            proba_1: [
                0.12381579633277774,
                0.63227024548413,
                0.9964445738957244,
                0.00538878811260202,
                0.8686949288803032,
                0.7983025084753652,
            ],
            score_samples: [
                -2.608097348463139,
                -2.444869307137095,
                -2.4309959181014413,
                -3.279872920450576,
                -2.3250444044252556,
                -2.7092900096908292,
            ],
            score: -2.633028318044723,
            bic: 47.722175039589175,
            aic: 49.59633981653668,
            parameters: 9,
        },
        Expected {
            parameterization: Parameterization::Sphere,
            covariances: [[[0.7, 0.0], [0.0, 0.7]], [[1.1, 0.0], [0.0, 1.1]]],
            proba_1: [
                0.18230755482601443,
                0.6726043880834967,
                0.9980529065800726,
                0.02447779018981037,
                0.9190180126144535,
                0.7830661021182291,
            ],
            score_samples: [
                -2.5196202155368956,
                -2.461446052698073,
                -2.5151859259546216,
                -3.438964003806629,
                -2.5145035426581352,
                -2.5998694797501543,
            ],
            score: -2.6749315367340842,
            bic: 44.641494725405394,
            aic: 46.09917844080901,
            parameters: 7,
        },
    ]
}

// On each enabled device, in each float dtype it has (f32 to 1e-4).
gauss_layer::test_device_dtypes!(
    methods_match_scikit_learn_on_fixed_parameters,
    methods_match
);

fn methods_match(dtype: DType, dev: &Device) -> Result<()> {
    let tol = tolerance(dtype);
    let close = |got: f64, expected: f64, what: &str| {
        let err = (got - expected).abs() / expected.abs().max(1.0);
        assert!(
            err < tol,
            "{dtype:?} {what}: got {got}, expected {expected} ({err:e})"
        );
    };
    let host = |values: &[f64], shape: &[usize]| -> Result<Tensor> {
        on_device(
            &Tensor::from_slice(values, shape, &Device::Cpu)?,
            dtype,
            dev,
        )
    };
    let x = on_device(&Tensor::new(&X, &Device::Cpu)?, dtype, dev)?;
    for case in cases() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, dev);
        let config = GaussLayerConfig::with_parameterization(case.parameterization);
        let mixture = gaussian_mixture(2, 2, config, vb)?;
        let covariances: Vec<f64> = case
            .covariances
            .iter()
            .flatten()
            .flatten()
            .copied()
            .collect();
        mixture.set_parameters(
            &host(&[0.3, 0.7], &[2])?,
            &host(&[0.0, 0.0, 2.0, 1.0], &[2, 2])?,
            &host(&covariances, &[2, 2, 2])?,
        )?;
        let name = case.parameterization.to_string();
        assert_eq!(
            mixture.predict(&x)?.to_vec1::<u32>()?,
            vec![0, 1, 1, 0, 1, 1],
            "{name}"
        );
        let proba = host_matrix(&mixture.predict_proba(&x)?)?;
        for (row, expected) in proba.iter().zip(case.proba_1) {
            close(row[1], expected, &format!("{name} predict_proba"));
        }
        let samples = host_values(&mixture.score_samples(&x)?)?;
        for (got, expected) in samples.iter().zip(case.score_samples) {
            close(*got, expected, &format!("{name} score_samples"));
        }
        close(mixture.score(&x)?, case.score, &format!("{name} score"));
        close(mixture.bic(&x)?, case.bic, &format!("{name} bic"));
        close(mixture.aic(&x)?, case.aic, &format!("{name} aic"));
        assert_eq!(mixture.num_parameters(), case.parameters, "{name}");
    }
    Ok(())
}

/// Two blobs in 2-D, 150 points each, from a fixed seed.
fn blobs() -> Result<Tensor> {
    let dev = Device::Cpu;
    let truth = gauss_layer::GaussLayer::from_covariance(
        &Tensor::new(&[[-3.0f64, 0.0], [3.0, 1.0]], &dev)?,
        &Tensor::new(
            &[[[1.0f64, 0.4], [0.4, 0.8]], [[0.6, 0.0], [0.0, 1.5]]],
            &dev,
        )?,
        GaussLayerConfig::default(),
    )?;
    let truth = gauss_layer::GaussianMixture::new(truth, Tensor::zeros(2, DType::F64, &dev)?)?;
    Ok(truth.sample(
        300,
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5),
    )?)
}

#[test]
fn warm_start_and_means_init() -> Result<()> {
    let dev = Device::Cpu;
    let x = blobs()?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let mixture = gaussian_mixture(2, 2, GaussLayerConfig::default(), vb)?;
    let first = mixture.fit(&x, &MixtureFitOptions::default())?;
    // From the fitted values EM is already at its fixed point: one E-step confirms it.
    let again = mixture.fit(
        &x,
        &MixtureFitOptions {
            warm_start: true,
            ..Default::default()
        },
    )?;
    assert!(again.converged && again.kmeans_steps == 0 && again.em_steps <= 2);
    assert!((again.mean_log_likelihood - first.mean_log_likelihood).abs() < 1e-6);

    // Means near the blobs, given in the other order: component 0 ends on the right blob.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let seeded = gaussian_mixture(2, 2, GaussLayerConfig::default(), vb)?;
    let fit = seeded.fit(
        &x,
        &MixtureFitOptions {
            means_init: Some(vec![2.0, 0.0, -2.0, 0.0]),
            ..Default::default()
        },
    )?;
    assert!(fit.converged && fit.kmeans_steps == 0);
    assert!((fit.mean_log_likelihood - first.mean_log_likelihood).abs() < 1e-4);
    let means = seeded.means().to_vec2::<f64>()?;
    assert!(means[0][0] > 2.0 && means[1][0] < -2.0, "{means:?}");
    let bad = seeded
        .fit(
            &x,
            &MixtureFitOptions {
                means_init: Some(vec![0.0; 3]),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(bad.contains("means_init") && bad.contains("got 3"), "{bad}");
    Ok(())
}

#[test]
fn more_components_than_distinct_samples_is_an_error() -> Result<()> {
    let dev = Device::Cpu;
    // 40 samples, but only 3 distinct points.
    let points = [[0.0f64, 1.0], [2.0, -1.0], [5.0, 5.0]];
    let rows: Vec<f64> = (0..40).flat_map(|i| points[i % 3]).collect();
    let x = Tensor::from_vec(rows, (40, 2), &dev)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let mixture = gaussian_mixture(2, 4, GaussLayerConfig::default(), vb)?;
    let text = mixture
        .fit(&x, &MixtureFitOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("only 3 distinct samples") && text.contains("4 components"),
        "{text}"
    );
    // Three components fit.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let three = gaussian_mixture(2, 3, GaussLayerConfig::default(), vb)?;
    three.fit(&x, &MixtureFitOptions::default())?;
    Ok(())
}

#[test]
fn parameters_can_be_written_back_and_one_component_ties() -> Result<()> {
    let dev = Device::Cpu;
    let covariance = Tensor::new(
        &[[[2.0f64, 0.5], [0.5, 1.0]], [[1.0, 0.0], [0.0, 3.0]]],
        &dev,
    )?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let mixture = gaussian_mixture(2, 2, GaussLayerConfig::default(), vb)?;
    mixture.set_parameters(
        &Tensor::new(&[0.3f64, 0.7], &dev)?,
        &Tensor::new(&[[0.0f64, 1.0], [2.0, -1.0]], &dev)?,
        &covariance,
    )?;
    // Only the weights change: the mixture's own means and covariances go back in (Candle's
    // slice_set refuses a source sharing the target's storage).
    let means = mixture.means().clone();
    mixture.set_parameters(
        &Tensor::new(&[0.5f64, 0.5], &dev)?,
        &means,
        &mixture.covariances()?,
    )?;
    assert_eq!(
        host_matrix(mixture.means())?,
        vec![vec![0.0, 1.0], vec![2.0, -1.0]]
    );
    let weights = host_values(&mixture.weights()?)?;
    assert!(
        weights.iter().all(|w| (w - 0.5).abs() < 1e-12),
        "{weights:?}"
    );
    let written = host_values(&mixture.covariances()?.flatten_all()?)?;
    let expected = host_values(&covariance.flatten_all()?)?;
    for (got, want) in written.iter().zip(&expected) {
        assert!((got - want).abs() < 1e-12, "{written:?} vs {expected:?}");
    }

    // One component is tied already.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let single =
        gaussian_mixture(2, 1, GaussLayerConfig::default(), vb)?.with_tied_covariance(true)?;
    single.set_parameters(
        &Tensor::new(&[1.0f64], &dev)?,
        &Tensor::new(&[[0.5f64, 0.5]], &dev)?,
        &covariance.narrow(0, 0, 1)?,
    )?;
    assert_eq!(host_matrix(single.means())?, vec![vec![0.5, 0.5]]);
    Ok(())
}

#[test]
fn covariances_of_an_indefinite_direct_precision_are_an_error() -> Result<()> {
    // (A + Aᵀ)/2 = [[1, 2], [2, 1]]: eigenvalues 3 and −1, no covariance (it was NaN).
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let config = GaussLayerConfig::with_parameterization(Parameterization::Direct);
    let mixture = gaussian_mixture(2, 1, config, vb)?;
    let raw = varmap
        .all_vars()
        .into_iter()
        .find(|var| var.dims() == [1, 2, 2])
        .ok_or_else(|| anyhow::anyhow!("no (1, 2, 2) precision variable"))?;
    raw.set(&Tensor::new(&[[[1.0f64, 2.0], [2.0, 1.0]]], &dev)?)?;
    match mixture.covariances() {
        Err(gauss_layer::GaussError::NotPositiveDefinite { .. }) => Ok(()),
        other => panic!("expected NotPositiveDefinite, got {other:?}"),
    }
}

/// No samples: the per-sample methods give empty results of the (…) shape, as the layer's
/// `log_prob` and `responsibilities` do (they were Candle's "empty tensor for reduce"
/// errors), and `score` (so `bic`, `aic`), a mean over no samples, is an error that says
/// so, as scikit-learn refuses an empty `X`.
#[test]
fn empty_batches_give_empty_results() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let mixture = gaussian_mixture(2, 3, GaussLayerConfig::default(), vb)?;
    for dims in [vec![0, 2], vec![4, 0, 2]] {
        let x = Tensor::zeros(dims.as_slice(), DType::F64, &dev)?;
        let leading = &dims[..dims.len() - 1];
        assert_eq!(mixture.log_prob(&x)?.dims(), leading);
        assert_eq!(mixture.score_samples(&x)?.dims(), leading);
        let labels = mixture.predict(&x)?;
        assert_eq!((labels.dims(), labels.dtype()), (leading, DType::U32));
        let with_k: Vec<usize> = leading.iter().copied().chain([3]).collect();
        assert_eq!(mixture.predict_proba(&x)?.dims(), with_k.as_slice());
        for result in [mixture.score(&x), mixture.bic(&x), mixture.aic(&x)] {
            let text = result.unwrap_err().to_string();
            assert!(text.contains("at least one sample"), "{text}");
        }
    }
    Ok(())
}

/// `n_init: 0` and `kmeans_inits: 0` are each refused under their own name (both were
/// reported as `n_init`, whichever was 0).
#[test]
fn zero_starts_name_the_option_at_fault() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let mixture = gaussian_mixture(2, 2, GaussLayerConfig::default(), vb)?;
    let x = Tensor::new(
        &[[0.0f32, 0.0], [1.0, 0.5], [5.0, 5.0], [6.0, 4.5]],
        &Device::Cpu,
    )?;
    for (options, field) in [
        (
            MixtureFitOptions {
                n_init: 0,
                ..Default::default()
            },
            "`n_init`",
        ),
        (
            MixtureFitOptions {
                kmeans_inits: 0,
                ..Default::default()
            },
            "`kmeans_inits`",
        ),
    ] {
        let msg = mixture.fit(&x, &options).unwrap_err().to_string();
        assert!(msg.contains(field) && msg.contains("got 0"), "{msg}");
    }
    Ok(())
}

gauss_layer::test_device_dtypes!(
    far_away_and_infinite_samples_have_log_density_minus_infinity,
    far_away_samples
);

/// A sample so far away that every component's squared Mahalanobis distance overflows the
/// dtype (f64 from |x| ≈ 1e155, f32 from ≈ 1e20), or one holding ±∞, has log-density −∞
/// under every component, and Candle's `log_sum_exp` made the mixture's `−∞ − (−∞)` NaN:
/// `log_prob` [NaN, −2.17] for the first two rows below, and `score` NaN. Now −∞, as SciPy's
/// `logsumexp` (and scikit-learn's `score_samples`) give; the other rows are unchanged.
/// Expected value of row 1, x = (0.5, 0.5), in closed form: with m2₁ = 0.5/1.75 under
/// Σ₁ = [[1, .5], [.5, 2]] (det 1.75) and m2₂ = 0.5 under I,
/// `ln(½·e^{−m2₁/2}/(2π√1.75) + ½·e^{−m2₂/2}/(2π))` = −2.1704875530852283 (SciPy
/// `logsumexp` of `multivariate_normal.logpdf` agrees to the last digit).
fn far_away_samples(dtype: DType, dev: &Device) -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, dev);
    let mixture = gaussian_mixture(2, 2, GaussLayerConfig::default(), vb)?;
    let host = |values: &[f64], shape: &[usize]| -> Result<Tensor> {
        on_device(
            &Tensor::from_slice(values, shape, &Device::Cpu)?,
            dtype,
            dev,
        )
    };
    mixture.set_parameters(
        &host(&[0.5, 0.5], &[2])?,
        &host(&[0.0, 0.0, 1.0, 1.0], &[2, 2])?,
        &host(&[1.0, 0.5, 0.5, 2.0, 1.0, 0.0, 0.0, 1.0], &[2, 2, 2])?,
    )?;
    // |x|² · λ_max(P) overflows: f64's largest is 1.8e308, f32's 3.4e38.
    let far = if dtype == DType::F64 { 1e155 } else { 1e20 };
    let inf = f64::INFINITY;
    let x = host(
        &[far, 0.0, 0.5, 0.5, inf, 0.0, -inf, 1.0, 0.0, -far],
        &[5, 2],
    )?;
    let log_prob = host_values(&mixture.log_prob(&x)?)?;
    let expected = -2.1704875530852283;
    assert!(
        (log_prob[1] - expected).abs() < tolerance(dtype),
        "{dtype:?}: {log_prob:?}"
    );
    for row in [0, 2, 3, 4] {
        assert_eq!(log_prob[row], -inf, "{dtype:?} row {row}: {log_prob:?}");
    }
    assert_eq!(mixture.score(&x)?, -inf, "{dtype:?}");
    // The rows every component gives −∞ have no defined responsibilities (NaN, as
    // scikit-learn's `predict_proba`); the finite row's still sum to 1.
    let proba = host_matrix(&mixture.predict_proba(&x)?)?;
    assert!((proba[1][0] + proba[1][1] - 1.0).abs() < tolerance(dtype));
    assert!(
        proba[0][0].is_nan() && proba[2][1].is_nan(),
        "{dtype:?}: {proba:?}"
    );
    // `predict` does not check its input (documented): the finite row gets its component,
    // the others some component below K, never an error or an out-of-range label.
    let labels = mixture
        .predict(&x)?
        .to_device(&Device::Cpu)?
        .to_vec1::<u32>()?;
    assert_eq!(labels[1], 1, "{dtype:?}: {labels:?}");
    assert!(labels.iter().all(|&l| l < 2), "{dtype:?}: {labels:?}");
    // The documented way to find the rows `predict` cannot place: a non-finite `log_prob`
    // (−∞ for these, NaN for a row holding NaN).
    let nan = host(&[f64::NAN, 0.0], &[1, 2])?;
    assert!(host_values(&mixture.log_prob(&nan)?)?[0].is_nan());
    Ok(())
}
