//! scikit-learn's `covariance_type='tied'` against a tied mixture
//! (`GaussianMixture::with_tied_covariance`). The expected values were printed by
//! `python3 tools/density/tied_reference.py` (scikit-learn 1.9.1, f64):
//! - EM from a fixed start: `GaussianMixture(3, covariance_type='tied', weights_init=WEIGHTS,
//!   means_init=MEANS, precisions_init=inv(COVARIANCE), tol=0, max_iter=5, reg_covar=1e-6)`
//!   fitted on `X` (exactly 5 EM iterations: `tol=0` never stops it), then its `weights_`,
//!   `means_`, `covariances_`, `score`, `bic`, `aic`, `predict`, `predict_proba`,
//!   `score_samples` on `X`. Our fit starts from the same parameters (`set_parameters`, then
//!   `warm_start`) and runs the same 5 EM iterations (same E-step, same M-step including the
//!   10·eps on the counts), so the results agree to rounding: 1e-9 relative.
//! - The mixture files of `tests/data/density`: scikit-learn's `score` with its defaults
//!   (`random_state=0`; the target, ours at most 1e-3 below) and the best of 10 tightly
//!   converged starts (tol 1e-10; the optimum, ours at most 1e-9 above).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::{gaussian_mixture, GaussLayerConfig, MixtureFitOptions, Parameterization};

use crate::common::{get, load};

const X: [[f64; 2]; 30] = [
    [0.1, 0.2],
    [0.9, -0.4],
    [-0.6, 0.5],
    [0.3, 1.1],
    [-0.2, -0.8],
    [1.4, 0.3],
    [0.7, 0.9],
    [-1.1, -0.2],
    [0.05, -0.35],
    [0.6, 0.15],
    [1.3, 1.0],
    [2.1, 0.3],
    [0.7, 1.8],
    [1.9, 2.3],
    [2.6, 1.2],
    [1.0, 0.1],
    [1.5, 1.5],
    [2.3, 0.8],
    [1.1, 2.7],
    [1.7, 0.6],
    [-1.1, 1.5],
    [-1.8, 0.6],
    [-0.4, 2.3],
    [-1.5, 2.7],
    [-0.8, 0.8],
    [-2.2, 2.0],
    [-0.2, 1.2],
    [-1.3, 1.4],
    [-0.6, 3.0],
    [-2.0, 0.3],
];
const WEIGHTS: [f64; 3] = [0.5, 0.3, 0.2];
const MEANS: [[f64; 2]; 3] = [[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0]];
const COVARIANCE: [[f64; 2]; 2] = [[1.5, 0.4], [0.4, 1.0]];
const STEPS: usize = 5;

// scikit-learn's results after the 5 iterations.
const FIT_WEIGHTS: [f64; 3] = [0.37740772404010714, 0.3220137979176168, 0.300578478042276];
const FIT_MEANS: [[f64; 2]; 3] = [
    [0.3488604413368077, 0.419562979561909],
    [1.2530703143836004, 0.9945056757759996],
    [-1.0651745868511784, 1.6792369091280708],
];
const FIT_COVARIANCE: [[f64; 2]; 2] = [
    [0.8861624051345075, 0.17619248809226357],
    [0.1761924880922635, 0.6779975357383305],
];
const SCORE: f64 = -3.018683831934023;
const BIC: f64 = 218.5342011143251;
const AIC: f64 = 203.12102991604138;
const PREDICT: [u32; 30] = [
    0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 2, 2, 2,
];
const PROBA_1: [f64; 30] = [
    0.24243011072320583,
    0.32039075947232915,
    0.1363274465723859,
    0.3602930192573852,
    0.1201743483927353,
    0.5313809139167148,
    0.4523675527496685,
    0.06954033939434033,
    0.1832097537539903,
    0.3331053576519599,
    0.6099299154212617,
    0.6807128242425489,
    0.4980998566253604,
    0.8414834212811466,
    0.8529079920679749,
    0.4114586456562433,
    0.7125489873758323,
    0.7760885263272986,
    0.5565688781749932,
    0.6408752540975236,
    0.020715970363807915,
    0.011959712410212897,
    0.04029724578786,
    0.0008270779069889979,
    0.09289072118700255,
    0.0003599085336632244,
    0.20498249684750477,
    0.013949842910474991,
    0.006944334292113979,
    0.010687206752221175,
];
const SCORE_SAMPLES: [f64; 30] = [
    -2.2713809141176027,
    -2.9857263631804165,
    -2.6469364080180564,
    -2.2491259417253566,
    -3.5250768859257353,
    -2.4769905878027005,
    -2.069294854795964,
    -3.5586581115453577,
    -2.7593574379865182,
    -2.228299038571812,
    -2.1966214526950583,
    -3.28891028115005,
    -2.8171332995466716,
    -3.8303839756998794,
    -3.5573326038870596,
    -2.3920608094771207,
    -2.547258690238877,
    -3.1808071281250125,
    -4.460431657958026,
    -2.5392532197618998,
    -2.673784765059771,
    -3.558019431867618,
    -3.0968558455887942,
    -3.815604759017106,
    -2.727247375454936,
    -3.7142747616334737,
    -2.486355540841277,
    -2.7436228851903035,
    -4.039917122117735,
    -4.1237928090405145,
];

/// (file, K, scikit-learn's default `score`, the best of 10 tightly converged starts).
const FILES: [(&str, usize, f64, f64); 3] = [
    (
        "mixture_d2_k3_separated",
        3,
        -4.132640531064053,
        -4.132640531055514,
    ),
    (
        "mixture_d2_k3_overlapping",
        3,
        -3.2685605038561936,
        -3.2660855642802114,
    ),
    (
        "mixture_d10_k4_overlapping",
        4,
        -15.0421201274039,
        -15.035583492217159,
    ),
];

fn close(got: f64, expected: f64, what: &str) {
    let err = (got - expected).abs() / expected.abs().max(1.0);
    assert!(
        err < 1e-9,
        "{what}: got {got}, expected {expected} ({err:e})"
    );
}

fn tied_mixture(
    d: usize,
    k: usize,
    parameterization: Parameterization,
    varmap: &VarMap,
) -> Result<gauss_layer::GaussianMixture> {
    let vb = VarBuilder::from_varmap(varmap, DType::F64, &Device::Cpu);
    let config = GaussLayerConfig::with_parameterization(parameterization);
    Ok(gaussian_mixture(d, k, config, vb)?.with_tied_covariance(true)?)
}

/// The K covariances of a tied mixture are one matrix, bit for bit.
fn assert_shared(mixture: &gauss_layer::GaussianMixture) -> Result<()> {
    let covariances = mixture.covariances()?.to_vec3::<f64>()?;
    assert!(
        covariances.iter().all(|c| c == &covariances[0]),
        "{covariances:?}"
    );
    Ok(())
}

#[test]
fn tied_em_matches_scikit_learn_from_a_fixed_start() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::new(&X, &dev)?;
    let varmap = VarMap::new();
    let mixture = tied_mixture(2, 3, Parameterization::Cholesky, &varmap)?;
    assert!(mixture.is_tied());
    mixture.set_parameters(
        &Tensor::new(&WEIGHTS, &dev)?,
        &Tensor::new(&MEANS, &dev)?,
        &Tensor::new(&[COVARIANCE; 3], &dev)?,
    )?;
    let fit = mixture.fit(
        &x,
        &MixtureFitOptions {
            warm_start: true,
            max_em_steps: STEPS,
            tol: 1e-300,
            ..Default::default()
        },
    )?;
    assert_eq!((fit.em_steps, fit.converged), (STEPS, false));
    for (got, expected) in mixture.weights()?.to_vec1::<f64>()?.iter().zip(FIT_WEIGHTS) {
        close(*got, expected, "weights");
    }
    for (got, expected) in mixture.means().to_vec2::<f64>()?.iter().zip(FIT_MEANS) {
        close(got[0], expected[0], "means");
        close(got[1], expected[1], "means");
    }
    assert_shared(&mixture)?;
    let covariance = &mixture.covariances()?.to_vec3::<f64>()?[0];
    for i in 0..2 {
        for j in 0..2 {
            close(covariance[i][j], FIT_COVARIANCE[i][j], "covariance");
        }
    }
    // K·d means + d(d + 1)/2 covariance + K − 1 weights.
    assert_eq!(mixture.num_parameters(), 6 + 3 + 2);
    close(mixture.score(&x)?, SCORE, "score");
    close(fit.mean_log_likelihood, SCORE, "fit's mean log-likelihood");
    close(mixture.bic(&x)?, BIC, "bic");
    close(mixture.aic(&x)?, AIC, "aic");
    assert_eq!(mixture.predict(&x)?.to_vec1::<u32>()?, PREDICT.to_vec());
    let proba = mixture.predict_proba(&x)?.to_vec2::<f64>()?;
    for (row, expected) in proba.iter().zip(PROBA_1) {
        close(row[1], expected, "predict_proba");
    }
    let samples = mixture.score_samples(&x)?.to_vec1::<f64>()?;
    for (got, expected) in samples.iter().zip(SCORE_SAMPLES) {
        close(*got, expected, "score_samples");
    }
    Ok(())
}

#[test]
fn tied_fit_reaches_scikit_learn() -> Result<()> {
    for (name, k, target, best) in FILES {
        let file = load(name)?;
        let x = get(&file, "x")?;
        let varmap = VarMap::new();
        let mixture = tied_mixture(x.dim(1)?, k, Parameterization::Cholesky, &varmap)?;
        let fit = mixture.fit(x, &MixtureFitOptions::default())?;
        let what = format!(
            "{name}: ours {} sklearn {target} best {best}",
            fit.mean_log_likelihood
        );
        assert!(fit.converged, "{what}: EM did not converge");
        assert!(
            fit.mean_log_likelihood >= target - 1e-3,
            "{what}: below sklearn"
        );
        assert!(
            fit.mean_log_likelihood <= best + 1e-9,
            "{what}: above the optimum"
        );
        assert_shared(&mixture)?;
    }
    Ok(())
}

/// A tied fit saved as its tensors and loaded back scores the same; the tied families of
/// diag, sphere and lowrank; the errors of tied mixtures.
#[test]
fn tied_round_trip_families_and_errors() -> Result<()> {
    let dev = Device::Cpu;
    let file = load("mixture_d2_k3_overlapping")?;
    let x = get(&file, "x")?;
    let varmap = VarMap::new();
    let mixture = tied_mixture(2, 3, Parameterization::Cholesky, &varmap)?;
    mixture.fit(x, &MixtureFitOptions::default())?;
    let dir = gauss_tests::temp_dir("tied-mixture")?;
    let path = dir.join("tied.safetensors");
    varmap.save(&path)?;
    let tensors = candle_core::safetensors::load(&path, &dev)?;
    let vb = VarBuilder::from_tensors(tensors, DType::F64, &dev);
    let loaded =
        gaussian_mixture(2, 3, GaussLayerConfig::default(), vb)?.with_tied_covariance(true)?;
    assert_eq!(loaded.score(x)?, mixture.score(x)?);
    assert_eq!(loaded.bic(x)?, mixture.bic(x)?);
    assert_shared(&loaded)?;
    std::fs::remove_dir_all(&dir)?;

    // diag, sphere, lowrank: one shared covariance in the family, counted once (lowrank:1
    // in 2-D: the diagonal and the factor, d + d·r = 4 values, capped at the full 3).
    for (parameterization, covariance_parameters) in [
        (Parameterization::Diag, 2),
        (Parameterization::Sphere, 1),
        (Parameterization::LowRank { rank: 1 }, 3),
    ] {
        let varmap = VarMap::new();
        let tied = tied_mixture(2, 3, parameterization, &varmap)?;
        let fit = tied.fit(x, &MixtureFitOptions::default())?;
        assert!(
            fit.converged && fit.mean_log_likelihood.is_finite(),
            "{parameterization}: {fit:?}"
        );
        assert_shared(&tied)?;
        assert_eq!(tied.num_parameters(), 6 + covariance_parameters + 2);
        let untied = tied.with_tied_covariance(false)?;
        assert_eq!(untied.num_parameters(), 6 + 3 * covariance_parameters + 2);
    }

    let unequal = mixture
        .set_parameters(
            &Tensor::new(&WEIGHTS, &dev)?,
            &Tensor::new(&MEANS, &dev)?,
            &Tensor::new(&[COVARIANCE, COVARIANCE, [[1.5, 0.4], [0.4, 1.1]]], &dev)?,
        )
        .unwrap_err()
        .to_string();
    assert!(
        unequal.contains("share one covariance") && unequal.contains("covariance 2"),
        "{unequal}"
    );
    let refine = mixture
        .fit(
            x,
            &MixtureFitOptions {
                refine_steps: Some(10),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        refine.contains("refine_steps") && refine.contains("untie"),
        "{refine}"
    );
    Ok(())
}
