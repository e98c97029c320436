//! Learns a multivariate normal's mean and precision by gradient descent on the negative
//! log-likelihood, and compares the result with the closed-form maximum-likelihood fit.
//!
//! ```text
//! cargo run --release -p fit-gaussian -- --data tests/data/reference/nll_1.safetensors
//! cargo run --release -p fit-gaussian -- --param expm --dim 4 --samples 2000 --out fit.safetensors
//! ```
//!
//! Progress goes to stderr; a human summary and, as the last line of stdout, one JSON object
//! (`mean`, `covariance`, `nll`, `mle_nll`, `steps`, errors against the MLE, ...) go to stdout.

mod data;
mod fit;
mod mle;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Parser;
use gauss_layer::{checkpoint, Parameterization};
use serde_json::json;

/// Fit a multivariate normal by gradient descent on its NLL.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// safetensors file with a tensor `x` of shape (N, d); default: samples of a known Gaussian.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Precision parameterization: cholesky, direct, expm, diag or sphere.
    #[arg(long, default_value = "cholesky", value_parser = parse_parameterization)]
    param: Parameterization,
    /// Most optimizer steps (training stops earlier once the gradient vanishes).
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    /// Peak AdamW learning rate (cosine decay over the steps).
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Convergence: stop once every gradient entry is below this.
    #[arg(long, default_value_t = 1e-7)]
    grad_tol: f64,
    /// Floor on the eigenvalues of a repaired `direct` precision; default 0.1 / tr(sample
    /// covariance), at least ten times below the smallest precision eigenvalue of the MLE
    /// (a floor near zero lets one repair feed Adam a huge `P⁻¹` gradient that stalls it).
    #[arg(long)]
    min_eigenvalue: Option<f64>,
    /// Seed of the synthetic data and of the initialization.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dimension of the synthetic data.
    #[arg(long, default_value_t = 3)]
    dim: usize,
    /// Number of synthetic samples.
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Save the fitted layer (a one-layer GaussNet checkpoint) to this safetensors file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_parameterization(s: &str) -> Result<Parameterization, String> {
    s.parse()
        .map_err(|e: gauss_layer::GaussError| e.to_string())
}

fn to_rows(matrix: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(matrix.to_vec2::<f64>()?)
}

/// mimalloc keeps freed blocks for reuse instead of returning them to the kernel: training
/// allocates and frees many large tensors per step (see the README, "Performance").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fixes the thread count once: Candle reads `RAYON_NUM_THREADS` on every CPU matmul and,
/// when it is unset, counts the cores from `/proc` and sysfs each time. Sets it (to Candle's
/// own default unless the user chose) and builds the global rayon pool with the same count.
/// Runs first in `main`, before any other thread exists.
fn pin_threads() {
    let threads = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
}

fn main() -> Result<()> {
    pin_threads();
    let args = Args::parse();
    let device = Device::Cpu;
    let (x, source) = match &args.data {
        Some(path) => (
            data::load_samples(path, &device)?,
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
            let known = data::KnownGaussian::random(args.dim, args.seed);
            println!("true mean:       {:?}", known.mean);
            println!("true covariance: {:?}", known.covariance());
            let x = known.sample(args.samples, args.seed.wrapping_add(1), &device)?;
            (x, format!("synthetic (seed {})", args.seed))
        }
    };
    let (n, d) = x.dims2()?;
    println!(
        "data: {source}, {n} samples in {d} dimensions, parameterization {}",
        args.param
    );

    let mle = mle::maximum_likelihood(&x, args.param)?;
    let options = fit::FitOptions {
        parameterization: args.param,
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

    println!(
        "steps: {}{}",
        fitted.steps,
        if fitted.converged { " (converged)" } else { "" }
    );
    println!(
        "mean NLL: fitted {:.9}, closed-form MLE {:.9}",
        fitted.nll, mle.nll
    );
    println!("mean vs MLE: max-abs error {mean_error:.3e}");
    println!("covariance vs MLE: relative Frobenius error {covariance_error:.3e}");

    if let Some(path) = &args.out {
        let mut metadata = BTreeMap::new();
        metadata.insert("nll".to_string(), fitted.nll.to_string());
        metadata.insert("data".to_string(), source.clone());
        checkpoint::save_with_metadata(&fitted.net, path, &metadata)
            .with_context(|| format!("saving {}", path.display()))?;
        println!("saved the fitted layer to {}", path.display());
    }

    let summary = json!({
        "param": args.param.name(),
        "data": source,
        "samples": n,
        "dim": d,
        "steps": fitted.steps,
        "converged": fitted.converged,
        "nll": fitted.nll,
        "mle_nll": mle.nll,
        "mean": mean.to_vec1::<f64>()?,
        "covariance": to_rows(&covariance)?,
        "mean_max_abs_error": mean_error,
        "covariance_rel_frobenius_error": covariance_error,
    });
    println!("{summary}");
    Ok(())
}
