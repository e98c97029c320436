//! Times whole training steps of a `GaussNet`: forward, the FGN objective
//! (`gauss_losses::fgn_objective`), backward, optimizer step, for each parameterization, with
//! candle-nn's `AdamW` and with `gauss_layer::FusedAdamW`. Prints one JSON line.
//!
//! The network and objective are those of `fgn-classifier train --fgn-only` (in → hidden
//! with tanh, gated → classes; cross-entropy + λ_l2·mean w² + λ_sig·λ-loss; lr 1e-2, no weight
//! decay; `direct` precisions repaired into the PD cone where a step left them), on synthetic class
//! clusters in [0, 1]^in with the first layer's centers on training points. Every
//! (parameterization, optimizer) pair is its own network from the same seed; a
//! round runs `--steps` steps of each pair back to back, so a slow spell of a shared machine
//! hits them alike. Times are medians over rounds; `speedup` is the median per-round ratio of
//! candle-nn's step time to this one's. Both optimizers must end on identical parameters
//! (`identical_to_candle_adamw`). An error is one line on stderr (`error: ...`) and exit
//! status 1.
//!
//! ```text
//! cargo run --release -p bench --bin bench-train -- --steps 20 --rounds 5
//! cargo run --release -p bench --bin bench-train -- --in 784 --params diag,sphere
//! ```

mod alloc;
mod timing;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use gauss_layer::FusedAdamW;
use gauss_layer::{
    memory, repair, GaussLayerConfig, GaussNet, GaussNetConfig, InitConfig, Parameterization,
    PrecisionConfig,
};
use gauss_losses::{fgn_objective, FgnObjectiveConfig, TraceEstimator};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use timing::{median, median_ratio, Timing};

/// Smallest eigenvalue a `direct` precision is repaired to after a step (as fgn-classifier).
const DIRECT_MIN_EIGENVALUE: f64 = 1e-3;

#[global_allocator]
static ALLOCATOR: alloc::CountingAllocator = alloc::CountingAllocator;

#[derive(Parser, Debug)]
#[command(about = "Time GaussNet training steps with candle-nn's AdamW and FusedAdamW")]
struct Args {
    /// Parameterizations, comma separated: cholesky, direct, expm, diag, sphere, or
    /// lowrank:R (precision diag(e^θ) + U Uᵀ with R columns of U, 1 <= R <= the layer's
    /// input width), e.g. `diag,lowrank:4`.
    #[arg(
        long,
        default_value = "cholesky,direct,expm,diag,sphere",
        value_delimiter = ','
    )]
    params: Vec<String>,
    /// Input width (>= 1).
    #[arg(long = "in", default_value_t = 64, value_parser = count)]
    in_features: usize,
    /// Hidden width(s), each >= 1 (repeat for more layers).
    #[arg(long, default_values_t = vec![64], value_parser = count)]
    hidden: Vec<usize>,
    /// Classes (output width, >= 1).
    #[arg(long, default_value_t = 10, value_parser = count)]
    classes: usize,
    /// Mini-batch size (>= 1).
    #[arg(long, default_value_t = 64, value_parser = count)]
    batch: usize,
    /// Synthetic training points (>= 1; cycled through in order).
    #[arg(long, default_value_t = 1024, value_parser = count)]
    samples: usize,
    /// Optimizer steps per round and network (>= 1).
    #[arg(long, default_value_t = 20, value_parser = count)]
    steps: usize,
    /// Timed rounds (>= 1; medians are reported).
    #[arg(long, default_value_t = 5, value_parser = count)]
    rounds: usize,
    /// Untimed rounds first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Adam learning rate (finite, > 0).
    #[arg(long, default_value_t = 1e-2, value_parser = learning_rate)]
    lr: f64,
    /// Weight of the mean squared linear weight (finite, >= 0).
    #[arg(long, default_value_t = 1e-3, value_parser = loss_weight)]
    lambda_l2: f64,
    /// Weight of the λ-loss (finite, >= 0).
    #[arg(long, default_value_t = 0.05, value_parser = loss_weight)]
    lambda_sigma: f64,
    /// Probe vectors per neuron and step for the λ-loss's tr Σ of cholesky layers (a
    /// Hutchinson estimate); 0 = the exact trace.
    #[arg(long, default_value_t = 0)]
    trace_probes: usize,
    /// f32 or f64.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of the data and of every network's initialization.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Serialize)]
struct Report {
    in_features: usize,
    hidden: Vec<usize>,
    classes: usize,
    batch: usize,
    steps: usize,
    rounds: usize,
    dtype: String,
    device: String,
    threads: usize,
    results: Vec<PairReport>,
}

#[derive(Serialize)]
struct PairReport {
    param: String,
    optimizer: &'static str,
    /// Median over rounds of the mean time of one whole step.
    step_ms: f64,
    /// Fastest round's mean step time.
    step_min_ms: f64,
    /// Medians over rounds of the mean time per step of each phase.
    forward_objective_ms: f64,
    backward_ms: f64,
    /// The optimizer step (and, for `direct`, the repair of the precisions into the
    /// positive-definite cone after it).
    optimizer_ms: f64,
    /// Heap allocations per step, all phases, and those of the optimizer step alone.
    allocs_per_step: f64,
    alloc_mb_per_step: f64,
    optimizer_allocs_per_step: f64,
    optimizer_alloc_mb_per_step: f64,
    /// Median over rounds of the most heap one step needed at once beyond what was live
    /// before it (activations, gradients, optimizer temporaries).
    step_peak_mb: f64,
    /// Objective after the last step.
    final_loss: f64,
    /// `FusedAdamW` only: median per-round ratio of candle-nn's step time to this one's.
    #[serde(skip_serializing_if = "Option::is_none")]
    speedup: Option<f64>,
    /// `FusedAdamW` only: every parameter equal, bit for bit, to the candle-nn run's.
    #[serde(skip_serializing_if = "Option::is_none")]
    identical_to_candle_adamw: Option<bool>,
}

enum Opt {
    Candle(AdamW),
    Fused(FusedAdamW),
}

impl Opt {
    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        match self {
            Opt::Candle(opt) => opt.step(grads),
            Opt::Fused(opt) => opt.step(grads),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Opt::Candle(_) => "candle_nn::AdamW",
            Opt::Fused(_) => "FusedAdamW",
        }
    }
}

/// Per-step phase sums of one round.
#[derive(Default, Clone, Copy)]
struct Phases {
    forward: f64,
    backward: f64,
    optimizer: f64,
    allocs: usize,
    bytes: usize,
    opt_allocs: usize,
    opt_bytes: usize,
    /// Most heap bytes any step of the round had allocated at once beyond what was live
    /// before it.
    peak_bytes: usize,
}

/// One network with its optimizer and its measurements.
struct Pair {
    param: Parameterization,
    net: GaussNet,
    varmap: VarMap,
    opt: Opt,
    /// `direct` precisions, tested after every step and repaired where needed (part of the
    /// optimizer phase).
    direct: Vec<Var>,
    cursor: usize,
    rounds: Vec<Phases>,
    step_times: Vec<f64>,
    last_loss: f64,
}

/// Synthetic classes: one random prototype in [0, 1]^d per class, points scattered around it.
fn synthetic(args: &Args, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let d = args.in_features;
    let prototypes: Vec<f32> = (0..args.classes * d).map(|_| rng.random()).collect();
    let mut images = Vec::with_capacity(args.samples * d);
    let mut labels = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let label = rng.random_range(0..args.classes);
        labels.push(label as u32);
        for j in 0..d {
            let v = prototypes[label * d + j] + 0.3 * (rng.random::<f32>() - 0.5);
            images.push(v.clamp(0.0, 1.0));
        }
    }
    let images = Tensor::from_vec(images, (args.samples, d), device)?.to_dtype(dtype)?;
    let labels = Tensor::from_vec(labels, args.samples, device)?;
    Ok((images, labels))
}

fn net_config(args: &Args, param: Parameterization) -> GaussNetConfig {
    let init = InitConfig {
        seed: Some(args.seed),
        ..Default::default()
    };
    GaussNetConfig {
        in_features: args.in_features,
        hidden: args.hidden.clone(),
        out_features: args.classes,
        layer: GaussLayerConfig {
            precision: PrecisionConfig::with_parameterization(param),
            tanh: true,
            init: init.clone(),
            ..Default::default()
        },
        output_layer: Some(GaussLayerConfig {
            precision: PrecisionConfig::with_parameterization(param),
            init,
            ..Default::default()
        }),
        gate: true,
        ..Default::default()
    }
}

fn build_pair(
    args: &Args,
    param: Parameterization,
    fused: bool,
    images: &Tensor,
    dtype: DType,
    device: &Device,
) -> Result<Pair> {
    let mut varmap = VarMap::new();
    let net = GaussNet::new(
        net_config(args, param),
        VarBuilder::from_varmap(&varmap, dtype, device),
    )?;
    // First-layer centers on the first training points (as fgn-classifier puts them on images).
    let first = net.layers().first().map_or(0, |l| l.out_features());
    let centers = images.narrow(0, 0, first.min(images.dim(0)?))?;
    if centers.dim(0)? == first {
        varmap.set_one("layers.0.center", centers)?;
    }
    let params = ParamsAdamW {
        lr: args.lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let opt = if fused {
        Opt::Fused(FusedAdamW::new(varmap.all_vars(), params)?)
    } else {
        Opt::Candle(AdamW::new(varmap.all_vars(), params)?)
    };
    let direct = repair::direct_vars(&varmap, net.layers())?;
    Ok(Pair {
        param,
        net,
        varmap,
        opt,
        direct,
        cursor: 0,
        rounds: Vec::new(),
        step_times: Vec::new(),
        last_loss: f64::NAN,
    })
}

impl Pair {
    /// `steps` training steps; returns the phase sums.
    fn run(
        &mut self,
        steps: usize,
        batch: usize,
        images: &Tensor,
        labels: &Tensor,
        objective: &FgnObjectiveConfig,
        device: &Device,
    ) -> Result<Phases> {
        let n = images.dim(0)?;
        let mut phases = Phases::default();
        let mut last = None;
        for _ in 0..steps {
            // Every batch is full (the JSON's `batch`): one that runs past the end wraps to
            // the start (`--batch` ≤ `--samples` is checked up front).
            let rows = |t: &Tensor| -> Result<Tensor> {
                let head = batch.min(n - self.cursor);
                let first = t.narrow(0, self.cursor, head)?;
                Ok(if head == batch {
                    first
                } else {
                    Tensor::cat(&[&first, &t.narrow(0, 0, batch - head)?], 0)?
                })
            };
            let (x, y) = (rows(images)?, rows(labels)?);
            self.cursor = (self.cursor + batch) % n;
            let live = alloc::live_bytes();
            alloc::reset_peak();
            let (allocs0, bytes0) = alloc::allocations();
            let t0 = Instant::now();
            let logits = self.net.forward(&x, true)?;
            let loss = fgn_objective(&logits, &y, self.net.layers(), objective)?;
            device.synchronize()?;
            let t1 = Instant::now();
            let grads = loss.total.backward()?;
            device.synchronize()?;
            let t2 = Instant::now();
            let (allocs1, bytes1) = alloc::allocations();
            self.opt.step(&grads)?;
            for precision in &self.direct {
                repair::repair_var_if_needed(precision, DIRECT_MIN_EIGENVALUE)?;
            }
            device.synchronize()?;
            let t3 = Instant::now();
            let (allocs2, bytes2) = alloc::allocations();
            drop(grads);
            phases.peak_bytes = phases
                .peak_bytes
                .max(alloc::peak_bytes().saturating_sub(live));
            phases.forward += (t1 - t0).as_secs_f64() * 1e3;
            phases.backward += (t2 - t1).as_secs_f64() * 1e3;
            phases.optimizer += (t3 - t2).as_secs_f64() * 1e3;
            phases.allocs += allocs2 - allocs0;
            phases.bytes += bytes2 - bytes0;
            phases.opt_allocs += allocs2 - allocs1;
            phases.opt_bytes += bytes2 - bytes1;
            last = Some(loss.total.detach());
        }
        // Read once after the timed steps (a per-step read would be a sync on a GPU), on the
        // host before widening (Metal has no f64).
        if let Some(loss) = last {
            self.last_loss = loss
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()
                .context("reading the loss")?;
        }
        Ok(phases)
    }
}

/// Every variable's values as f64 bit patterns, by name.
fn bits(varmap: &VarMap) -> Result<Vec<(String, Vec<u64>)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    let mut out: Vec<(String, Vec<u64>)> = data
        .iter()
        .map(|(name, var): (&String, &Var)| {
            let values = var
                .as_tensor()
                .flatten_all()?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            Ok((name.clone(), values.into_iter().map(f64::to_bits).collect()))
        })
        .collect::<Result<_>>()?;
    out.sort();
    Ok(out)
}

fn main() {
    let args = Args::parse();
    let report = examples_support::run_on_thread_pool(move || {
        report(&args).and_then(|r| Ok(serde_json::to_string(&r)?))
    });
    examples_support::print_or_exit(report);
}

/// A count of the command line: a whole number >= 1 (0 would time or build nothing, and
/// `synthetic` draws labels from `0..classes`, which panics when empty).
fn count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1, got 0".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("must be a whole number >= 1 ({e})")),
    }
}

/// A learning rate: finite and > 0 (0 trains nothing; the optimizers refuse a negative one
/// only when built).
fn learning_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(lr) if lr.is_finite() && lr > 0.0 => Ok(lr),
        Ok(lr) => Err(format!("must be a finite number > 0, got {lr}")),
        Err(e) => Err(format!("must be a finite number > 0 ({e})")),
    }
}

/// A loss weight (`--lambda-l2`, `--lambda-sigma`): finite and >= 0, refused while parsing.
fn loss_weight(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(w) if w.is_finite() && w >= 0.0 => Ok(w),
        Ok(w) => Err(format!("must be a finite number >= 0, got {w}")),
        Err(e) => Err(format!("must be a finite number >= 0 ({e})")),
    }
}

/// Refuses networks and data that cannot fit before any is allocated: per parameterization
/// two networks (candle-nn's and the fused optimizer's), each parameter with its gradient and
/// Adam's two moments, and the synthetic data (built on the host, then copied). A lower
/// bound: the activations come on top. Checked against the machine's memory and
/// `ulimit -v` on the CPU ([`memory::check_fits`]); elsewhere only an overflow is refused.
fn check_size(args: &Args, params: &[Parameterization], dtype: DType, cpu: bool) -> Result<()> {
    let mut elements = args
        .samples
        .checked_mul(args.in_features)
        .and_then(|n| n.checked_mul(2))
        .map(|n| n as u64);
    for &param in params {
        let net = memory::network_elements(&net_config(args, param)).with_context(|| {
            format!(
                "--in {} --hidden {:?} --classes {}",
                args.in_features, args.hidden, args.classes
            )
        })?;
        elements = elements.and_then(|e| e.checked_add(net.checked_mul(2 * 4)?));
    }
    let estimate = elements.and_then(|e| e.checked_mul(dtype.size_in_bytes() as u64));
    if cpu || estimate.is_none() {
        memory::check_fits(
            &format!(
                "training {} network(s) of widths {} -> {:?} -> {} on {} samples",
                2 * params.len(),
                args.in_features,
                args.hidden,
                args.classes,
                args.samples
            ),
            estimate,
        )?;
    }
    Ok(())
}

/// The seed of the trace probes of round `round` of parameterization `param` (its candle-nn
/// and its fused network alike).
fn probe_seed(seed: u64, round: usize, param: usize) -> u64 {
    let stream = ((round as u64) << 32) | param as u64;
    seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn report(args: &Args) -> Result<Report> {
    let params = args
        .params
        .iter()
        .map(|name| name.trim().parse())
        .collect::<gauss_layer::Result<Vec<Parameterization>>>()?;
    gauss_layer::seed_trace_probes(args.seed);
    let device = examples_support::device(&args.device)?;
    let dtype = examples_support::dtype(&args.dtype)?;
    if args.batch > args.samples {
        bail!(
            "--batch {} is more than the {} --samples; every step takes a full batch",
            args.batch,
            args.samples
        );
    }
    check_size(args, &params, dtype, device.is_cpu())?;
    let widths: Vec<usize> = std::iter::once(args.in_features)
        .chain(args.hidden.iter().copied())
        .chain(std::iter::once(args.classes))
        .collect();
    for &param in &params {
        examples_support::check_trace_probes(&widths, param, args.trace_probes, dtype)?;
    }
    let (images, labels) = synthetic(args, dtype, &device)?;
    let objective = FgnObjectiveConfig {
        lambda_l2: args.lambda_l2,
        lambda_sigma: args.lambda_sigma,
        trace_estimator: match args.trace_probes {
            0 => TraceEstimator::Exact,
            probes => TraceEstimator::Hutchinson { probes },
        },
        ..Default::default()
    };
    let mut pairs = Vec::new();
    for &param in &params {
        for fused in [false, true] {
            pairs.push(build_pair(args, param, fused, &images, dtype, &device)?);
        }
    }
    for round in 0..args.warmup + args.rounds {
        for (i, pair) in pairs.iter_mut().enumerate() {
            // Both optimizers of a parameterization draw the same Hutchinson probes (a
            // process-wide stream): otherwise their gradients differ from the first step
            // and `identical_to_candle_adamw` says false of two identical optimizers.
            gauss_layer::seed_trace_probes(probe_seed(args.seed, round, i / 2));
            let start = Instant::now();
            let phases = pair.run(
                args.steps, args.batch, &images, &labels, &objective, &device,
            )?;
            let elapsed = start.elapsed().as_secs_f64() * 1e3;
            if round >= args.warmup {
                pair.rounds.push(phases);
                pair.step_times.push(elapsed / args.steps as f64);
            }
        }
    }

    let per_step = |pair: &Pair, f: fn(&Phases) -> f64| {
        let values: Vec<f64> = pair.rounds.iter().map(f).collect();
        median(&values) / args.steps as f64
    };
    let mut results = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        let reference = (i % 2 == 1).then(|| &pairs[i - 1]);
        let speedup = reference.map(|r| median_ratio(&r.step_times, &pair.step_times));
        let identical = match reference {
            Some(r) => Some(bits(&r.varmap)? == bits(&pair.varmap)?),
            None => None,
        };
        let timing = Timing::of(&pair.step_times);
        results.push(PairReport {
            // `lowrank:R`, not `lowrank`: two ranks in one run stay apart.
            param: pair.param.to_string(),
            optimizer: pair.opt.name(),
            step_ms: timing.median,
            step_min_ms: timing.min,
            forward_objective_ms: per_step(pair, |p| p.forward),
            backward_ms: per_step(pair, |p| p.backward),
            optimizer_ms: per_step(pair, |p| p.optimizer),
            allocs_per_step: per_step(pair, |p| p.allocs as f64),
            alloc_mb_per_step: per_step(pair, |p| p.bytes as f64) / 1e6,
            optimizer_allocs_per_step: per_step(pair, |p| p.opt_allocs as f64),
            optimizer_alloc_mb_per_step: per_step(pair, |p| p.opt_bytes as f64) / 1e6,
            step_peak_mb: median(
                &pair
                    .rounds
                    .iter()
                    .map(|p| p.peak_bytes as f64 / 1e6)
                    .collect::<Vec<_>>(),
            ),
            final_loss: pair.last_loss,
            speedup,
            identical_to_candle_adamw: identical,
        });
    }
    Ok(Report {
        in_features: args.in_features,
        hidden: args.hidden.clone(),
        classes: args.classes,
        batch: args.batch,
        steps: args.steps,
        rounds: args.rounds,
        dtype: args.dtype.clone(),
        device: args.device.clone(),
        threads: rayon::current_num_threads(),
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        args_with_batch("4", extra)
    }

    /// The tiny run of `args` with `--batch batch`.
    fn args_with_batch(batch: &str, extra: &[&str]) -> Args {
        let base = [
            "bench-train",
            "--in",
            "3",
            "--hidden",
            "4",
            "--samples",
            "8",
        ];
        let tiny = [
            "--batch", batch, "--steps", "1", "--rounds", "1", "--warmup", "0",
        ];
        Args::parse_from(base.iter().chain(&tiny).chain(extra))
    }

    fn parse_err(extra: &[&str]) -> String {
        Args::try_parse_from(std::iter::once(&"bench-train").chain(extra))
            .err()
            .unwrap_or_else(|| panic!("{extra:?} must be refused"))
            .to_string()
    }

    /// Counts of 0 and learning rates that are not finite and > 0 are refused by the
    /// command line, naming the option, instead of being run or reported as another value.
    #[test]
    fn zero_counts_and_bad_learning_rates_are_refused_naming_the_option() {
        for option in [
            "--in",
            "--hidden",
            "--classes",
            "--batch",
            "--samples",
            "--steps",
            "--rounds",
        ] {
            let e = parse_err(&[option, "0"]);
            assert!(e.contains(option) && e.contains("at least 1, got 0"), "{e}");
        }
        for lr in ["0", "-1", "nan", "inf", "-inf", "x"] {
            let e = parse_err(&[&format!("--lr={lr}")]);
            assert!(e.contains("--lr") && e.contains("finite number > 0"), "{e}");
        }
        assert!(Args::try_parse_from(["bench-train", "--lr", "1e-3", "--warmup", "0"]).is_ok());
        for option in ["--lambda-l2", "--lambda-sigma"] {
            for weight in ["-1", "nan", "inf", "x"] {
                let e = parse_err(&[&format!("{option}={weight}")]);
                assert!(
                    e.contains(option) && e.contains("finite number >= 0"),
                    "{e}"
                );
            }
            assert!(Args::try_parse_from(["bench-train", option, "0"]).is_ok());
        }
    }

    /// Networks that cannot fit (or whose size overflows) are refused before any is built.
    #[test]
    fn sizes_that_cannot_fit_are_refused_first() {
        for hidden in ["1000000", "4611686018427387904"] {
            let e = format!(
                "{:#}",
                report(&args(&["--params", "cholesky", "--hidden", hidden]))
                    .err()
                    .expect("too large")
            );
            assert!(e.contains("needs about") || e.contains("overflows"), "{e}");
            if e.contains("overflows") {
                assert!(
                    e.starts_with("--in ") && e.contains(&format!("{hidden}]")),
                    "{e}"
                );
            }
        }
    }

    /// A batch larger than the data (it was shrunk to the data while the JSON reported the
    /// requested size) and probe counts that cannot fit are refused before any work.
    #[test]
    fn batches_past_the_data_and_unfit_probe_counts_are_refused_first() {
        let e = format!(
            "{:#}",
            report(&args_with_batch("9", &[]))
                .err()
                .expect("batch 9 of 8 samples")
        );
        assert!(e.contains("--batch 9") && e.contains("8 --samples"), "{e}");
        let e = format!(
            "{:#}",
            report(&args(&[
                "--params",
                "cholesky",
                "--trace-probes",
                "100000000000000"
            ]))
            .err()
            .expect("too many probes")
        );
        assert!(e.contains("--trace-probes 100000000000000"), "{e}");
    }

    /// The trace probes are a process-wide stream: tests that train take turns.
    static PROBES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// With Hutchinson probes (cholesky, `--trace-probes`), candle-nn's AdamW and
    /// `FusedAdamW` still see the same gradients, so the report finds them identical (as
    /// it does with the exact trace), over several steps and rounds.
    #[test]
    fn optimizers_compare_on_the_same_trace_probes() -> Result<()> {
        let _turn = PROBES.lock().unwrap_or_else(|e| e.into_inner());
        for probes in ["0", "2"] {
            let args = Args::parse_from([
                "bench-train",
                "--in",
                "3",
                "--hidden",
                "4",
                "--samples",
                "8",
                "--batch",
                "4",
                "--warmup",
                "0",
                "--classes",
                "2",
                "--params",
                "cholesky",
                "--lambda-sigma",
                "0.5",
                "--trace-probes",
                probes,
                "--steps",
                "3",
                "--rounds",
                "2",
            ]);
            let report = report(&args)?;
            let fused = &report.results[1];
            assert_eq!(fused.optimizer, "FusedAdamW");
            assert_eq!(
                fused.identical_to_candle_adamw,
                Some(true),
                "--trace-probes {probes}"
            );
        }
        Ok(())
    }

    #[test]
    fn lowrank_results_carry_their_rank() -> Result<()> {
        let _turn = PROBES.lock().unwrap_or_else(|e| e.into_inner());
        let report = report(&args(&[
            "--classes",
            "2",
            "--params",
            "lowrank:1,lowrank:2",
        ]))?;
        let params: Vec<&str> = report.results.iter().map(|r| r.param.as_str()).collect();
        assert_eq!(params, ["lowrank:1", "lowrank:1", "lowrank:2", "lowrank:2"]);
        Ok(())
    }
}
