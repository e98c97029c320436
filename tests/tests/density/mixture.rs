//! `GaussianMixture::fit` against scikit-learn, recorded by
//! `tools/density/mixture_reference.py` in `tests/data/density/mixture_*.safetensors`:
//! `sklearn_score_<type>` is `GaussianMixture(K, covariance_type=type, random_state=0)`'s
//! `score` with its defaults (the target: ours at most 1e-3 nats per sample below it), and
//! `sklearn_best_<type>` the best of 10 tightly converged starts (the optimum EM reaches).
//! Then: the fitted mixture is a normal trainable layer in its VarMap, and its densities
//! agree with the losses crate and with Bayes' rule.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use gauss_layer::{gaussian_mixture, MixtureFitOptions, PrecisionConfig, MIXTURE_LOGITS_NAME};
use gauss_layer::{GaussLayerConfig, Parameterization};
use gauss_losses::{mixture_nll, Reduction};

use crate::common::{get, load, scalar};

const CASES: [(&str, usize); 3] = [
    ("mixture_d2_k3_separated", 3),
    ("mixture_d2_k3_overlapping", 3),
    ("mixture_d10_k4_overlapping", 4),
];

fn sklearn_type(parameterization: Parameterization) -> &'static str {
    match parameterization {
        Parameterization::Diag => "diag",
        Parameterization::Sphere => "spherical",
        _ => "full",
    }
}

#[test]
fn fit_reaches_scikit_learn_for_every_parameterization() -> Result<()> {
    for (name, k) in CASES {
        let file = load(name)?;
        let x = get(&file, "x")?;
        let dim = x.dim(1)?;
        for parameterization in Parameterization::ALL {
            // lowrank at full rank holds every precision: EM alone reaches sklearn's full fit
            // (below full rank, see `low_rank_below_full_rank_beats_diag`).
            let parameterization = match parameterization {
                Parameterization::LowRank { .. } => Parameterization::LowRank { rank: dim },
                other => other,
            };
            let t = sklearn_type(parameterization);
            let (target, best) = (
                scalar(&file, &format!("sklearn_score_{t}"))?,
                scalar(&file, &format!("sklearn_best_{t}"))?,
            );
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
            let config = GaussLayerConfig::with_parameterization(parameterization);
            let mixture = gaussian_mixture(x.dim(1)?, k, config, vb)?;
            let fit = mixture.fit(x, &MixtureFitOptions::default())?;
            let what = format!(
                "{name} {parameterization}: ours {} sklearn {target} best {best}",
                fit.mean_log_likelihood
            );
            assert!(fit.converged, "{what}: EM did not converge");
            assert!(
                fit.mean_log_likelihood >= target - 1e-3,
                "{what}: below sklearn"
            );
            // No better than the optimum (a sanity bound on the likelihood itself).
            assert!(
                fit.mean_log_likelihood <= best + 1e-9,
                "{what}: above the optimum"
            );
            // The reported value is the mixture's mean log-density of the data.
            let mean = mixture.log_prob(x)?.mean_all()?.to_scalar::<f64>()?;
            assert!(
                (mean - fit.mean_log_likelihood).abs() < 1e-12,
                "{what}: {mean}"
            );
            // Weights are a distribution, each component keeps a real share.
            let weights = mixture.weights()?.to_vec1::<f64>()?;
            assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(
                weights.iter().all(|&w| w > 0.05),
                "{what}: weights {weights:?}"
            );
        }
    }
    Ok(())
}

/// After `fit` the mixture's tensors are the VarMap's variables: gradients reach all three,
/// an optimizer step moves them, and the losses crate's mixture NLL of the same layer and
/// logits is `−log_prob`.
#[test]
fn fitted_mixture_is_a_trainable_layer_in_its_varmap() -> Result<()> {
    let file = load("mixture_d2_k3_overlapping")?;
    let x = get(&file, "x")?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let mixture = gaussian_mixture(2, 3, GaussLayerConfig::default(), vb.pp("mix"))?;
    let fit = mixture.fit(x, &MixtureFitOptions::default())?;

    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    assert_eq!(
        names,
        ["mix.center", "mix.mixture_logits", "mix.precision_factor"]
    );
    // The VarMap holds the fitted values (the same storage as the mixture's tensors).
    let center = data.get("mix.center").context("center")?;
    assert_eq!(center.to_vec2::<f64>()?, mixture.means().to_vec2::<f64>()?);
    let logits = data
        .get(&format!("mix.{MIXTURE_LOGITS_NAME}"))
        .context("logits")?;
    assert_eq!(logits.to_vec1::<f64>()?, mixture.logits().to_vec1::<f64>()?);

    let nll = mixture_nll(mixture.layer(), x, mixture.logits(), Reduction::None)?;
    let err = (nll + mixture.log_prob(x)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert!(err < 1e-12, "mixture_nll vs log_prob: {err:e}");

    let loss = mixture.log_prob(x)?.mean_all()?.neg()?;
    let grads = loss.backward()?;
    for (name, var) in &data {
        let grad = grads
            .get(var.as_tensor())
            .with_context(|| format!("no gradient for {name}"))?;
        let largest = grad.abs()?.max_all()?.to_scalar::<f64>()?;
        // At the EM optimum the gradient nearly vanishes (EM met its tolerance).
        assert!(
            largest.is_finite() && largest < 1e-2,
            "{name}: |grad| {largest}"
        );
    }
    let before = mixture.means().to_vec2::<f64>()?;
    let mut sgd = candle_nn::SGD::new(varmap.all_vars(), 1.0)?;
    let shifted = (loss + mixture.means().sum_all()?)?; // a gradient of 1 on every mean entry
    sgd.backward_step(&shifted)?;
    let after = mixture.means().to_vec2::<f64>()?;
    assert!(before
        .iter()
        .flatten()
        .zip(after.iter().flatten())
        .all(|(b, a)| (b - a).abs() > 0.5));
    assert!(fit.converged);
    Ok(())
}

/// Responsibilities are Bayes' rule over the components' log-densities, rows summing to 1,
/// for inputs of any (…, d) shape.
#[test]
fn responsibilities_are_posteriors() -> Result<()> {
    let file = load("mixture_d2_k3_separated")?;
    let x = get(&file, "x")?.narrow(0, 0, 24)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let mixture = gaussian_mixture(2, 3, GaussLayerConfig::default(), vb)?;
    // The k-means++ start alone already sits near the optimum on well-separated clusters.
    let all = get(&file, "x")?;
    mixture.init_from_kmeans(all, &MixtureFitOptions::default())?;
    let start = mixture.log_prob(all)?.mean_all()?.to_scalar::<f64>()?;
    let best = scalar(&file, "sklearn_best_full")?;
    assert!(
        start > best - 1e-2 && start <= best + 1e-9,
        "start {start} vs best {best}"
    );
    mixture.fit(all, &MixtureFitOptions::default())?;
    let resp = mixture.responsibilities(&x.reshape((4, 6, 2))?)?;
    assert_eq!(resp.dims(), &[4, 6, 3]);
    let resp = resp.reshape((24, 3))?.to_vec2::<f64>()?;
    let log_p = mixture.layer().log_prob(&x)?.to_vec2::<f64>()?;
    let weights = mixture.weights()?.to_vec1::<f64>()?;
    for (row, lp) in resp.iter().zip(&log_p) {
        let joint: Vec<f64> = lp.iter().zip(&weights).map(|(l, w)| l.exp() * w).collect();
        let total: f64 = joint.iter().sum();
        for (r, j) in row.iter().zip(&joint) {
            assert!((r - j / total).abs() < 1e-12, "{r} vs {}", j / total);
        }
    }
    let density = mixture.log_prob(&x)?.to_vec1::<f64>()?;
    for (d, lp) in density.iter().zip(&log_p) {
        let total: f64 = lp.iter().zip(&weights).map(|(l, w)| l.exp() * w).sum();
        assert!((d - total.ln()).abs() < 1e-12 * d.abs());
    }
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let mixture = gaussian_mixture(2, 3, GaussLayerConfig::default(), vb)?;
    let options = MixtureFitOptions::default();
    let few = Tensor::zeros((2, 2), DType::F64, &Device::Cpu)?;
    let text = mixture.fit(&few, &options).unwrap_err().to_string();
    assert!(text.contains("N >= 3"), "{text}");
    let wide = Tensor::zeros((10, 3), DType::F64, &Device::Cpu)?;
    let text = mixture.fit(&wide, &options).unwrap_err().to_string();
    assert!(text.contains("(…, 2)"), "{text}");
    let nan = Tensor::new(&[[f64::NAN, 0.0], [1.0, 2.0], [3.0, 4.0]], &Device::Cpu)?;
    let text = mixture.fit(&nan, &options).unwrap_err().to_string();
    assert!(text.contains("non-finite"), "{text}");
    let f32x = Tensor::zeros((10, 2), DType::F32, &Device::Cpu)?;
    assert!(mixture.fit(&f32x, &options).is_err());
    let bad = MixtureFitOptions {
        tol: 0.0,
        ..Default::default()
    };
    assert!(mixture
        .fit(&get(&load("mixture_d2_k3_separated")?, "x")?.clone(), &bad)
        .is_err());
    Ok(())
}

/// With a width floor σ the family is {Σ ⪰ σ² I}; the M-step raises eigenvalues below σ²
/// to σ², the constrained maximizer, so EM alone reaches the constrained optimum: gradient
/// refinement from there finds nothing to add, and the floor costs likelihood.
#[test]
fn width_floor_is_fitted_exactly_by_em() -> Result<()> {
    let file = load("mixture_d2_k3_separated")?;
    let x = get(&file, "x")?;
    let fit = |width_floor: Option<f64>, refine_steps: Option<usize>| -> Result<f64> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let config = GaussLayerConfig {
            precision: PrecisionConfig {
                width_floor,
                ..Default::default()
            },
            ..Default::default()
        };
        let mixture = gaussian_mixture(2, 3, config, vb)?;
        let options = MixtureFitOptions {
            refine_steps,
            ..Default::default()
        };
        let fit = mixture.fit(x, &options)?;
        assert!(fit.converged);
        assert_eq!(fit.refine_steps, refine_steps.unwrap_or(0));
        Ok(fit.mean_log_likelihood)
    };
    let free = fit(None, None)?;
    let floored = fit(Some(0.6), None)?;
    let refined = fit(Some(0.6), Some(200))?;
    assert!(
        floored < free - 1e-3,
        "the floor binds: {floored} vs {free}"
    );
    assert!(
        (refined - floored).abs() < 1e-6,
        "refinement moved: {refined} vs {floored}"
    );
    Ok(())
}

/// `set_parameters` writes a known mixture in place; refinement needs variables.
#[test]
fn set_parameters_and_refinement_of_plain_tensors() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let mixture = gaussian_mixture(2, 2, GaussLayerConfig::default(), vb)?;
    let weights = Tensor::new(&[1.0f64, 3.0], &dev)?;
    let means = Tensor::new(&[[0.0f64, 0.0], [3.0, -1.0]], &dev)?;
    let covariances = Tensor::new(
        &[[[1.0f64, 0.2], [0.2, 0.5]], [[2.0, 0.0], [0.0, 2.0]]],
        &dev,
    )?;
    mixture.set_parameters(&weights, &means, &covariances)?;
    let w = mixture.weights()?.to_vec1::<f64>()?;
    assert!(
        (w[0] - 0.25).abs() < 1e-15 && (w[1] - 0.75).abs() < 1e-15,
        "{w:?}"
    );
    let err = (mixture.covariances()? - &covariances)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert!(err < 1e-12, "{err:e}");
    // The VarMap sees the values written.
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    assert_eq!(
        data.get("center").context("center")?.to_vec2::<f64>()?,
        means.to_vec2::<f64>()?
    );

    // A mixture of plain tensors fits by EM but cannot be refined by gradients.
    let layer = gauss_layer::GaussLayer::from_covariance(
        &means,
        &covariances,
        GaussLayerConfig::default(),
    )?;
    let plain = gauss_layer::GaussianMixture::new(layer, Tensor::zeros(2, DType::F64, &dev)?)?;
    let x = mixture.sample(
        500,
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1),
    )?;
    plain.fit(&x, &MixtureFitOptions::default())?;
    let text = plain
        .fit(
            &x,
            &MixtureFitOptions {
                refine_steps: Some(5),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(text.contains("VarMap"), "{text}");
    Ok(())
}

/// lowrank:2 in 10 dimensions holds diag (U = 0) and more: EM over the diagonal members,
/// then over the whole family (no gradient refinement), ends at least at sklearn's diag fit
/// and at most at its full optimum.
#[test]
fn low_rank_below_full_rank_beats_diag() -> Result<()> {
    let file = load("mixture_d10_k4_overlapping")?;
    let x = get(&file, "x")?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let config = GaussLayerConfig::with_parameterization(Parameterization::LowRank { rank: 2 });
    let mixture = gaussian_mixture(10, 4, config, vb)?;
    let fit = mixture.fit(x, &MixtureFitOptions::default())?;
    let (diag, best_full) = (
        scalar(&file, "sklearn_score_diag")?,
        scalar(&file, "sklearn_best_full")?,
    );
    assert!(fit.converged && fit.refine_steps == 0, "{fit:?}");
    assert!(
        fit.mean_log_likelihood >= diag - 1e-3 && fit.mean_log_likelihood <= best_full + 1e-9,
        "lowrank:2 {} vs sklearn diag {diag}, full optimum {best_full}",
        fit.mean_log_likelihood
    );
    Ok(())
}

/// f16 and bf16 mixtures fit as f64 does, up to their own rounding: the fit sums over
/// samples in f32 (Candle sums a half dtype in itself: bf16 counts stop growing at 256 and
/// f16 sums of squares overflow past 65504, which stalled bf16 fits at equal weights and a
/// mean log-likelihood of −1.0 for −3.3, and refused these 6000 f16 samples as non-finite).
#[test]
fn half_precision_fits_sum_in_f32() -> Result<()> {
    let dev = Device::Cpu;
    // The README's two normals, 6000 draws.
    let means = Tensor::new(&[[-4.0f64, 0.0], [4.0, 1.0]], &dev)?;
    let covariances = Tensor::new(
        &[[[1.0f64, 0.5], [0.5, 2.0]], [[0.5, 0.0], [0.0, 0.5]]],
        &dev,
    )?;
    let truth = gauss_layer::GaussLayer::from_covariance(
        &means,
        &covariances,
        GaussLayerConfig::default(),
    )?;
    let truth = gauss_layer::GaussianMixture::new(truth, Tensor::zeros(2, DType::F64, &dev)?)?;
    let x = truth.sample(
        6000,
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0),
    )?;
    let fit = |dtype: DType, parameterization: Parameterization| -> Result<(f64, f64, Vec<f64>)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &dev);
        let config = GaussLayerConfig::with_parameterization(parameterization);
        let mixture = gaussian_mixture(2, 2, config, vb)?;
        let x = x.to_dtype(dtype)?;
        let fit = mixture.fit(&x, &MixtureFitOptions::default())?;
        let weights = gauss_tests::host_values(&mixture.weights()?)?;
        Ok((fit.mean_log_likelihood, mixture.score(&x)?, weights))
    };
    for parameterization in [Parameterization::Cholesky, Parameterization::Diag] {
        let (exact, _, exact_weights) = fit(DType::F64, parameterization)?;
        // The tolerances are the half dtypes' rounding of log-densities near −3 to −10.
        for (dtype, tol) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
            let (fitted, score, weights) = fit(dtype, parameterization)?;
            let what =
                format!("{parameterization} {dtype:?}: {fitted} (score {score}) vs f64 {exact}");
            assert!((fitted - exact).abs() < tol, "{what}");
            assert!((score - exact).abs() < tol, "{what}");
            for (w, e) in weights.iter().zip(&exact_weights) {
                assert!(
                    (w - e).abs() < 1e-2,
                    "{what}: weights {weights:?} vs {exact_weights:?}"
                );
            }
        }
    }
    Ok(())
}
