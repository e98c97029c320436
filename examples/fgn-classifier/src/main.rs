//! Train, save and evaluate a Finite Gaussian Neuron classifier beside a classical MLP.
//!
//! ```text
//! cargo run --release -p fgn-classifier -- train                 # bundled 8×8 digits
//! cargo run --release -p fgn-classifier -- eval fgn-digits.safetensors
//! cargo run --release -p fgn-classifier -- train --mnist DIR     # MNIST IDX files
//! ```
//! Progress goes to stderr; the last line of stdout is one JSON object with the results.

mod augment;
mod calibration;
mod cnn;
mod cnn_cli;
mod cnn_train;
mod conv_block;
mod data;
mod evaluate;
mod idx;
mod init;
mod interop;
mod limits;
mod metrics;
mod mirror;
mod ood;
mod predict;
mod train;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};
use examples_support::parameterization;
use gauss_layer::checkpoint;
use gauss_layer::{
    GaussLayerConfig, GaussNetConfig, InitConfig, Parameterization, PrecisionConfig,
};
use gauss_losses::{FgnObjectiveConfig, TraceEstimator};
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
    /// Import a network of the original PyTorch FGN code (a safetensors state dict).
    Import(interop::ImportArgs),
    /// Convert a classical Feedforward_Classic_net state dict as the original does.
    Convert(interop::ConvertArgs),
    /// Run a checkpoint on `x` of a safetensors file; write `output` and each layer's `g{i}`.
    Predict(predict::PredictArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Where to write the FGN checkpoint.
    #[arg(long, default_value = "fgn-digits.safetensors")]
    out: PathBuf,
    /// Training epochs (both networks). Default: 60 on the bundled digits (1,437 images),
    /// 20 with --mnist (more images per epoch).
    #[arg(long)]
    epochs: Option<usize>,
    /// Precision parameterization of the FGN layers (`lowrank:R` also names lowrank's rank,
    /// as `--param lowrank --rank R`).
    #[arg(long, default_value = "diag", value_parser = examples_support::parameterization_parser())]
    param: String,
    /// Columns of U for `--param lowrank` (required there unless given as `lowrank:R`;
    /// 1 <= R <= the inputs of every Gaussian layer).
    #[arg(long)]
    rank: Option<usize>,
    /// Width of the hidden layer(s) (repeat for more layers).
    #[arg(long, default_values_t = vec![64])]
    hidden: Vec<usize>,
    /// Weight of the λ-loss (mean covariance eigenvalue). Default: 0.05·(64/d)² for d input
    /// features: 0.05 on the 64-pixel digits, 3.3e-4 on 784-pixel MNIST (see the README).
    #[arg(long)]
    lambda_sigma: Option<f64>,
    /// Random probe vectors per neuron and step for the λ-loss's tr Σ of cholesky layers
    /// (an unbiased Hutchinson estimate, O(d²·N) instead of the exact O(d³)); 0 = exact.
    /// Default: 16 for inputs of 256 features or more (with --arch cnn: --features), exact
    /// below.
    #[arg(long)]
    trace_probes: Option<usize>,
    /// Learning-rate factor of the precision tensors (of --lr for the MLP, of --head-lr for
    /// the CNN). Default: (64/d)^1.5 (at most 1) for the full forms (cholesky, direct, expm)
    /// on d input features (with --arch cnn: --features), 1 for the others.
    #[arg(long)]
    precision_lr_scale: Option<f64>,
    /// Weight of the mean squared linear weight.
    #[arg(long, default_value_t = 1e-3)]
    lambda_l2: f64,
    /// Adam learning rate. Default: 1e-2 (MLP), 1e-3 (CNN, decayed to 0 by a cosine).
    #[arg(long)]
    lr: Option<f64>,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Device to train and evaluate on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Seed of the initialization, shuffling, evaluation noise and the λ-loss's trace probes
    /// (those on the CPU; a GPU draws them from its own Candle generator).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train only the classical MLP (no checkpoint).
    #[arg(long, conflicts_with = "fgn_only")]
    classical_only: bool,
    /// Train only the FGN network.
    #[arg(long)]
    fgn_only: bool,
    /// Read MNIST IDX files (plain or .gz) from this directory instead of the bundled digits.
    #[arg(long, conflicts_with = "data_dir")]
    mnist: Option<PathBuf>,
    /// Read the four IDX files (plain or .gz: MNIST, FashionMNIST, KMNIST, EMNIST
    /// layouts) from this directory instead of the bundled digits.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Network: `mlp` (Gaussian layers on the pixels) or `cnn` (a convolutional trunk
    /// under them; needs --data-dir or --mnist).
    #[arg(long, value_enum, default_value = "mlp")]
    arch: Arch,
    /// Channels of the CNN trunk's conv blocks (3×3 conv, ReLU, 2×2 max-pool each).
    #[arg(long, default_values_t = vec![16, 32])]
    channels: Vec<usize>,
    /// Batch norm in each of the CNN trunk's conv blocks (between the conv and the ReLU).
    #[arg(long)]
    trunk_batch_norm: bool,
    /// Features the CNN trunk hands to the head.
    #[arg(long, default_value_t = 64)]
    features: usize,
    /// Activation of the CNN trunk's features under the Gaussian layers (the classical CNN
    /// always uses relu). Default none: unbounded features keep "I don't know" possible
    /// (README, "When I don't know works").
    #[arg(long, value_enum, default_value = "none")]
    feature_activation: cnn::Activation,
    /// Tied bias (b = −W·c) in the CNN FGN's Gaussian layers.
    #[arg(long)]
    tied_bias: bool,
    /// Batch norm of the CNN trunk's features before the Gaussian layers (the `GaussNet`'s
    /// `input_batch_norm`): the trunk cannot grow its features' scale to sharpen the logits
    /// instead of placing them near the Gaussians (README, "Out of distribution").
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    feature_batch_norm: bool,
    /// Adam learning rate of the CNN FGN's Gaussian layers (the trunk uses --lr).
    #[arg(long, default_value_t = 1e-2)]
    head_lr: f64,
    /// Out-of-distribution sets to score after training (repeatable): an IDX directory,
    /// or `noise`, `shuffled`, `inverted`.
    #[arg(long, value_parser = ood::OodSource::parse)]
    ood: Vec<ood::OodSource>,
    /// Hold out this fraction of the training images (seeded, in (0, 0.5]) to fit a
    /// softmax temperature after training (temperature scaling, for calibrated
    /// confidences); the checkpoint records it and eval/predict apply it. MLP and CNN
    /// (both the FGN and the classical network get their own temperature).
    #[arg(long)]
    calibration_split: Option<f64>,
    /// Random transformations of the CNN's training images: `flip` (mirrored left–right
    /// half the time: for FashionMNIST, not digits), `shift` (up to ±2 pixels), `shift-flip`.
    #[arg(long, value_enum, default_value = "none")]
    augment: augment::Augment,
    /// Score each test image as itself and mirrored left–right and average the two (CNN
    /// only; for clothes, not digits): the temperature is fitted and the checkpoint
    /// records it, so eval and predict do the same.
    #[arg(long)]
    test_time_mirror: bool,
}

/// lowrank's R is at most the inputs of every Gaussian layer (`features`, then each
/// `--hidden` width), checked before any work with the options' names.
fn check_rank(parameterization: Parameterization, features: usize, hidden: &[usize]) -> Result<()> {
    let Parameterization::LowRank { rank } = parameterization else {
        return Ok(());
    };
    let inputs = std::iter::once(features).chain(hidden.iter().copied());
    if let Some((layer, width)) = inputs.enumerate().find(|&(_, w)| rank > w) {
        bail!(
            "lowrank's rank {rank} (--param lowrank:R or --rank) is more than the {width} inputs of Gaussian layer {layer}; lowrank needs 1 <= rank <= the inputs of every layer (the input features, then each --hidden width)"
        );
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Arch {
    /// Gaussian layers on the pixels (and a classical MLP).
    Mlp,
    /// A convolutional trunk under the Gaussian layers (and under a linear head).
    Cnn,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The FGN checkpoint written by `train`.
    checkpoint: PathBuf,
    /// A safetensors file with `images` (N, D) and `labels` (N) instead of the bundled test split.
    #[arg(long, conflicts_with = "mnist")]
    data: Option<PathBuf>,
    /// Evaluate on the MNIST test files (plain or .gz) in this directory.
    #[arg(long, conflicts_with = "data_dir")]
    mnist: Option<PathBuf>,
    /// Evaluate on the test split of the IDX files (plain or .gz) in this directory.
    #[arg(long, conflicts_with = "data")]
    data_dir: Option<PathBuf>,
    /// Out-of-distribution sets to score (repeatable): an IDX directory, or `noise`,
    /// `shuffled`, `inverted`. Prints AUROC and FPR at 95% TPR per score.
    #[arg(long, value_parser = ood::OodSource::parse)]
    ood: Vec<ood::OodSource>,
    /// Divide the `--data` images by this to bring them to [0, 1] (required for float
    /// images; integer images default to the checkpoint's recorded scale).
    #[arg(long, requires = "data")]
    input_scale: Option<f64>,
    /// Device to evaluate on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Score each test image as itself and mirrored left–right and average the two, whether
    /// or not the checkpoint records it (CNN only; for clothes, not digits; README, "Out of distribution").
    #[arg(long)]
    test_time_mirror: bool,
}

fn device(arg: DeviceArg) -> Result<Device> {
    Ok(match arg {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => examples_support::cuda_device()?,
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

/// The IDX set in `dir` for the CNN, with every `--ood` set checked against its image size
/// before any training.
fn checked_idx(dir: &Path, sets: &[ood::OodSource]) -> Result<idx::IdxData> {
    let data = idx::load(dir)?;
    ood::check(sets, ood::InDistribution::Size(data.height, data.width))?;
    Ok(data)
}

fn report_json(report: &Report) -> Result<Value> {
    Ok(serde_json::to_value(report)?)
}

/// The λ-loss weight for `features` inputs when none is given: 0.05 (tuned on the 64-pixel
/// digits) scaled by (64/d)². The λ-loss is the mean covariance eigenvalue, which starts at
/// d (initial precision I/d), so an unscaled weight pulls wide inputs' Gaussians in far
/// harder; 0.05·(64/d)² keeps MNIST (d = 784) at the classical net's accuracy (README).
fn default_lambda_sigma(features: usize) -> f64 {
    0.05 * (64.0 / features.max(1) as f64).powi(2)
}

/// `--trace-probes` when none is given: 16 Hutchinson probes for Gaussian layers on 256
/// inputs or more, the exact trace below.
fn default_trace_probes(features: usize) -> usize {
    if features >= 256 {
        16
    } else {
        0
    }
}

/// The λ-loss's trace estimator of `--trace-probes N` (0: exact).
pub(crate) fn trace_estimator(probes: usize) -> TraceEstimator {
    match probes {
        0 => TraceEstimator::Exact,
        probes => TraceEstimator::Hutchinson { probes },
    }
}

/// The first option of `args` that only `--arch cnn` reads and that was changed from its
/// default (the MLP would ignore it), if any.
fn cnn_only_option(args: &TrainArgs) -> Option<&'static str> {
    [
        (args.channels != [16, 32], "--channels"),
        (args.trunk_batch_norm, "--trunk-batch-norm"),
        (args.features != 64, "--features"),
        (
            args.feature_activation != cnn::Activation::None,
            "--feature-activation",
        ),
        (args.tied_bias, "--tied-bias"),
        (!args.feature_batch_norm, "--feature-batch-norm"),
        (args.head_lr != 1e-2, "--head-lr"),
    ]
    .into_iter()
    .find_map(|(changed, option)| changed.then_some(option))
}

fn train(args: TrainArgs) -> Result<Value> {
    // The λ-loss's random trace probes (cholesky at 256+ inputs) follow the seed too.
    gauss_layer::seed_trace_probes(args.seed);
    let parameterization = parameterization(&args.param, args.rank)?;
    let cnn = args.arch == Arch::Cnn;
    let epochs = args.epochs.unwrap_or(if cnn {
        cnn_cli::DEFAULT_EPOCHS
    } else if args.mnist.is_some() || args.data_dir.is_some() {
        20
    } else {
        60
    });
    let lr = args
        .lr
        .unwrap_or(if cnn { cnn_cli::DEFAULT_LR } else { 1e-2 });
    if !cnn {
        if let Some(option) = cnn_only_option(&args) {
            bail!("{option} sets the CNN (trunk or its Gaussian head); the MLP has none (add --arch cnn)");
        }
    }
    // What training reads, which the checkpoint must not overwrite.
    let mut inputs = Vec::new();
    if let Some(dir) = args.data_dir.as_deref().or(args.mnist.as_deref()) {
        inputs.extend(idx::input_files(dir, &["train", "t10k"]));
    }
    for set in &args.ood {
        if let ood::OodSource::Dir(dir) = set {
            inputs.extend(idx::input_files(dir, &["t10k"]));
        }
    }
    validate::train(&validate::TrainOptions {
        lr,
        batch_size: args.batch_size,
        epochs,
        hidden: &args.hidden,
        lambda_sigma: args.lambda_sigma.unwrap_or(0.0),
        lambda_l2: args.lambda_l2,
        out: (!args.classical_only).then_some(args.out.as_path()),
        inputs: &inputs,
    })?;
    if !cnn && args.test_time_mirror {
        bail!("--test-time-mirror averages a CNN's views of each test image; add --arch cnn");
    }
    if !cnn && args.augment != augment::Augment::None {
        bail!("--augment transforms the CNN's training images; the MLP trains on them as they are (add --arch cnn)");
    }
    if cnn {
        // Checked here, before any work, as the MLP's are (validate::train).
        validate::finite_positive("--head-lr", args.head_lr)?;
        if let Some(scale) = args.precision_lr_scale {
            validate::finite_positive("--precision-lr-scale", scale)?;
        }
    }
    let device = device(args.device)?;
    let data_dir = args.data_dir.as_deref().or(args.mnist.as_deref());
    if cnn {
        let Some(dir) = data_dir else {
            bail!("--arch cnn needs images: pass --data-dir DIR");
        };
        // The Gaussian layers read the trunk's `--features`.
        if !args.classical_only {
            check_rank(parameterization, args.features, &args.hidden)?;
        }
        let trace_probes = args
            .trace_probes
            .unwrap_or(default_trace_probes(args.features));
        // The Gaussian head's layers from the features on (the output width is not known
        // before the data is read; the first layer dominates).
        let head_widths: Vec<usize> = std::iter::once(args.features)
            .chain(args.hidden.iter().copied())
            .collect();
        examples_support::check_trace_probes(
            &head_widths,
            parameterization,
            trace_probes,
            DType::F32,
        )?;
        return cnn_cli::train(
            &cnn_cli::CnnRun {
                parameterization,
                hidden: &args.hidden,
                channels: &args.channels,
                trunk_batch_norm: args.trunk_batch_norm,
                features: args.features,
                activation: args.feature_activation,
                tied_bias: args.tied_bias,
                feature_batch_norm: args.feature_batch_norm,
                head_lr: args.head_lr,
                lambda_sigma: args
                    .lambda_sigma
                    .unwrap_or_else(|| default_lambda_sigma(args.features)),
                lambda_l2: args.lambda_l2,
                trace_probes,
                schedule: Schedule {
                    epochs,
                    batch_size: args.batch_size,
                    learning_rate: lr,
                    precision_lr_scale: args.precision_lr_scale.unwrap_or_else(|| {
                        train::precision_lr_scale(parameterization, args.features)
                    }),
                },
                seed: args.seed,
                classical: !args.fgn_only,
                fgn: !args.classical_only,
                ood: &args.ood,
                out: &args.out,
                calibration_split: args.calibration_split,
                augment: args.augment,
                test_time_mirror: args.test_time_mirror,
            },
            checked_idx(dir, &args.ood)?,
            &device,
        );
    }
    let mut data = match &args.data_dir {
        Some(dir) => idx::load(dir)?.set,
        None => load_data(args.mnist.as_deref())?,
    };
    // Before any training (or saving): each --ood set holds images of the training size.
    ood::check(
        &args.ood,
        ood::InDistribution::Pixels(data.train.features()),
    )?;
    if !args.classical_only {
        check_rank(parameterization, data.train.features(), &args.hidden)?;
    }
    limits::check_train(&limits::TrainSize {
        features: data.train.features(),
        classes: data.classes,
        hidden: &args.hidden,
        parameterization,
        mlp: !args.fgn_only,
        fgn: !args.classical_only,
    })?;
    let lambda_sigma = args
        .lambda_sigma
        .unwrap_or_else(|| default_lambda_sigma(data.train.features()));
    let trace_probes = args
        .trace_probes
        .unwrap_or(default_trace_probes(data.train.features()));
    if !args.classical_only {
        let widths: Vec<usize> = std::iter::once(data.train.features())
            .chain(args.hidden.iter().copied())
            .chain(std::iter::once(data.classes))
            .collect();
        examples_support::check_trace_probes(&widths, parameterization, trace_probes, DType::F32)?;
    }
    let trace_estimator = trace_estimator(trace_probes);
    let mut rng = StdRng::seed_from_u64(args.seed);
    // Its own stream, so the split does not shift the training's random draws.
    let calibration = match args.calibration_split {
        Some(fraction) => {
            let mut split_rng = StdRng::seed_from_u64(args.seed ^ calibration::SPLIT_SEED);
            let (fit_part, held_out) = calibration::split(&data.train, fraction, &mut split_rng)?;
            data.train = fit_part;
            Some(held_out)
        }
        None => None,
    };
    let precision_lr_scale = args
        .precision_lr_scale
        .unwrap_or_else(|| train::precision_lr_scale(parameterization, data.train.features()));
    validate::finite_positive("--precision-lr-scale", precision_lr_scale)?;
    let schedule = Schedule {
        epochs,
        batch_size: args.batch_size,
        learning_rate: lr,
        precision_lr_scale,
    };
    let started = Instant::now();
    let features = data.train.features();
    let mut out = serde_json::Map::new();
    out.insert("dataset".into(), json!(data.name));
    out.insert("epochs".into(), json!(epochs));
    out.insert("lambda_sigma".into(), json!(lambda_sigma));
    out.insert("trace_probes".into(), json!(trace_probes));
    out.insert("precision_lr_scale".into(), json!(precision_lr_scale));
    out.insert("train_images".into(), json!(data.train.len()));
    if let Some(held_out) = &calibration {
        out.insert("calibration_images".into(), json!(held_out.len()));
    }

    let mut classical = None;
    let mut fit_seconds = 0.0;
    if !args.fgn_only {
        let mut sizes = vec![features];
        sizes.extend(&args.hidden);
        sizes.push(data.classes);
        let t = Instant::now();
        let (mlp, _vars, fit) = train_mlp(&sizes, &data.train, &schedule, &mut rng, &device)?;
        fit_seconds += fit;
        let temperature = match &calibration {
            Some(held_out) => calibration::fit(&mlp, held_out, &device)?,
            None => 1.0,
        };
        let mlp = calibration::Calibrated {
            model: &mlp,
            temperature,
        };
        let report = evaluate(&mlp, &data.test, &device)?;
        eprintln!(
            "classical: test accuracy {:.4}, noise mean max-softmax {:.3} ({:.1}s)",
            report.test_accuracy,
            report.noise_mean_max_softmax,
            t.elapsed().as_secs_f64()
        );
        let mut report_fields = report_json(&report)?;
        if calibration.is_some() {
            report_fields["temperature"] = json!(temperature);
        }
        classical = Some(report_fields);
        if !args.ood.is_empty() {
            let ood = ood::report(&mlp, &data.test, &args.ood, &device, "classical")?;
            out.insert("classical_ood".into(), ood);
        }
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
                precision: PrecisionConfig::with_parameterization(parameterization),
                tanh: true,
                init: init.clone(),
                ..Default::default()
            },
            output_layer: Some(GaussLayerConfig {
                precision: PrecisionConfig::with_parameterization(parameterization),
                init,
                ..Default::default()
            }),
            gate: true,
            ..Default::default()
        };
        let objective = FgnObjectiveConfig {
            lambda_l2: args.lambda_l2,
            lambda_sigma,
            trace_estimator,
            ..Default::default()
        };
        let t = Instant::now();
        let (net, varmap, fit) = train_fgn(
            config,
            &objective,
            &data.train,
            &schedule,
            &mut rng,
            &device,
        )?;
        fit_seconds += fit;
        drop(varmap);
        validate::finite_network(&net, lr)?;
        let temperature = match &calibration {
            Some(held_out) => {
                let temperature = calibration::fit(&net, held_out, &device)?;
                eprintln!(
                    "fgn: temperature {temperature:.4} (fitted on {} held-out images)",
                    held_out.len()
                );
                out.insert("temperature".into(), json!(temperature));
                Some(temperature)
            }
            None => None,
        };
        let calibrated = calibration::Calibrated {
            model: &net,
            temperature: temperature.unwrap_or(1.0),
        };
        let report = evaluate(&calibrated, &data.test, &device)?;
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
        meta.insert("epochs".to_string(), epochs.to_string());
        meta.insert("lambda_sigma".to_string(), lambda_sigma.to_string());
        if let Some(temperature) = temperature {
            meta.insert(
                calibration::METADATA_KEY.to_string(),
                temperature.to_string(),
            );
        }
        checkpoint::save_with_metadata(&net, &args.out, &meta)
            .with_context(|| format!("cannot save the checkpoint to {}", args.out.display()))?;
        eprintln!("saved {}", args.out.display());
        out.insert("checkpoint".into(), json!(args.out.display().to_string()));
        if !args.ood.is_empty() {
            let ood = ood::report(&calibrated, &data.test, &args.ood, &device, "fgn")?;
            out.insert("ood".into(), ood);
        }
        if let Value::Object(fields) = report_json(&report)? {
            out.extend(fields);
        }
    }
    if let Some(classical) = classical {
        out.insert("classical".into(), classical);
    }
    examples_support::insert_timings(&mut out, started, fit_seconds);
    Ok(Value::Object(out))
}

/// The error of `eval` on data of `got` features for a checkpoint of `expected`, with a hint
/// that fits the data option given (`--data`, `--mnist`, `--data-dir` or none: the bundled
/// digits).
fn width_mismatch(args: &EvalArgs, expected: usize, got: usize) -> String {
    let digits = data::DIGITS_FEATURES;
    let (data, hint) = if let Some(file) = &args.data {
        (
            format!("`images` of {} have {got} columns", file.display()),
            if expected == digits {
                format!("give a file of (N, {expected}) images, or leave out --data to evaluate on the bundled 8×8 digits")
            } else {
                format!("give a file of (N, {expected}) images")
            },
        )
    } else if let Some((option, dir)) = args
        .mnist
        .as_ref()
        .map(|dir| ("--mnist", dir))
        .or(args.data_dir.as_ref().map(|dir| ("--data-dir", dir)))
    {
        (
            format!("the test images in {} have {got} pixels", dir.display()),
            if expected == digits {
                format!("it takes the 8×8 digits: leave out {option} to evaluate on the bundled ones, or pass --data FILE")
            } else {
                format!("give {option} a directory of images of {expected} pixels, or --data FILE")
            },
        )
    } else {
        (
            format!("the bundled 8×8 digits have {got}"),
            format!("pass its test data: --mnist DIR or --data-dir DIR (IDX images of {expected} pixels), or --data FILE"),
        )
    };
    format!("the checkpoint expects {expected} input features, {data}; {hint}")
}

fn eval(args: EvalArgs) -> Result<Value> {
    if let Some(scale) = args.input_scale {
        validate::finite_positive("--input-scale", scale)?;
    }
    let device = device(args.device)?;
    if cnn::is_cnn_checkpoint(&args.checkpoint)? {
        let Some(dir) = args.data_dir.as_deref().or(args.mnist.as_deref()) else {
            bail!("a CNN checkpoint is evaluated on IDX images: pass --data-dir DIR");
        };
        return cnn_cli::eval(
            &args.checkpoint,
            idx::test_split(dir)?,
            &args.ood,
            args.test_time_mirror,
            &device,
        );
    }
    if args.test_time_mirror {
        bail!("--test-time-mirror applies to CNN checkpoints; this one is an MLP");
    }
    let loaded = validate::load_checkpoint(&args.checkpoint, &device, None)?;
    validate::note_converted_dtype(&loaded, &device);
    let meta = &loaded.user_metadata;
    let scale = data::InputScale {
        recorded: validate::recorded_input_scale(meta, data::DIGITS_SCALE)?,
        declared: args.input_scale,
        // `train` records its data set; its networks saw pixels in [0, 1].
        unit_range: meta.contains_key("dataset"),
    };
    let classes = loaded.net.config().out_features;
    // The IDX sets and the bundled digits come divided by their own pixel range (255, 16);
    // the network takes its integer pixels divided by the scale its checkpoint records
    // (imported and converted networks record 1: raw pixels), so they are rescaled to it.
    // A checkpoint that records none (saved by other code) takes each set's own range.
    let records_scale = meta.contains_key("input_scale");
    let to_recorded = |split: Split, divided_by: f64| -> Result<Split> {
        if !records_scale || divided_by == scale.recorded {
            return Ok(split);
        }
        Ok(Split {
            images: (split.images * (divided_by / scale.recorded))?,
            labels: split.labels,
        })
    };
    let (split, bundled): (Split, bool) = match (&args.data, &args.mnist) {
        (Some(path), _) => (data::eval_file(path, scale, classes)?, false),
        (None, None) if args.data_dir.is_some() => (
            to_recorded(
                idx::test_split(args.data_dir.as_deref().unwrap_or(Path::new(".")))?.0,
                data::MNIST_SCALE,
            )?,
            false,
        ),
        (None, Some(dir)) => (
            to_recorded(data::mnist_test(dir)?, data::MNIST_SCALE)?,
            meta.get("dataset").is_some_and(|d| d == "mnist"),
        ),
        (None, None) => (
            to_recorded(data::digits()?.test, data::DIGITS_SCALE)?,
            meta.get("dataset").is_none_or(|d| d == "digits"),
        ),
    };
    let expected = loaded.net.config().in_features;
    if split.features() != expected {
        bail!(width_mismatch(&args, expected, split.features()));
    }
    // Before any work: each --ood set holds images of the network's input size.
    ood::check(&args.ood, ood::InDistribution::Pixels(expected))?;
    let temperature = calibration::recorded(meta)?;
    let calibrated = calibration::Calibrated {
        model: &loaded.net,
        temperature,
    };
    let report = evaluate(&calibrated, &split, &device)?;
    let mut out = serde_json::Map::new();
    out.insert("temperature".into(), json!(temperature));
    if !args.ood.is_empty() {
        let ood = ood::report(&calibrated, &split, &args.ood, &device, "fgn")?;
        out.insert("ood_report".into(), ood);
    }
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

examples_support::global_allocator!();

fn main() {
    let cli = Cli::parse();
    let result = examples_support::run_on_thread_pool(move || match cli.command {
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::Import(args) => interop::import(args),
        Command::Convert(args) => interop::convert(args),
        Command::Predict(args) => predict::predict(args),
    });
    examples_support::print_or_exit(result);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};
    use gauss_layer::GaussNet;

    fn run_eval(args: &[&str]) -> Result<Value> {
        let cli = Cli::try_parse_from([&["fgn-classifier", "eval"], args].concat())?;
        let Command::Eval(args) = cli.command else {
            unreachable!("parsed as eval")
        };
        eval(args)
    }

    /// `n` (height × width) test images of an IDX set, labels i % 3, and no train files.
    fn write_test_only(dir: &Path, n: u32, height: u32, width: u32) -> Result<()> {
        let pixels: Vec<u8> = (0..n * height * width).map(|v| (v % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
        std::fs::write(
            dir.join("t10k-images-idx3-ubyte"),
            idx::tests::idx_bytes(0x803, &[n, height, width], &pixels),
        )?;
        std::fs::write(
            dir.join("t10k-labels-idx1-ubyte"),
            idx::tests::idx_bytes(0x801, &[n], &labels),
        )?;
        Ok(())
    }

    /// An untrained MLP checkpoint of `in_features` inputs (`mlp.safetensors`) and the small
    /// CNN's (`cnn.safetensors`) in `dir`.
    fn save_small_checkpoints(dir: &Path, in_features: usize) -> Result<(PathBuf, PathBuf)> {
        let vars = VarMap::new();
        let net = GaussNet::new(
            GaussNetConfig {
                in_features,
                hidden: vec![4],
                out_features: 3,
                ..Default::default()
            },
            VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
        )?;
        let mlp = dir.join("mlp.safetensors");
        checkpoint::save(&net, &mlp)?;
        let (model, _vars) = cnn::tests::small();
        let cnn_ckpt = dir.join("cnn.safetensors");
        cnn::save(&model, &cnn_ckpt, &BTreeMap::new())?;
        Ok((mlp, cnn_ckpt))
    }

    /// `eval` reads only the test split it scores: a directory holding only the `t10k` files
    /// evaluates an MLP (`--data-dir`, `--mnist`) and a CNN checkpoint on all of its images.
    #[test]
    fn eval_needs_only_the_test_files() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("fgn-eval-t10k-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (mlp_data, cnn_data) = (dir.join("mlp"), dir.join("cnn"));
        std::fs::create_dir_all(&mlp_data)?;
        std::fs::create_dir_all(&cnn_data)?;
        write_test_only(&mlp_data, 5, 4, 3)?;
        write_test_only(&cnn_data, 4, 8, 6)?;

        let (mlp, cnn_ckpt) = save_small_checkpoints(&dir, 12)?;

        let (mlp, mlp_data) = (mlp.display().to_string(), mlp_data.display().to_string());
        let by_dir = run_eval(&[&mlp, "--data-dir", &mlp_data]);
        let by_mnist = run_eval(&[&mlp, "--mnist", &mlp_data]);
        let cnn_ckpt = cnn_ckpt.display().to_string();
        let cnn = run_eval(&[&cnn_ckpt, "--data-dir", &cnn_data.display().to_string()]);
        std::fs::remove_dir_all(&dir)?;
        for report in [by_dir?, by_mnist?] {
            assert_eq!(report["test_total"], 5, "{report}");
        }
        let cnn = cnn?;
        assert!(cnn["fgn"]["accuracy"].is_number(), "{cnn}");
        Ok(())
    }
    fn run_train(args: &[&str]) -> Result<Value> {
        let cli = Cli::try_parse_from([&["fgn-classifier", "train"], args].concat())?;
        let Command::Train(args) = cli.command else {
            unreachable!("parsed as train")
        };
        train(args)
    }

    /// `n` images (height × width) per split of an IDX set, train and test, labels i % 3.
    fn write_idx_set(dir: &Path, n: u32, height: u32, width: u32) -> Result<()> {
        write_test_only(dir, n, height, width)?;
        let pixels: Vec<u8> = (0..n * height * width)
            .map(|v| ((v * 37) % 251) as u8)
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
        std::fs::write(
            dir.join("train-images-idx3-ubyte"),
            idx::tests::idx_bytes(0x803, &[n, height, width], &pixels),
        )?;
        std::fs::write(
            dir.join("train-labels-idx1-ubyte"),
            idx::tests::idx_bytes(0x801, &[n], &labels),
        )?;
        Ok(())
    }

    /// The CNN's own learning rates are checked before any work, as `--lr` is: a bad
    /// `--head-lr` or `--precision-lr-scale` is named at once, not after reading the data
    /// (here: none) or training with it.
    #[test]
    fn train_cnn_checks_its_rates_before_any_work() {
        let missing = std::env::temp_dir().join(format!("fgn-no-such-dir-{}", std::process::id()));
        let missing = missing.display().to_string();
        let out =
            std::env::temp_dir().join(format!("fgn-rates-{}.safetensors", std::process::id()));
        let out = out.display().to_string();
        for (option, value) in [
            ("--head-lr", "-1"),
            ("--head-lr", "NaN"),
            ("--head-lr", "0"),
            ("--precision-lr-scale", "inf"),
            ("--precision-lr-scale", "-0.5"),
        ] {
            let given = format!("{option}={value}");
            let args = [
                "--arch",
                "cnn",
                "--data-dir",
                &missing,
                "--out",
                &out,
                &given,
            ];
            let e = run_train(&args).unwrap_err().to_string();
            assert!(e.contains(option), "{option} {value}: {e}");
        }
    }

    /// `--trace-probes` reaches the CNN FGN's λ-loss: with cholesky Gaussian layers and a
    /// λ-loss weight, a Hutchinson estimate (3 probes) trains a different network than the
    /// exact trace, while two exact runs of the same seed give the same checkpoint.
    #[test]
    fn train_cnn_uses_the_trace_probes() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("fgn-cnn-probes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        write_idx_set(&dir, 12, 8, 6)?;
        let data = dir.display().to_string();
        let run = |name: &str, probes: &str| -> Result<(Value, Vec<u8>)> {
            let out = dir.join(format!("{name}.safetensors"));
            let out_arg = out.display().to_string();
            let args = [
                "--arch",
                "cnn",
                "--data-dir",
                &data,
                "--fgn-only",
                "--param",
                "cholesky",
                "--channels",
                "2",
                "--features",
                "4",
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--lambda-sigma",
                "0.5",
                "--trace-probes",
                probes,
                "--out",
                &out_arg,
            ];
            let report = run_train(&args)?;
            let tensors = candle_core::safetensors::load(&out, &Device::Cpu)?;
            let mut names: Vec<_> = tensors.keys().cloned().collect();
            names.sort();
            let mut bytes = Vec::new();
            for name in names {
                let t = tensors[&name].flatten_all()?.to_dtype(DType::F32)?;
                for v in t.to_vec1::<f32>()? {
                    bytes.extend(v.to_le_bytes());
                }
            }
            Ok((report, bytes))
        };
        let exact = run("exact", "0");
        let again = run("again", "0");
        let probed = run("probed", "3");
        std::fs::remove_dir_all(&dir)?;
        let ((exact, exact_values), (_, again_values)) = (exact?, again?);
        let (probed, probed_values) = probed?;
        assert_eq!(exact["trace_probes"], 0, "{exact}");
        assert_eq!(probed["trace_probes"], 3, "{probed}");
        assert!(exact_values == again_values, "one seed, two checkpoints");
        assert_ne!(
            exact_values, probed_values,
            "--trace-probes changed nothing"
        );
        Ok(())
    }
    /// The options only `--arch cnn` reads are refused with the MLP, as `--augment` is,
    /// instead of being ignored; left at their defaults they do not stand in the way.
    #[test]
    fn train_mlp_refuses_the_cnn_only_options() {
        for given in [
            "--channels=8",
            "--trunk-batch-norm",
            "--features=32",
            "--feature-activation=tanh",
            "--tied-bias",
            "--feature-batch-norm=false",
            "--head-lr=1e-3",
        ] {
            let e = run_train(&["--fgn-only", "--epochs=0", given])
                .unwrap_err()
                .to_string();
            let option = given.split('=').next().unwrap_or(given);
            assert!(
                e.contains(option) && e.contains("--arch cnn"),
                "{given}: {e}"
            );
        }
        // Defaults given explicitly are no change.
        let e = run_train(&[
            "--fgn-only",
            "--epochs=0",
            "--head-lr=0.01",
            "--features=64",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--epochs"), "{e}");
    }

    /// Every `--ood` set is checked before any training or saving: a directory without the
    /// IDX test files, or of images of another size (FashionMNIST's 28×28 beside the 8×8
    /// digits), ends `train` at once with an error naming `--ood`, and no checkpoint is
    /// written; the CNN's sets must match its images' height and width, not only their pixel
    /// count.
    #[test]
    fn train_checks_every_ood_set_before_any_work() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("fgn-train-ood-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (empty, small, cnn_data, turned) = (
            dir.join("empty"),
            dir.join("small"),
            dir.join("cnn"),
            dir.join("turned"),
        );
        for d in [&empty, &small, &cnn_data, &turned] {
            std::fs::create_dir_all(d)?;
        }
        write_test_only(&small, 3, 4, 3)?;
        write_idx_set(&cnn_data, 12, 8, 6)?;
        write_test_only(&turned, 3, 6, 8)?;
        let out = dir.join("net.safetensors");
        let out_arg = out.display().to_string();
        let path = |d: &Path| d.display().to_string();
        let mut errors = Vec::new();
        for ood in [&empty, &small] {
            for only in ["--fgn-only", "--classical-only"] {
                let args = [only, "--epochs", "1", "--out", &out_arg, "--ood", "noise"];
                let e = run_train(&[&args[..], &["--ood", &path(ood)]].concat());
                errors.push(format!("{:#}", e.unwrap_err()));
            }
        }
        let cnn = run_train(&[
            "--arch",
            "cnn",
            "--data-dir",
            &path(&cnn_data),
            "--channels",
            "2",
            "--features",
            "4",
            "--epochs",
            "1",
            "--out",
            &out_arg,
            "--ood",
            &path(&turned),
        ]);
        let written = out.exists();
        std::fs::remove_dir_all(&dir)?;
        assert!(!written, "a checkpoint was saved");
        for e in &errors[..2] {
            assert!(e.starts_with("--ood") && e.contains("no IDX file"), "{e}");
        }
        for e in &errors[2..] {
            assert!(
                e.contains("4×3 (12 pixels)") && e.contains("have 64 pixels"),
                "{e}"
            );
        }
        let e = format!("{:#}", cnn.unwrap_err());
        assert!(
            e.contains("6×8 (48 pixels)") && e.contains("are 8×6"),
            "{e}"
        );
        Ok(())
    }

    /// `eval --ood` is checked before any evaluation, for an MLP and a CNN checkpoint.
    #[test]
    fn eval_checks_every_ood_set_before_any_work() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("fgn-eval-ood-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (data, turned, empty) = (dir.join("data"), dir.join("turned"), dir.join("empty"));
        for d in [&data, &turned, &empty] {
            std::fs::create_dir_all(d)?;
        }
        write_test_only(&data, 4, 8, 6)?;
        write_test_only(&turned, 3, 6, 8)?;
        let (mlp, cnn_ckpt) = save_small_checkpoints(&dir, 48)?;
        let path = |d: &Path| d.display().to_string();
        let data_arg = path(&data);
        let cnn_turned = run_eval(&[
            &path(&cnn_ckpt),
            "--data-dir",
            &data_arg,
            "--ood",
            &path(&turned),
        ]);
        let cnn_empty = run_eval(&[
            &path(&cnn_ckpt),
            "--data-dir",
            &data_arg,
            "--ood",
            &path(&empty),
        ]);
        let mlp_empty = run_eval(&[&path(&mlp), "--data-dir", &data_arg, "--ood", &path(&empty)]);
        // The MLP reads images as vectors: 6×8 beside 8×6 is scored.
        let mlp_turned = run_eval(&[
            &path(&mlp),
            "--data-dir",
            &data_arg,
            "--ood",
            &path(&turned),
        ]);
        std::fs::remove_dir_all(&dir)?;
        let e = format!("{:#}", cnn_turned.unwrap_err());
        assert!(e.starts_with("--ood") && e.contains("are 8×6"), "{e}");
        for result in [cnn_empty, mlp_empty] {
            let e = format!("{:#}", result.unwrap_err());
            assert!(e.starts_with("--ood") && e.contains("no IDX file"), "{e}");
        }
        let report = mlp_turned?;
        assert!(report["ood_report"]["ood"].is_object(), "{report}");
        Ok(())
    }

    /// `--param lowrank --rank R` and `--param lowrank:R` name one parameterization; the
    /// errors speak of the options (`--rank must be >= 1`), never of the library's
    /// `lowrank:R` form as if the user had written it.
    #[test]
    fn param_and_rank_are_read_and_refused_in_the_options_terms() {
        let lowrank = |rank| Parameterization::LowRank { rank };
        assert_eq!(parameterization("lowrank", Some(3)).unwrap(), lowrank(3));
        assert_eq!(parameterization("lowrank:3", None).unwrap(), lowrank(3));
        assert_eq!(parameterization("lowrank:3", Some(3)).unwrap(), lowrank(3));
        assert_eq!(
            parameterization("cholesky", None).unwrap(),
            Parameterization::Cholesky
        );
        for (param, rank, needle) in [
            ("lowrank", Some(0), "--rank must be >= 1, got 0"),
            ("lowrank:0", None, "--param lowrank:0"),
            ("lowrank:x", None, "whole number >= 1"),
            ("lowrank:3", Some(4), "--rank 4"),
            ("lowrank", None, "add --rank R"),
            ("diag", Some(2), "--param diag has none"),
        ] {
            let e = parameterization(param, rank).unwrap_err().to_string();
            assert!(
                e.contains(needle) && !e.contains("got \"lowrank"),
                "{param} {rank:?}: {e}"
            );
        }
        // Through clap: `lowrank:R` passes the value parser, which still lists the names.
        let e = run_train(&["--param", "lowrank:0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--param lowrank:0"), "{e}");
        let e = run_train(&["--param", "lowrank", "--rank", "0"])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--rank must be >= 1, got 0");
        let e = run_train(&["--param", "low"]).unwrap_err().to_string();
        assert!(e.contains("possible values"), "{e}");
        // R above a layer's inputs is refused before any training, naming both ways of
        // giving R (this one came as lowrank:9, not --rank).
        let e = run_train(&["--fgn-only", "--param", "lowrank:9", "--hidden", "8"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 9 (--param lowrank:R or --rank)") && e.contains("8 inputs"),
            "{e}"
        );
    }

    /// A checkpoint of another input width: the hint fits the data option given.
    #[test]
    fn eval_width_errors_fit_the_option_given() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("fgn-eval-width-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        write_test_only(&dir, 3, 4, 3)?;
        let save = |in_features: usize, name: &str| -> Result<String> {
            let vars = VarMap::new();
            let net = GaussNet::new(
                GaussNetConfig {
                    in_features,
                    hidden: vec![4],
                    out_features: 10,
                    ..Default::default()
                },
                VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
            )?;
            let path = dir.join(name);
            checkpoint::save(&net, &path)?;
            Ok(path.display().to_string())
        };
        let (digits, wide) = (
            save(64, "digits.safetensors")?,
            save(784, "wide.safetensors")?,
        );
        let data = dir.display().to_string();
        let error = |args: &[&str]| format!("{:#}", run_eval(args).unwrap_err());
        let by_mnist = error(&[&digits, "--mnist", &data]);
        let by_dir = error(&[&digits, "--data-dir", &data]);
        let wide_dir = error(&[&wide, "--data-dir", &data]);
        let bundled = error(&[&wide]);
        std::fs::remove_dir_all(&dir)?;
        assert!(
            by_mnist.contains("have 12 pixels") && by_mnist.contains("leave out --mnist"),
            "{by_mnist}"
        );
        assert!(by_dir.contains("leave out --data-dir"), "{by_dir}");
        assert!(
            wide_dir.contains("give --data-dir a directory of images of 784 pixels"),
            "{wide_dir}"
        );
        assert!(
            bundled.contains("the bundled 8×8 digits have 64") && bundled.contains("--mnist DIR"),
            "{bundled}"
        );
        for e in [by_mnist, by_dir, wide_dir, bundled] {
            assert!(!e.contains("pass --data or --mnist"), "{e}");
        }
        Ok(())
    }
}
