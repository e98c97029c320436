//! Times one Gaussian-neuron layer (forward, and forward + backward of `sum(y)` to every
//! parameter) against one Candle matmul of equal FLOPs, (B, d) × (d, Z·d), in the same run,
//! and measures the peak heap during one forward. Prints one JSON line; an error is one line
//! on stderr (`error: ...`) and exit status 1.
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

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use clap::Parser;
use gauss_layer::{
    gauss_layer, memory, DistanceKernel, GaussLayerConfig, GaussNetConfig, Parameterization,
    PrecisionConfig,
};
use serde::Serialize;
use timing::{interleaved_ms, median_ratio, Timing};

#[global_allocator]
static ALLOCATOR: alloc::CountingAllocator = alloc::CountingAllocator;

#[derive(Parser, Debug)]
#[command(about = "Time a Gaussian-neuron layer against a matmul of equal FLOPs")]
struct Args {
    /// Batch size B (>= 1).
    #[arg(long, value_parser = count)]
    batch: usize,
    /// Input width d (>= 1).
    #[arg(long = "in", value_parser = count)]
    in_features: usize,
    /// Number of neurons Z (>= 1).
    #[arg(long = "out", value_parser = count)]
    out_features: usize,
    /// Parameterization: cholesky, direct, expm, diag, sphere, or lowrank:R (precision
    /// diag(e^θ) + U Uᵀ with R columns of U, 1 <= R <= --in).
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
    /// Timed repetitions (>= 1; the median is reported).
    #[arg(long, default_value_t = 30, value_parser = count)]
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

/// A count of the command line: a whole number >= 1 (0 would time or build nothing).
fn count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1, got 0".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("must be a whole number >= 1 ({e})")),
    }
}

/// Refuses sizes whose tensors cannot fit before any is allocated (a run past the machine's
/// memory is otherwise killed by the OOM killer, without a message). The estimate is a lower
/// bound: the parameters, the input, the matmul's two operands and the larger of its
/// (B, Z·d) product and the layer's (B, Z) output, all live at once; the forward's and the
/// backward's temporaries come on top. Checked against the machine's memory and `ulimit -v`
/// (where the system says, [`memory::check_fits`]) on the CPU; on an accelerator only an
/// overflowing size is refused (its own allocator reports running out of memory).
fn check_size(args: &Args, config: &GaussLayerConfig, dtype: DType, cpu: bool) -> Result<()> {
    let (b, d, z) = (
        args.batch as u64,
        args.in_features as u64,
        args.out_features as u64,
    );
    let params = memory::network_elements(&GaussNetConfig {
        in_features: args.in_features,
        hidden: Vec::new(),
        out_features: args.out_features,
        layer: config.clone(),
        gate: false,
        ..Default::default()
    })
    .with_context(|| format!("--in {d} --out {z}"))?;
    let elements = (|| {
        let bd = b.checked_mul(d)?;
        let product = bd.checked_mul(z)?;
        let rhs = d.checked_mul(d)?.checked_mul(z)?;
        let output = b.checked_mul(z)?;
        params
            .checked_add(bd.checked_mul(2)?)?
            .checked_add(rhs)?
            .checked_add(product.max(output))
    })();
    let estimate = elements.and_then(|e| e.checked_mul(dtype.size_in_bytes() as u64));
    if cpu || estimate.is_none() {
        memory::check_fits(
            &format!(
                "timing {z} neurons on {d} inputs at batch {b} ({}, with its (B, Z·d) matmul)",
                args.param
            ),
            estimate,
        )?;
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    let report = examples_support::run_on_thread_pool(move || {
        report(args).and_then(|r| Ok(serde_json::to_string(&r)?))
    });
    examples_support::print_or_exit(report);
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
    check_size(&args, &config, dtype, device.is_cpu())?;
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
        iters: args.iters,
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

    /// A count of 0 (an empty batch, no timed round, an empty layer) is refused by the
    /// command line, naming the option, instead of timing nothing or reporting another count.
    #[test]
    fn zero_counts_are_refused_naming_the_option() {
        let base = [
            "bench", "--batch", "2", "--in", "3", "--out", "2", "--iters", "1", "--warmup", "0",
        ];
        for option in ["--batch", "--in", "--out", "--iters"] {
            let mut line = base.to_vec();
            let at = line.iter().position(|a| *a == option).expect("in base");
            line[at + 1] = "0";
            let e = Args::try_parse_from(line).unwrap_err().to_string();
            assert!(e.contains(option) && e.contains("at least 1, got 0"), "{e}");
        }
        assert_eq!(
            report(Args::parse_from(base)).map(|r| r.iters).ok(),
            Some(1)
        );
    }

    /// Sizes whose tensors cannot fit (the (B, Z·d) matmul product alone is 6.7 TB here) or
    /// whose size overflows are refused before anything is allocated.
    #[test]
    fn sizes_that_cannot_fit_are_refused_first() {
        let args = |batch: &str, width: &str| {
            Args::parse_from([
                "bench", "--batch", batch, "--in", width, "--out", width, "--iters", "1",
            ])
        };
        let e = report(args("100000", "4096"))
            .err()
            .expect("too large")
            .to_string();
        assert!(e.contains("needs about") || e.contains("overflows"), "{e}");
        let huge = (1u64 << 40).to_string();
        let e = format!("{:#}", report(args(&huge, &huge)).err().expect("overflow"));
        assert!(e.contains("overflows"), "{e}");
        // The parameters' count overflows: the message names the options, as given.
        assert!(e.starts_with(&format!("--in {huge} --out {huge}: ")), "{e}");
    }
}
