//! Train, save and evaluate a Finite Gaussian Neuron classifier beside a classical MLP.
//!
//! ```text
//! cargo run --release -p fgn-classifier -- train                 # bundled 8×8 digits
//! cargo run --release -p fgn-classifier -- eval fgn-digits.safetensors
//! cargo run --release -p fgn-classifier -- train --mnist DIR     # MNIST IDX files
//! ```
//! Progress goes to stderr; the last line of stdout is one JSON object with the results.

mod data;
mod evaluate;
mod init;
mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};
use gauss_layer::checkpoint;
use gauss_layer::{GaussLayerConfig, GaussNetConfig, InitConfig, Parameterization};
use gauss_losses::FgnObjectiveConfig;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::data::{DataSet, Split};
use crate::evaluate::{evaluate, Report};
use crate::train::{train_fgn, train_mlp, Schedule};

#[derive(Parser)]
#[command(
    version,
    about = "Finite Gaussian Neuron classifier: train, save, evaluate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// The CPU (always available).
    Cpu,
    /// CUDA device 0 (needs a build with `--features cuda`).
    Cuda,
    /// The Metal device (needs a build with `--features metal`).
    Metal,
}

#[derive(Subcommand)]
enum Command {
    /// Train a classical MLP and an FGN network, save the FGN checkpoint, evaluate both.
    Train(TrainArgs),
    /// Evaluate a saved FGN checkpoint.
    Eval(EvalArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Where to write the FGN checkpoint.
    #[arg(long, default_value = "fgn-digits.safetensors")]
    out: PathBuf,
    /// Training epochs (both networks).
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    /// Precision parameterization of the FGN layers.
    #[arg(long, default_value = "diag", value_parser = parameterization_parser())]
    param: Parameterization,
    /// Width of the hidden layer(s) (repeat for more layers).
    #[arg(long, default_values_t = vec![64])]
    hidden: Vec<usize>,
    /// Weight of the λ-loss (mean covariance eigenvalue).
    #[arg(long, default_value_t = 0.05)]
    lambda_sigma: f64,
    /// Weight of the mean squared linear weight.
    #[arg(long, default_value_t = 1e-3)]
    lambda_l2: f64,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Device to train and evaluate on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Seed of the initialization, shuffling and evaluation noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train only the classical MLP (no checkpoint).
    #[arg(long, conflicts_with = "fgn_only")]
    classical_only: bool,
    /// Train only the FGN network.
    #[arg(long)]
    fgn_only: bool,
    /// Read MNIST IDX files from this directory instead of the bundled digits.
    #[arg(long)]
    mnist: Option<PathBuf>,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The FGN checkpoint written by `train`.
    checkpoint: PathBuf,
    /// A safetensors file with `images` (N, D) and `labels` (N) instead of the bundled test split.
    #[arg(long, conflicts_with = "mnist")]
    data: Option<PathBuf>,
    /// Evaluate on the MNIST test files in this directory.
    #[arg(long)]
    mnist: Option<PathBuf>,
    /// Device to evaluate on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

/// What each parameterization stores, for `--help`.
fn describe(parameterization: Parameterization) -> &'static str {
    match parameterization {
        Parameterization::Cholesky => "P = L Lᵀ, L lower triangular (d² values per neuron)",
        Parameterization::Direct => {
            "P = (A + Aᵀ)/2 stored directly (d² values; not kept positive definite)"
        }
        Parameterization::Expm => "P = expm(A), A symmetric (d² values)",
        Parameterization::Diag => "P = diag(exp θ): axis-aligned (d values per neuron)",
        Parameterization::Sphere => "P = exp(θ) I: round (1 value per neuron)",
    }
}

/// Accepts the names of [`Parameterization::ALL`], listed with their descriptions in `--help`.
fn parameterization_parser() -> impl TypedValueParser<Value = Parameterization> {
    let values = Parameterization::ALL
        .into_iter()
        .map(|p| PossibleValue::new(p.name()).help(describe(p)));
    PossibleValuesParser::new(values).try_map(|name| name.parse::<Parameterization>())
}

fn device(arg: DeviceArg) -> Result<Device> {
    Ok(match arg {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::new_cuda(0)
            .context("cannot open CUDA device 0 (built with --features cuda?)")?,
        DeviceArg::Metal => Device::new_metal(0)
            .context("cannot open the Metal device (built with --features metal?)")?,
    })
}

fn load_data(mnist: Option<&Path>) -> Result<DataSet> {
    match mnist {
        Some(dir) => data::mnist(dir),
        None => data::digits(),
    }
}

fn report_json(report: &Report) -> Result<Value> {
    Ok(serde_json::to_value(report)?)
}

fn train(args: TrainArgs) -> Result<Value> {
    let device = device(args.device)?;
    let data = load_data(args.mnist.as_deref())?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let schedule = Schedule {
        epochs: args.epochs,
        batch_size: args.batch_size.max(1),
        learning_rate: args.lr,
    };
    let started = Instant::now();
    let features = data.train.features();
    let mut out = serde_json::Map::new();
    out.insert("dataset".into(), json!(data.name));

    let mut classical = None;
    if !args.fgn_only {
        let mut sizes = vec![features];
        sizes.extend(&args.hidden);
        sizes.push(data.classes);
        let t = Instant::now();
        let (mlp, _vars) = train_mlp(&sizes, &data.train, &schedule, &mut rng, &device)?;
        let report = evaluate(&mlp, &data.test, &device)?;
        eprintln!(
            "classical: test accuracy {:.4}, noise mean max-softmax {:.3} ({:.1}s)",
            report.test_accuracy,
            report.noise_mean_max_softmax,
            t.elapsed().as_secs_f64()
        );
        classical = Some(report_json(&report)?);
    }

    if !args.classical_only {
        // Every layer draws its initial values from this seed (each its own stream).
        let init = InitConfig {
            seed: Some(args.seed),
            ..Default::default()
        };
        let config = GaussNetConfig {
            in_features: features,
            hidden: args.hidden.clone(),
            out_features: data.classes,
            layer: GaussLayerConfig {
                parameterization: args.param,
                tanh: true,
                init: init.clone(),
                ..Default::default()
            },
            output_layer: Some(GaussLayerConfig {
                parameterization: args.param,
                init,
                ..Default::default()
            }),
            gate: true,
            ..Default::default()
        };
        let objective = FgnObjectiveConfig {
            lambda_l2: args.lambda_l2,
            lambda_sigma: args.lambda_sigma,
            ..Default::default()
        };
        let t = Instant::now();
        let (net, varmap) = train_fgn(
            config,
            &objective,
            &data.train,
            &schedule,
            &mut rng,
            &device,
        )?;
        drop(varmap);
        let report = evaluate(&net, &data.test, &device)?;
        eprintln!(
            "fgn: test accuracy {:.4}, noise mean max-softmax {:.3} ({:.1}s)",
            report.test_accuracy,
            report.noise_mean_max_softmax,
            t.elapsed().as_secs_f64()
        );
        let mut meta = BTreeMap::new();
        meta.insert("dataset".to_string(), data.name.to_string());
        meta.insert("input_scale".to_string(), data.input_scale.to_string());
        meta.insert(
            "test_accuracy".to_string(),
            report.test_accuracy.to_string(),
        );
        meta.insert("test_correct".to_string(), report.test_correct.to_string());
        meta.insert("test_total".to_string(), report.test_total.to_string());
        meta.insert("device".to_string(), format!("{:?}", device.location()));
        meta.insert("seed".to_string(), args.seed.to_string());
        meta.insert("epochs".to_string(), args.epochs.to_string());
        checkpoint::save_with_metadata(&net, &args.out, &meta)
            .with_context(|| format!("cannot save the checkpoint to {}", args.out.display()))?;
        eprintln!("saved {}", args.out.display());
        out.insert("checkpoint".into(), json!(args.out.display().to_string()));
        if let Value::Object(fields) = report_json(&report)? {
            out.extend(fields);
        }
    }
    if let Some(classical) = classical {
        out.insert("classical".into(), classical);
    }
    out.insert(
        "train_seconds".into(),
        json!((started.elapsed().as_secs_f64() * 100.0).round() / 100.0),
    );
    Ok(Value::Object(out))
}

fn eval(args: EvalArgs) -> Result<Value> {
    let device = device(args.device)?;
    let loaded = checkpoint::load(&args.checkpoint, &device, None)?;
    let meta = &loaded.user_metadata;
    let input_scale: f64 = meta
        .get("input_scale")
        .map(|s| s.parse())
        .transpose()
        .context("checkpoint metadata `input_scale` is not a number")?
        .unwrap_or(data::DIGITS_SCALE);
    let (split, bundled): (Split, bool) = match (&args.data, &args.mnist) {
        (Some(path), _) => (data::eval_file(path, input_scale)?, false),
        (None, Some(dir)) => (
            data::mnist(dir)?.test,
            meta.get("dataset").is_some_and(|d| d == "mnist"),
        ),
        (None, None) => (
            data::digits()?.test,
            meta.get("dataset").is_none_or(|d| d == "digits"),
        ),
    };
    let expected = loaded.net.config().in_features;
    if split.features() != expected {
        bail!(
            "the checkpoint expects {expected} input features, the data has {} (pass --data or --mnist)",
            split.features()
        );
    }
    let report = evaluate(&loaded.net, &split, &device)?;
    let mut out = serde_json::Map::new();
    out.insert(
        "checkpoint".into(),
        json!(args.checkpoint.display().to_string()),
    );
    if let Value::Object(fields) = report_json(&report)? {
        out.extend(fields);
    }
    if bundled {
        if let Some(saved) = meta.get("test_accuracy") {
            let saved_value: f64 = saved
                .parse()
                .context("checkpoint metadata `test_accuracy` is not a number")?;
            let matches = saved_value == report.test_accuracy;
            eprintln!(
                "saved test accuracy {saved}, measured {} ({})",
                report.test_accuracy,
                if matches { "identical" } else { "DIFFERENT" }
            );
            out.insert("saved_test_accuracy".into(), json!(saved_value));
            out.insert("matches_saved".into(), json!(matches));
        }
    }
    Ok(Value::Object(out))
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
    };
    match result {
        Ok(value) => println!("{value}"),
        Err(err) => {
            // One line: each cause once (some errors already quote their source).
            let mut message = String::new();
            for cause in err.chain() {
                let text = cause.to_string();
                if !message.contains(&text) {
                    if !message.is_empty() {
                        message.push_str(": ");
                    }
                    message.push_str(&text);
                }
            }
            let message = message.replace('\n', " ");
            eprintln!("error: {message}");
            std::process::exit(1);
        }
    }
}
