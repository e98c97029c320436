//! Times one Gaussian-neuron layer (forward, and forward + backward of `sum(y)` to every
//! parameter) against one Candle matmul of equal FLOPs, (B, d) × (d, Z·d), in the same run,
//! and measures the peak heap during one forward. Prints one JSON line.
//!
//! Timing runs in rounds: each round runs the matmul, the forward and (with `--backward`)
//! forward + backward once each, back to back, after warm-up rounds. Times are medians over
//! rounds; the ratios are medians of the per-round ratios, so a slow spell of a shared machine
//! hits the layer and its reference alike.
//!
//! ```text
//! cargo run --release -p bench -- --batch 256 --in 32 --out 64 --param cholesky --backward
//! ```

mod alloc;
mod timing;

use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_nn::{Module, VarBuilder, VarMap};
use clap::Parser;
use gauss_layer::{
    gauss_layer, DistanceKernel, GaussLayerConfig, Parameterization, PrecisionConfig,
};
use serde::Serialize;
use timing::{interleaved_ms, median_ratio, Timing};

#[global_allocator]
static ALLOCATOR: alloc::CountingAllocator = alloc::CountingAllocator;

#[derive(Parser, Debug)]
#[command(about = "Time a Gaussian-neuron layer against a matmul of equal FLOPs")]
struct Args {
    /// Batch size B.
    #[arg(long)]
    batch: usize,
    /// Input width d.
    #[arg(long = "in")]
    in_features: usize,
    /// Number of neurons Z.
    #[arg(long = "out")]
    out_features: usize,
    /// Parameterization: cholesky, direct, expm, diag, sphere.
    #[arg(long, default_value = "cholesky")]
    param: String,
    /// f32 or f64.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Also time forward + backward of sum(y) to every parameter.
    #[arg(long)]
    backward: bool,
    /// cpu, cuda or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 30)]
    iters: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Distance kernel: auto, projected, expanded, naive.
    #[arg(long, default_value = "auto")]
    kernel: String,
    /// Run the portable tensor-op path (what CUDA and Metal run) instead of the fused CPU
    /// ops (`PrecisionConfig::portable`).
    #[arg(long)]
    portable: bool,
}

#[derive(Serialize)]
struct Report {
    batch: usize,
    in_features: usize,
    out_features: usize,
    param: String,
    dtype: String,
    device: String,
    kernel: &'static str,
    /// `layer` (the fused CPU ops where they apply) or `portable` (tensor ops only).
    path: &'static str,
    threads: usize,
    iters: usize,
    forward_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    forward_backward_ms: Option<f64>,
    matmul_equal_flops_ms: f64,
    /// Fastest runs (less sensitive to other processes on shared cores).
    forward_min_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    forward_backward_min_ms: Option<f64>,
    matmul_equal_flops_min_ms: f64,
    /// Median over the interleaved rounds of forward time / matmul time in the same round.
    forward_ratio: f64,
    /// The same for forward + backward.
    #[serde(skip_serializing_if = "Option::is_none")]
    forward_backward_ratio: Option<f64>,
    /// Heap bytes one forward needs at its peak: input + parameters (live before it) plus
    /// the most bytes it had allocated at once (`peak_live_bytes - baseline_bytes`).
    peak_bytes: usize,
    /// Peak of all live heap bytes of the process during that forward.
    peak_live_bytes: usize,
    /// All live heap bytes just before that forward (runtime, thread pools, input, parameters).
    baseline_bytes: usize,
    /// Bytes of input + output + parameters.
    io_param_bytes: usize,
    /// `peak_bytes / io_param_bytes` (target <= 1.5).
    peak_ratio: f64,
}

fn parse_kernel(name: &str) -> Result<DistanceKernel> {
    Ok(match name {
        "auto" => DistanceKernel::Auto,
        "projected" => DistanceKernel::Projected,
        "expanded" => DistanceKernel::Expanded,
        "naive" => DistanceKernel::Naive,
        other => bail!("--kernel must be auto, projected, expanded or naive, got {other:?}"),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    examples_support::run_on_thread_pool(move || run(args))
}

fn run(args: Args) -> Result<()> {
    println!("{}", serde_json::to_string(&report(args)?)?);
    Ok(())
}

fn report(args: Args) -> Result<Report> {
    let device = examples_support::device(&args.device)?;
    let dtype = examples_support::dtype(&args.dtype)?;
    let parameterization: Parameterization = args.param.parse()?;
    let (b, d, z) = (args.batch, args.in_features, args.out_features);
    let config = GaussLayerConfig {
        precision: PrecisionConfig {
            parameterization,
            portable: args.portable,
            ..Default::default()
        },
        kernel: parse_kernel(&args.kernel)?,
        ..Default::default()
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &device);
    let layer = gauss_layer(d, z, config, vb)?;
    let x = Tensor::randn(0f32, 1f32, (b, d), &device)?.to_dtype(dtype)?;
    let kernel = layer.resolved_kernel(&x)?.name();
    let forward = |x: &Tensor| -> Result<Tensor> { Ok(layer.forward(x)?) };

    // Peak heap of one forward, measured first so nothing else of this run is live.
    for _ in 0..args.warmup.max(1) {
        drop(forward(&x)?);
    }
    device.synchronize()?;
    let baseline_bytes = alloc::live_bytes();
    alloc::reset_peak();
    let y = forward(&x)?;
    device.synchronize()?;
    let peak_live_bytes = alloc::peak_bytes();
    let element = dtype.size_in_bytes();
    let param_elements: usize = varmap
        .all_vars()
        .iter()
        .map(|v| v.as_tensor().elem_count())
        .sum();
    let io_param_bytes = (x.elem_count() + y.elem_count() + param_elements) * element;
    // Saturating: another thread freeing between the two reads (a test harness) can leave the
    // peak below the baseline.
    let peak_bytes = peak_live_bytes.saturating_sub(baseline_bytes)
        + (x.elem_count() + param_elements) * element;
    drop(y);

    let lhs = Tensor::randn(0f32, 1f32, (b, d), &device)?.to_dtype(dtype)?;
    let rhs = Tensor::randn(0f32, 1f32, (d, z * d), &device)?.to_dtype(dtype)?;
    let mut matmul_job = || -> Result<()> {
        let product = lhs.matmul(&rhs)?;
        device.synchronize()?;
        drop(product);
        Ok(())
    };
    let mut forward_job = || -> Result<()> {
        let y = forward(&x)?;
        device.synchronize()?;
        drop(y);
        Ok(())
    };
    let mut forward_backward_job = || -> Result<()> {
        let y = forward(&x)?;
        let grads = y.sum_all()?.backward()?;
        device.synchronize()?;
        drop(grads);
        Ok(())
    };
    let mut jobs: Vec<&mut dyn FnMut() -> Result<()>> = vec![&mut matmul_job, &mut forward_job];
    if args.backward {
        jobs.push(&mut forward_backward_job);
    }
    let times = interleaved_ms(args.warmup, args.iters, &mut jobs)?;
    let matmul = Timing::of(&times[0]);
    let forward_timing = Timing::of(&times[1]);
    let forward_backward = times.get(2).map(|t| Timing::of(t));
    let forward_backward_ratio = times.get(2).map(|t| median_ratio(t, &times[0]));

    Ok(Report {
        batch: b,
        in_features: d,
        out_features: z,
        // `lowrank:R`, not `lowrank`: runs of two ranks stay apart.
        param: parameterization.to_string(),
        dtype: args.dtype,
        device: args.device,
        kernel,
        path: if args.portable { "portable" } else { "layer" },
        threads: rayon::current_num_threads(),
        // The rounds timed (`interleaved_ms` times at least one), as bench-train reports
        // its `rounds`.
        iters: args.iters.max(1),
        forward_ms: forward_timing.median,
        forward_backward_ms: forward_backward.map(|t| t.median),
        matmul_equal_flops_ms: matmul.median,
        forward_min_ms: forward_timing.min,
        forward_backward_min_ms: forward_backward.map(|t| t.min),
        matmul_equal_flops_min_ms: matmul.min,
        forward_ratio: median_ratio(&times[1], &times[0]),
        forward_backward_ratio,
        peak_bytes,
        peak_live_bytes,
        baseline_bytes,
        io_param_bytes,
        peak_ratio: peak_bytes as f64 / io_param_bytes as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowrank_report_carries_its_rank() -> Result<()> {
        let args = Args::parse_from([
            "bench",
            "--batch",
            "2",
            "--in",
            "3",
            "--out",
            "2",
            "--param",
            "lowrank:2",
            "--iters",
            "1",
            "--warmup",
            "0",
        ]);
        assert_eq!(report(args)?.param, "lowrank:2");
        Ok(())
    }

    /// `iters` is the number of rounds the medians are over: `--iters 0` still times one
    /// round (`interleaved_ms`), and the report says 1, not 0.
    #[test]
    fn report_counts_the_rounds_it_timed() -> Result<()> {
        let args = Args::parse_from([
            "bench", "--batch", "2", "--in", "3", "--out", "2", "--iters", "0", "--warmup", "0",
        ]);
        let report = report(args)?;
        assert_eq!(report.iters, 1);
        assert!(report.forward_ms.is_finite() && report.matmul_equal_flops_ms.is_finite());
        Ok(())
    }
}
