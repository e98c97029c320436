//! Learns a multivariate normal's mean and precision by gradient descent on the negative
//! log-likelihood, and compares the result with the maximum-likelihood fit within the
//! parameterization's family (closed form; for lowrank below full rank, EM; see `mle`); or,
//! with `--components K`, fits a mixture of K normals the way scikit-learn's
//! `GaussianMixture` does with its default `init_params='kmeans'` (k-means on the data:
//! k-means++ seeds, Lloyd's iterations; then EM).
//!
//! ```text
//! cargo run --release -p fit-gaussian -- --data tests/data/reference/nll_1.safetensors
//! cargo run --release -p fit-gaussian -- --param expm --dim 4 --samples 2000 --out fit.safetensors
//! cargo run --release -p fit-gaussian -- --data x.safetensors --components 3 --param cholesky
//! ```
//!
//! Progress and a human summary go to stderr; stdout is exactly one JSON line, so it pipes
//! into a JSON reader. One Gaussian: `mean`, `covariance`, `nll`, `mle_nll`, `mle_method`,
//! `steps`, errors against the MLE, ... A mixture: `mean_log_likelihood` in nats per sample
//! (the quantity of scikit-learn's `score`), `weights`, `means`, `covariances`, `steps`,
//! `seconds`, ...

mod checks;
mod data;
mod fit;
mod mixture;
mod mle;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Parser;
use gauss_layer::MixtureFitOptions;
use gauss_layer::{checkpoint, Parameterization};
use serde_json::json;

/// Fit a multivariate normal by gradient descent on its NLL, or (--components K) a mixture of
/// K normals by k-means and EM.
#[derive(Parser, Debug)]
// Negative numbers are values, so that `--reg-covar -1` meets the program's own check of the
// option (which names it and says what it takes) instead of clap's "unexpected argument"; the
// float options also take any hyphenated value (`-1e-3`, `-inf`, which clap does not count as
// numbers) for their checks to refuse.
#[command(version, about, allow_negative_numbers = true)]
struct Args {
    /// safetensors file with a tensor `x` of shape (N, d) (any float dtype, read as f64);
    /// default: samples of a random known Gaussian (or mixture, with --components) drawn with
    /// --seed, --dim and --samples.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Precision parameterization of every Gaussian (`lowrank:R` also names lowrank's rank,
    /// as `--param lowrank --rank R`).
    #[arg(long, default_value = "cholesky", value_parser = examples_support::parameterization_parser())]
    param: String,
    /// Columns of U for `--param lowrank` (required there unless given as `lowrank:R`;
    /// 1 <= R <= input dimension).
    #[arg(long)]
    rank: Option<usize>,
    /// Fit a mixture of this many components (k-means start, EM) instead of one Gaussian by
    /// gradient descent; its JSON line then has `mean_log_likelihood` (nats per sample, as
    /// scikit-learn's `score`), `weights`, `means`, `covariances`, `steps`, `seconds`.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    components: Option<u32>,
    /// One Gaussian: most optimizer steps (training stops earlier once the gradient vanishes).
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    /// One Gaussian: peak AdamW learning rate (cosine decay over the steps).
    #[arg(long, default_value_t = 0.05, allow_hyphen_values = true)]
    lr: f64,
    /// One Gaussian: stop once every gradient entry is below this.
    #[arg(long, default_value_t = 1e-7, allow_hyphen_values = true)]
    grad_tol: f64,
    /// One Gaussian: floor on the eigenvalues of a repaired `direct` precision; default
    /// 0.1 / tr(sample covariance), at least ten times below the smallest precision eigenvalue
    /// of the MLE (a floor near zero lets one repair feed Adam a huge `P⁻¹` gradient that
    /// stalls it).
    #[arg(long, allow_hyphen_values = true)]
    min_eigenvalue: Option<f64>,
    /// Mixture: one covariance shared by all components (scikit-learn's
    /// `covariance_type='tied'` with the full parameterizations; with diag, sphere or lowrank
    /// the shared covariance stays in that family).
    #[arg(long)]
    tied: bool,
    /// Mixture: most EM iterations.
    #[arg(long, default_value_t = 1000)]
    em_steps: usize,
    /// Mixture: EM stops once the mean log-likelihood changes by less than this (nats per
    /// sample) between iterations (scikit-learn's default is 1e-3).
    #[arg(long, default_value_t = 1e-6, allow_hyphen_values = true)]
    tol: f64,
    /// Mixture: added to every covariance's diagonal in each M-step (scikit-learn's
    /// `reg_covar`).
    #[arg(long, default_value_t = 1e-6, allow_hyphen_values = true)]
    reg_covar: f64,
    /// Mixture: independent starts (k-means, EM); the best log-likelihood is kept (the
    /// library's default, 5).
    #[arg(long, default_value_t = 5)]
    n_init: usize,
    /// Mixture: k-means runs (k-means++ seeding, Lloyd's iterations) per start; the run of
    /// lowest inertia is kept.
    #[arg(long, default_value_t = 3)]
    kmeans_inits: usize,
    /// Mixture: AdamW steps on the mixture NLL after EM; default 0 (EM maximizes over every
    /// parameterization's family); refinement would untie a `--tied` mixture, which is never
    /// refined.
    #[arg(long)]
    refine_steps: Option<usize>,
    /// Mixture: peak learning rate of the refinement (cosine decay).
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true)]
    refine_lr: f64,
    /// Seed of the synthetic data, of the initialization (one Gaussian) and of the k-means++
    /// draws (mixture).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dimension of the synthetic data.
    #[arg(long, default_value_t = 3)]
    dim: usize,
    /// Number of synthetic samples.
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Save the fitted model to this safetensors file: one Gaussian as a one-layer GaussNet
    /// checkpoint; a mixture as its tensors (`center`, the precision tensor, `mixture_logits`),
    /// which mean the fitted mixture under the JSON line's `factor_diag_floor`.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn to_rows(matrix: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(matrix.to_vec2::<f64>()?)
}

examples_support::global_allocator!();

/// `--components K`: fit and print the mixture's JSON line.
fn run_mixture(
    args: &Args,
    parameterization: Parameterization,
    components: usize,
    device: &Device,
) -> Result<()> {
    let (x, source) = match &args.data {
        Some(path) => (
            data::load_samples(path, Some(components), device)?,
            path.display().to_string(),
        ),
        None => {
            if args.dim == 0 || args.samples < components {
                anyhow::bail!(
                    "--dim must be >= 1 and --samples at least --components, got {} samples of {} dimensions for {components} components",
                    args.samples,
                    args.dim
                );
            }
            checks::sizes(args.samples, args.dim, components)?;
            let x = mixture::synthetic(components, args.dim, args.samples, args.seed, device)?;
            (x, format!("synthetic mixture (seed {})", args.seed))
        }
    };
    let mixture_args = mixture::MixtureArgs {
        components,
        parameterization,
        tied: args.tied,
        options: MixtureFitOptions {
            max_em_steps: args.em_steps,
            tol: args.tol,
            reg_covar: args.reg_covar,
            n_init: args.n_init,
            kmeans_inits: args.kmeans_inits,
            refine_steps: args.refine_steps,
            refine_lr: args.refine_lr,
            seed: args.seed,
            ..Default::default()
        },
        out: args.out.clone(),
    };
    // `run` checks the summary is finite before it saves anything.
    let summary = mixture::run(&x, &source, &mixture_args)?;
    examples_support::print_line(summary)?;
    Ok(())
}

/// One line on stderr and exit status 1 on any error (each cause once), as fgn-classifier.
fn main() {
    let args = Args::parse();
    examples_support::exit_on_error(examples_support::run_on_thread_pool(move || run(args)));
}

fn run(args: Args) -> Result<()> {
    let parameterization = examples_support::parameterization(&args.param, args.rank)?;
    checks::options(&checks::Options {
        parameterization,
        lr: args.lr,
        grad_tol: args.grad_tol,
        min_eigenvalue: args.min_eigenvalue,
        refine_lr: args.refine_lr,
        tol: args.tol,
        reg_covar: args.reg_covar,
    })?;
    if let Some(out) = &args.out {
        let inputs: Vec<&std::path::Path> = args.data.iter().map(|p| p.as_path()).collect();
        gauss_layer::files::check_output(out, &inputs)?;
        checks::writable_dir(out)?;
    }
    let device = Device::Cpu;
    if let Some(components) = args.components {
        return run_mixture(&args, parameterization, components as usize, &device);
    }
    if args.tied {
        anyhow::bail!(
            "--tied shares one covariance among a mixture's components; it needs --components K"
        );
    }
    // The human summary, for stderr once the run has succeeded: a failed run's stderr is its
    // one `error:` line.
    let mut notes = Vec::new();
    let (x, source) = match &args.data {
        Some(path) => (
            data::load_samples(path, None, &device)?,
            path.display().to_string(),
        ),
        None => {
            if args.dim == 0 || args.samples <= args.dim {
                anyhow::bail!(
                    "--samples must exceed --dim >= 1 for a full-rank covariance, got {} samples in {} dimensions",
                    args.samples,
                    args.dim
                );
            }
            checks::sizes(args.samples, args.dim, 1)?;
            let known = data::KnownGaussian::random(args.dim, args.seed);
            notes.push(format!("true mean:       {:?}", known.mean));
            notes.push(format!("true covariance: {:?}", known.covariance()));
            let x = known.sample(args.samples, args.seed.wrapping_add(1), &device)?;
            (x, format!("synthetic (seed {})", args.seed))
        }
    };
    let (n, d) = x.dims2()?;
    notes.push(format!(
        "data: {source}, {n} samples in {d} dimensions, parameterization {parameterization}"
    ));

    // A singular or overflowing sample covariance (its factor fails or its NLL is not
    // finite) is a data problem: say so, instead of fitting toward `null`s.
    let mle = mle::maximum_likelihood(&x, parameterization)
        .ok()
        .filter(|m| m.nll.is_finite() && m.total_variance.is_finite());
    let Some(mle) = mle else {
        anyhow::bail!(
            "data {source}: the sample covariance ({parameterization} family) is singular or not finite, so no maximum-likelihood Gaussian exists: the points are identical, lie on a line or plane, have a constant column, or are so large that their squares overflow"
        );
    };
    let options = fit::FitOptions {
        parameterization,
        steps: args.steps,
        lr: args.lr,
        grad_tol: args.grad_tol,
        min_eigenvalue: match args.min_eigenvalue {
            Some(floor) => floor,
            None => 0.1 / mle.total_variance,
        },
        // The data took `seed` (the Gaussian) and `seed + 1` (the samples).
        seed: args.seed.wrapping_add(2),
    };
    let fitted = fit::fit(&x, &device, &options)?;
    let layer = fitted.net.layers().first().context("one layer")?;
    let mean = layer.center().squeeze(0)?;
    let covariance = layer.precision().covariance_matrix()?.squeeze(0)?;
    let mean_error = mle::max_abs_error(&mean, &mle.mean)?;
    let covariance_error = mle::relative_frobenius_error(&covariance, &mle.covariance)?;

    notes.push(format!(
        "steps: {}{}",
        fitted.steps,
        if fitted.converged { " (converged)" } else { "" }
    ));
    notes.push(format!(
        "mean NLL: fitted {:.9}, MLE ({}) {:.9}",
        fitted.nll, mle.method, mle.nll
    ));
    notes.push(format!("mean vs MLE: max-abs error {mean_error:.3e}"));
    notes.push(format!(
        "covariance vs MLE: relative Frobenius error {covariance_error:.3e}"
    ));

    let summary = json!({
        // `lowrank:R`, not `lowrank`: runs of two ranks stay apart.
        "param": parameterization.to_string(),
        "data": source,
        "samples": n,
        "dim": d,
        "steps": fitted.steps,
        "converged": fitted.converged,
        "nll": fitted.nll,
        "mle_nll": mle.nll,
        "mle_method": mle.method,
        "mean": mean.to_vec1::<f64>()?,
        "covariance": to_rows(&covariance)?,
        "mean_max_abs_error": mean_error,
        "covariance_rel_frobenius_error": covariance_error,
    });
    // A fit that is not finite is an error, and is not saved.
    checks::finite_summary(&summary)?;
    if let Some(path) = &args.out {
        let mut metadata = BTreeMap::new();
        metadata.insert("nll".to_string(), fitted.nll.to_string());
        metadata.insert("data".to_string(), source);
        checkpoint::save_with_metadata(&fitted.net, path, &metadata)
            .with_context(|| format!("saving {}", path.display()))?;
        notes.push(format!("saved the fitted layer to {}", path.display()));
    }
    if !fitted.converged {
        // The JSON says `"converged": false`, but an unconverged fit can be far from the MLE
        // (unstandardized data: NLL 8992 against 12.04 for columns of sd 1e4), so say it
        // where a person reads, with what to try.
        notes.push(format!(
            "warning: gradient descent did not converge in {} steps (a gradient entry is still above --grad-tol {:e}); its mean NLL {:.6} may be far from the maximum-likelihood {:.6}: raise --steps, or standardize the data (zero mean, unit variance per column)",
            fitted.steps, args.grad_tol, fitted.nll, mle.nll
        ));
    }
    for note in notes {
        eprintln!("{note}");
    }
    examples_support::print_line(summary)?;
    Ok(())
}
