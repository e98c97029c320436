//! What the workspace's example binaries share (as `candle-examples` is for Candle's):
//! start-up ([`run_on_thread_pool`], the global [`Allocator`] through [`global_allocator!`]), the
//! one-line error report of a failed command ([`exit_on_error`]), `--device` names
//! ([`device`], [`dtype`]), `--param` names ([`parameterization_parser`],
//! [`parameterization`]), the up-front check of an output directory ([`check_dir_writable`])
//! and the timing fields of a JSON report ([`insert_timings`]).
//!
//! ```ignore
//! examples_support::global_allocator!();
//!
//! fn main() {
//!     examples_support::exit_on_error(examples_support::run_on_thread_pool(run));
//! }
//! ```

use std::ffi::OsStr;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
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

/// Runs an example's `main` as it should run: the thread count fixed (`pin_threads`), freed
/// memory kept by the allocator ([`keep_freed_memory`]), and `main` itself on a worker of a rayon
/// pool of that many threads, which every parallel loop of a step (the fused kernels', the
/// optimizer's, Candle's and `gemm`'s) then joins in place. Called from a thread outside the
/// pool, each of those loops hands its work to the pool and sleeps on a futex until the workers
/// are done: 5 epochs of the MNIST diag run made 131,000 context switches that way and 4,700
/// from a worker, and took 1.3–1.5 s of fit against 1.0–1.2 s (README, "Performance"). A
/// program of your own gets the same by calling its training loop inside
/// `rayon::ThreadPool::install`.
///
/// `main`'s thread has the main thread's usual 8 MiB of stack (Candle's backward walks the
/// graph recursively). If the pool cannot be built, `main` runs on the calling thread.
pub fn run_on_thread_pool<T: Send>(main: impl FnOnce() -> T + Send) -> T {
    let threads = pin_threads();
    keep_freed_memory();
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(8 << 20)
        .build()
    {
        Ok(pool) => pool.install(main),
        Err(_) => main(),
    }
}

/// Fixes the thread count once and returns it: Candle reads `RAYON_NUM_THREADS` on every CPU
/// matmul and, when it is unset, counts the cores from `/proc` and sysfs each time. Sets it (to
/// Candle's own default unless the user chose), so any rayon pool built later, the global one
/// included, has the same count. Must run before any other thread exists (setting the
/// environment is only sound then), which [`run_on_thread_pool`] does first.
fn pin_threads() -> usize {
    let threads = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    threads
}

/// mimalloc's `purge_delay` option (`mi_option_purge_delay` of `mimalloc.h`, mimalloc v3, the
/// version `libmimalloc-sys` builds by default): milliseconds before freed memory goes back to
/// the kernel, -1 for never.
#[cfg(feature = "mimalloc")]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the kernel (unless `MIMALLOC_PURGE_DELAY`
/// says otherwise), as PyTorch's caching allocator keeps it: a training step frees and
/// allocates the same large buffers again, and memory handed back after mimalloc's default
/// second came back as fresh pages the kernel zeroes on first touch (7 % of the MNIST diag
/// run's time in `clear_page_erms`, 1,200–4,600 page faults in 5 epochs against 320). The
/// process keeps its peak memory until it exits. Without the `mimalloc` feature: nothing.
pub fn keep_freed_memory() {
    #[cfg(feature = "mimalloc")]
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is always allowed; mimalloc reads it on its next purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
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

/// Refuses a `--trace-probes` count whose probe tensors cannot fit, before any work: each
/// cholesky layer of `widths` (inputs, hidden…, outputs) draws a (Z, d, probes) tensor every
/// step, and the estimate holds about three of that size at once (the probes, `L⁻¹V`, its
/// gradient) in `dtype`. Other parameterizations take the exact trace and draw nothing.
/// Checked against this process's memory ([`gauss_layer::memory::check_fits`]).
///
/// # Errors
/// The estimate overflows or exceeds what can be used, naming `--trace-probes`.
pub fn check_trace_probes(
    widths: &[usize],
    parameterization: Parameterization,
    probes: usize,
    dtype: DType,
) -> Result<()> {
    if probes == 0 || parameterization != Parameterization::Cholesky {
        return Ok(());
    }
    let elements = widths.windows(2).try_fold(0u64, |total, pair| {
        (pair[0] as u64)
            .checked_mul(pair[1] as u64)?
            .checked_mul(probes as u64)?
            .checked_add(total)
    });
    let bytes = elements.and_then(|e| e.checked_mul(3 * dtype.size_in_bytes() as u64));
    gauss_layer::memory::check_fits(
        &format!("--trace-probes {probes} (cholesky layers of widths {widths:?})"),
        bytes,
    )?;
    Ok(())
}

/// Writes `line` and a newline to standard output. Unlike `println!`, which panics when
/// stdout is a closed pipe (`| head`) or a full disk, a failure is an error for
/// [`exit_on_error`]'s one line.
///
/// # Errors
/// The write or flush failed.
pub fn print_line(line: impl std::fmt::Display) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .context("cannot write to standard output")
}

/// Ends a command that prints one line: the line on stdout, or (for an error, or a stdout
/// that cannot be written) `error: ` and [`one_line`] on stderr and exit status 1.
pub fn print_or_exit(result: Result<impl std::fmt::Display>) {
    exit_on_error(result.and_then(print_line));
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

/// The `--param` parser of every example: the names of [`Parameterization::ALL`], listed with
/// their summaries in `--help`, and `lowrank:R` (lowrank with its rank in the name), which
/// [`parameterization`] checks together with `--rank`.
pub fn parameterization_parser() -> ParamParser {
    ParamParser(PossibleValuesParser::new(
        Parameterization::ALL.map(|p| PossibleValue::new(p.name()).help(p.summary())),
    ))
}

/// See [`parameterization_parser`].
#[derive(Clone)]
pub struct ParamParser(PossibleValuesParser);

impl TypedValueParser for ParamParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> std::result::Result<String, clap::Error> {
        match value.to_str() {
            // Checked by `parameterization`, whose errors speak of `--param` and `--rank`.
            Some(name) if name.starts_with("lowrank:") => Ok(name.to_owned()),
            _ => self.0.parse_ref(cmd, arg, value),
        }
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        let named_rank = PossibleValue::new("lowrank:R")
            .help("lowrank with its rank R >= 1 in the name (the same as `lowrank --rank R`)");
        Some(Box::new(
            self.0.possible_values()?.chain(std::iter::once(named_rank)),
        ))
    }
}

/// The parameterization of `--param` (from [`parameterization_parser`]) and `--rank`,
/// refused in the command line's terms: `--param lowrank --rank R` or `--param lowrank:R`
/// (both: the same R), R >= 1; `--rank` with no other parameterization.
pub fn parameterization(param: &str, rank: Option<usize>) -> Result<Parameterization> {
    if rank == Some(0) {
        bail!("--rank must be >= 1, got 0");
    }
    let (name, named) = match param.split_once(':') {
        Some((name, text)) => match text.parse::<usize>() {
            Ok(r) if r >= 1 => (name, Some(r)),
            _ => bail!("--param {param}: the rank R of lowrank:R must be a whole number >= 1"),
        },
        None => (param, None),
    };
    match (name, named, rank) {
        ("lowrank", Some(a), Some(b)) if a != b => {
            bail!("--param {param} and --rank {b} name two ranks; give it once")
        }
        ("lowrank", Some(rank), _) | ("lowrank", None, Some(rank)) => {
            Ok(Parameterization::LowRank { rank })
        }
        ("lowrank", None, None) => {
            bail!(
                "--param lowrank needs its rank: add --rank R (R >= 1), or write --param lowrank:R"
            )
        }
        (other, _, Some(r)) => {
            bail!("--rank {r} is lowrank's rank; --param {other} has none (drop --rank, or use --param lowrank)")
        }
        (other, _, None) => Ok(other.parse()?),
    }
}

/// Checks, before any work, that the directory `dir` accepts new files (a save writes a
/// temporary file there and renames it; pictures are written there), so that a read-only
/// directory or file system fails the command at once rather than after training: creates
/// and removes an empty probe file. `what` names the option in the error.
pub fn check_dir_writable(dir: &Path, what: &str) -> Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let probe = dir.join(format!(
        ".gauss-example-write-probe-{}-{nanos}",
        std::process::id()
    ));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(file) => {
            drop(file);
            // A probe that cannot be removed is left behind, but the directory is writable.
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => bail!(
            "{what}: cannot create files in the directory {} ({e}); nothing was done: choose a writable directory",
            dir.display()
        ),
    }
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

    /// A probe count whose tensors overflow or cannot fit is refused naming the option
    /// (1e8 probes on 784 → 64 aborted on an allocation of 1.6 TB); 16 fits, and nothing is
    /// drawn for the other parameterizations.
    #[test]
    fn trace_probe_counts_that_cannot_fit_are_refused() {
        let widths = [784, 64, 10];
        for probes in [100_000_000, usize::MAX] {
            let e = check_trace_probes(&widths, Parameterization::Cholesky, probes, DType::F32)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("--trace-probes {probes}")), "{e}");
        }
        check_trace_probes(&widths, Parameterization::Cholesky, 16, DType::F32).unwrap();
        check_trace_probes(&widths, Parameterization::Diag, usize::MAX, DType::F32).unwrap();
    }

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

    /// One test, because both change the process-wide allocator option: mimalloc's index
    /// names the purge delay (its v3 default is 1000 ms, `options.c`), which
    /// [`keep_freed_memory`] sets to -1; and `main` runs on a worker of the pool.
    #[test]
    fn start_up_keeps_freed_memory_and_runs_main_on_a_pool_worker() {
        #[cfg(feature = "mimalloc")]
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reading options is always allowed.
            let read = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
            assert_eq!(read(), 1000);
            keep_freed_memory();
            assert_eq!(read(), -1);
        }
        assert_eq!(
            run_on_thread_pool(rayon::current_thread_index).map(|_| ()),
            Some(())
        );
    }
}
