//! `--components K`: a Gaussian mixture fitted like scikit-learn's `GaussianMixture`
//! with its default `init_params='kmeans'` (k-means start on the data, EM, optional gradient
//! refinement; see `gauss_layer::GaussianMixture`), reported as one JSON line.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::{gaussian_mixture, GaussianMixture, MixtureFitOptions, PrecisionConfig};
use gauss_layer::{GaussLayer, GaussLayerConfig, Parameterization};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Settings of the mixture fit (from the command line).
pub struct MixtureArgs {
    /// Number of components K.
    pub components: usize,
    /// Parameterization of every component's precision.
    pub parameterization: Parameterization,
    /// One covariance shared by all components (scikit-learn's `tied`).
    pub tied: bool,
    /// The fit's options (EM, k-means, refinement, seed).
    pub options: MixtureFitOptions,
    /// Where to save the fitted mixture's tensors (safetensors), if anywhere.
    pub out: Option<std::path::PathBuf>,
}

/// `n` samples in `dim` dimensions from a random mixture of `k` well-separated normals
/// (means 6 apart on average, covariances random but well conditioned), fixed by `seed`.
///
/// # Shapes
/// → (n, dim), f64
pub fn synthetic(k: usize, dim: usize, n: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let means: Vec<f64> = (0..k * dim).map(|_| rng.random_range(-6.0..6.0)).collect();
    let mut covariances = Vec::with_capacity(k * dim * dim);
    for _ in 0..k {
        // A Aᵀ/d + 0.1 I with A uniform in [−1, 1]: positive definite, moderate spread.
        let a: Vec<f64> = (0..dim * dim)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        for i in 0..dim {
            for j in 0..dim {
                let dot: f64 = (0..dim).map(|m| a[i * dim + m] * a[j * dim + m]).sum();
                covariances.push(dot / dim as f64 + if i == j { 0.1 } else { 0.0 });
            }
        }
    }
    let truth = GaussLayer::from_covariance(
        &Tensor::from_vec(means, (k, dim), device)?,
        &Tensor::from_vec(covariances, (k, dim, dim), device)?,
        GaussLayerConfig::default(),
    )?;
    let logits = Tensor::zeros(k, DType::F64, device)?;
    let mixture = GaussianMixture::new(truth, logits)?;
    Ok(mixture.sample(n, &mut rng)?)
}

/// Fits the mixture to `x` (N, d) and returns the JSON summary: `mean_log_likelihood`
/// (nats per sample, scikit-learn's `score`), `weights`, `means`, `covariances`, `steps`
/// (EM iterations plus refinement steps), `seconds` (the fit's wall time), and details,
/// among them `factor_diag_floor`, the config's floor scaled to the data (see
/// `relative_factor_diag_floor`), which loading the saved tensors back needs.
pub fn run(x: &Tensor, source: &str, args: &MixtureArgs) -> Result<Value> {
    let (n, d) = x.dims2()?;
    let started = Instant::now();
    let varmap = VarMap::new();
    // f64: fit-gaussian runs on the CPU (`main` fixes the device), in f64 like scikit-learn.
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, x.device());
    let factor_diag_floor = relative_factor_diag_floor(x)?;
    let config = GaussLayerConfig {
        precision: PrecisionConfig {
            parameterization: args.parameterization,
            factor_diag_floor,
            ..Default::default()
        },
        ..Default::default()
    };
    let mixture =
        gaussian_mixture(d, args.components, config, vb)?.with_tied_covariance(args.tied)?;
    let fit = mixture
        .fit(x, &args.options)
        .with_context(|| format!("fitting {} components to {source}", args.components))?;
    let seconds = started.elapsed().as_secs_f64();

    eprintln!(
        "{source}: {n} samples in {d} dimensions, {} {}{} components: mean log-likelihood {:.9} after {} k-means, {} EM{} and {} refinement steps ({seconds:.3} s)",
        args.components,
        args.parameterization,
        if args.tied { " tied" } else { "" },
        fit.mean_log_likelihood,
        fit.kmeans_steps,
        fit.em_steps,
        if fit.converged { " (converged)" } else { "" },
        fit.refine_steps,
    );
    let summary = json!({
        // `lowrank:R`, not `lowrank`: runs of two ranks stay apart.
        "param": args.parameterization.to_string(),
        "data": source,
        "samples": n,
        "dim": d,
        "components": args.components,
        "tied": args.tied,
        // The saved cholesky tensors mean this mixture only under this floor.
        "factor_diag_floor": factor_diag_floor,
        "mean_log_likelihood": fit.mean_log_likelihood,
        "weights": mixture.weights()?.to_vec1::<f64>()?,
        "means": mixture.means().to_vec2::<f64>()?,
        "covariances": mixture.covariances()?.to_vec3::<f64>()?,
        "steps": fit.em_steps + fit.refine_steps,
        "kmeans_steps": fit.kmeans_steps,
        "em_steps": fit.em_steps,
        "refine_steps": fit.refine_steps,
        "converged": fit.converged,
        "seconds": seconds,
    });
    // A fit that is not finite is an error, and is not saved (as the one-Gaussian mode).
    crate::checks::finite_summary(&summary)?;
    if let Some(path) = &args.out {
        save(&varmap, path)?;
        eprintln!("saved the mixture's tensors to {}", path.display());
    }
    Ok(summary)
}

/// cholesky's `factor_diag_floor` relative to the data's scale: the default 1e-6 divided by
/// the largest standard deviation of a column when that exceeds 1. The floor keeps every
/// Cholesky diagonal of P above it, which caps the variances near 1/floor²; scaled so, the
/// cap sits at least 1e12 above the data's largest variance whatever the unit of measurement
/// (data × 1e7 fits as data does). It is never raised: on data × 1e-7 `reg_covar` (1e-6,
/// absolute, as scikit-learn's) sets the variances, far above the data's own.
fn relative_factor_diag_floor(x: &Tensor) -> Result<f64> {
    let default = GaussLayerConfig::default().precision.factor_diag_floor;
    let centered = x.broadcast_sub(&x.mean_keepdim(0)?)?;
    let largest_variance = centered
        .sqr()?
        .mean(0)?
        .max(0)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let std = largest_variance.sqrt();
    Ok(if std.is_finite() && std > 1.0 {
        default / std
    } else {
        default
    })
}

/// Saves the mixture's variables (`center`, the precision tensor, `mixture_logits`) as
/// safetensors through the library's atomic write (temporary file removed on error, debris
/// of killed runs cleaned by the next write), so an interrupted save never destroys a
/// previous file. Load it back with
/// `gaussian_mixture(d, K, config, VarBuilder::from_mmaped_safetensors(..))`, `config`
/// holding the run's parameterization and, as `precision.factor_diag_floor`, the summary's
/// `factor_diag_floor` (cholesky maps its raw tensor through that floor, and the run scales
/// it to the data: with the default floor the tensors of a fit to data of standard
/// deviation above 1 mean other covariances).
fn save(varmap: &VarMap, path: &Path) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    let mut named: Vec<(&str, &Tensor)> = data
        .iter()
        .map(|(name, var)| (name.as_str(), var.as_tensor()))
        .collect();
    named.sort_by_key(|(name, _)| *name);
    gauss_layer::files::save_tensors(path, &named)
        .with_context(|| format!("cannot save the mixture to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fit does not depend on the unit of measurement: the same data in units 1e7 times
    /// smaller scores exactly `d·ln 1e7` lower (a change of variables), where the default
    /// cholesky floor alone would cap the variances near 1e12 and fail; data × 1e-7 fits too
    /// (its variances are then `reg_covar`'s).
    #[test]
    fn scaled_data_fits_with_defaults() -> Result<()> {
        let device = Device::Cpu;
        let x = synthetic(2, 3, 400, 4, &device)?;
        let args = MixtureArgs {
            components: 2,
            parameterization: Parameterization::Cholesky,
            tied: false,
            options: MixtureFitOptions {
                n_init: 1,
                ..Default::default()
            },
            out: None,
        };
        let unit = run(&x, "unit", &args)?["mean_log_likelihood"]
            .as_f64()
            .context("a score")?;
        let scale = 1e7f64;
        let scaled = run(&(&x * scale)?, "scaled", &args)?["mean_log_likelihood"]
            .as_f64()
            .context("a score")?;
        let expected = unit - 3.0 * scale.ln();
        // reg_covar (1e-6, absolute) weighs 1e-14 as much on the scaled data: a few 1e-7.
        assert!((scaled - expected).abs() < 1e-5, "{scaled} vs {expected}");
        let small = run(&(&x * 1e-7)?, "small", &args)?["mean_log_likelihood"]
            .as_f64()
            .context("a score")?;
        // Variances near 1e-14 ≪ reg_covar: every component's covariance is reg_covar·I (up to
        // 1e-8 relative), the points sit within 1e-6 standard deviations of their means, so the
        // score is −(d/2)·ln(2π·reg_covar) (scikit-learn's limit too: its reg_covar is the same
        // absolute 1e-6; it gives 11.977633 = −ln(2π·1e-6) on 2-D data scaled so).
        let limit = -1.5 * (2.0 * std::f64::consts::PI * 1e-6).ln();
        assert!((small - limit).abs() < 1e-3, "{small} vs {limit}");
        Ok(())
    }

    /// A saved mixture loads back as the fitted one under the summary's `factor_diag_floor`:
    /// on data of standard deviation near 1e7 the run's floor is about 1e-13, and the
    /// default 1e-6 would read the saved cholesky tensors as covariances 1e13 times smaller.
    #[test]
    fn saved_tensors_load_back_under_the_reported_floor() -> Result<()> {
        let device = Device::Cpu;
        let x = (synthetic(2, 3, 400, 4, &device)? * 1e7)?;
        let dir = gauss_tests::temp_dir("fit-gaussian-mixture-floor")?;
        let path = dir.join("mixture.safetensors");
        let args = MixtureArgs {
            components: 2,
            parameterization: Parameterization::Cholesky,
            tied: false,
            options: MixtureFitOptions {
                n_init: 1,
                ..Default::default()
            },
            out: Some(path.clone()),
        };
        let summary = run(&x, "scaled", &args)?;
        let fitted = summary["mean_log_likelihood"].as_f64().context("a score")?;
        let floor = summary["factor_diag_floor"]
            .as_f64()
            .context("the floor in the summary")?;
        let reloaded = |factor_diag_floor: f64| -> Result<f64> {
            let tensors = candle_core::safetensors::load(&path, &device)?;
            // f64: a unit test on Device::Cpu (the run saves f64 tensors).
            let vb = VarBuilder::from_tensors(tensors, DType::F64, &device);
            let config = GaussLayerConfig {
                precision: PrecisionConfig {
                    factor_diag_floor,
                    ..Default::default()
                },
                ..Default::default()
            };
            Ok(gaussian_mixture(3, 2, config, vb)?.score(&x)?)
        };
        let score = reloaded(floor)?;
        assert!(
            (score - fitted).abs() < 1e-9 * fitted.abs(),
            "{score} vs {fitted}"
        );
        let default = GaussLayerConfig::default().precision.factor_diag_floor;
        let wrong = reloaded(default)?;
        assert!(wrong < fitted - 1.0, "{wrong} vs {fitted}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// `--tied`: the components share one covariance (printed K times).
    #[test]
    fn tied_components_share_one_covariance() -> Result<()> {
        let device = Device::Cpu;
        let x = synthetic(3, 2, 300, 1, &device)?;
        let args = MixtureArgs {
            components: 3,
            parameterization: Parameterization::Cholesky,
            tied: true,
            options: MixtureFitOptions {
                n_init: 1,
                ..Default::default()
            },
            out: None,
        };
        let tied = run(&x, "tied", &args)?;
        assert_eq!(tied["tied"], json!(true));
        let covariances = tied["covariances"].as_array().context("covariances")?;
        assert_eq!(covariances.len(), 3);
        assert!(covariances.iter().all(|c| c == &covariances[0]), "{tied}");
        let score = tied["mean_log_likelihood"].as_f64().context("a score")?;
        assert!(score.is_finite(), "{tied}");
        Ok(())
    }
}
