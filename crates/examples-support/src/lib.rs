//! What the workspace's example binaries share (as `candle-examples` is for Candle's):
//! start-up ([`pin_threads`], the global [`Allocator`] through [`global_allocator!`]), the
//! one-line error report of a failed command ([`exit_on_error`]), `--device` names
//! ([`device`], [`dtype`]), `--param` names ([`parameterization_parser`]) and the timing
//! fields of a JSON report ([`insert_timings`]).
//!
//! ```ignore
//! examples_support::global_allocator!();
//!
//! fn main() {
//!     examples_support::pin_threads();
//!     examples_support::exit_on_error(run());
//! }
//! ```

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::builder::{PossibleValue, PossibleValuesParser};
use gauss_layer::Parameterization;
use serde_json::{json, Map, Value};

/// The examples' global allocator: mimalloc with the `mimalloc` feature (each example's
/// default), else the system allocator. mimalloc keeps freed blocks for reuse instead of
/// returning them to the kernel: training allocates and frees many large tensors per step
/// (see the README, "Performance"). `bench` wraps it in its counting allocator.
#[cfg(feature = "mimalloc")]
pub use mimalloc::MiMalloc as Allocator;
/// The examples' global allocator: mimalloc with the `mimalloc` feature (each example's
/// default), else the system allocator.
#[cfg(not(feature = "mimalloc"))]
pub use std::alloc::System as Allocator;

/// Declares [`Allocator`] the binary's global allocator (one line in each example's root).
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::Allocator = $crate::Allocator;
    };
}

/// Fixes the thread count once: Candle reads `RAYON_NUM_THREADS` on every CPU matmul and,
/// when it is unset, counts the cores from `/proc` and sysfs each time. Sets it (to Candle's
/// own default unless the user chose) and builds the global rayon pool (the fused kernels'
/// and the optimizer's) with the same count. Call first in `main`, before any other thread
/// exists (setting the environment is only sound then).
pub fn pin_threads() {
    let threads = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // Fails only if the pool already exists, which then keeps its size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
}

/// The error and its causes on one line, each cause once (some errors already quote their
/// source), newlines replaced by spaces.
pub fn one_line(err: &anyhow::Error) -> String {
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
    message.replace('\n', " ")
}

/// Ends a command: on an error, `error: ` and [`one_line`] on stderr and exit status 1;
/// otherwise returns the value.
pub fn exit_on_error<T>(result: Result<T>) -> T {
    match result {
        Ok(value) => value,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            std::process::exit(1);
        }
    }
}

/// The device of a `--device` name: `cpu`, `cuda` (device 0, see [`cuda_device`]) or `metal`.
pub fn device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => cuda_device()?,
        "metal" => Device::new_metal(0).context("--device metal (build with --features metal)")?,
        other => bail!("--device must be cpu, cuda or metal, got {other:?}"),
    })
}

/// CUDA device 0, its memory pool keeping freed memory across steps (as PyTorch's caching
/// allocator does, [`gauss_layer::gpu::retain_freed_memory`]) unless `GAUSS_CUDA_DEFAULT_POOL`
/// is set, so the GPU check can time both.
pub fn cuda_device() -> Result<Device> {
    let device = Device::new_cuda(0).context("--device cuda (build with --features cuda)")?;
    if std::env::var_os("GAUSS_CUDA_DEFAULT_POOL").is_none() {
        gauss_layer::gpu::retain_freed_memory(&device)?;
    }
    Ok(device)
}

/// The dtype of a `--dtype` name: `f32` or `f64`.
pub fn dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "f64" => DType::F64,
        other => bail!("--dtype must be f32 or f64, got {other:?}"),
    })
}

/// A `--param` parser: accepts the names of [`Parameterization::ALL`], listed with their
/// summaries in `--help`; lowrank's rank comes from `--rank`
/// ([`Parameterization::from_name`]).
pub fn parameterization_parser() -> PossibleValuesParser {
    PossibleValuesParser::new(
        Parameterization::ALL.map(|p| PossibleValue::new(p.name()).help(p.summary())),
    )
}

/// Seconds rounded to hundredths, as the reports print them.
pub fn round_seconds(seconds: f64) -> f64 {
    (seconds * 100.0).round() / 100.0
}

/// The two timing fields of a training report: `train_seconds` (the whole command since
/// `started`) and `fit_seconds` (the training loops alone: no data loading, set-up,
/// evaluation or saving), in hundredths of a second.
pub fn insert_timings(out: &mut Map<String, Value>, started: Instant, fit_seconds: f64) {
    out.insert(
        "train_seconds".into(),
        json!(round_seconds(started.elapsed().as_secs_f64())),
    );
    out.insert("fit_seconds".into(), json!(round_seconds(fit_seconds)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_names_each_cause_once() {
        let err = anyhow::anyhow!("inner\nfailure").context("outer");
        assert_eq!(one_line(&err), "outer: inner failure");
        let quoted = anyhow::anyhow!("disk full").context("cannot save: disk full");
        assert_eq!(one_line(&quoted), "cannot save: disk full");
    }

    #[test]
    fn timings_are_rounded_to_hundredths() {
        let mut out = Map::new();
        insert_timings(&mut out, Instant::now(), 1.23456);
        assert_eq!(out["fit_seconds"], json!(1.23));
        assert!(out["train_seconds"].as_f64().is_some_and(|s| s >= 0.0));
        assert!(device("tpu").is_err());
    }
}
