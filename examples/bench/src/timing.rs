//! Interleaved timing rounds and their medians, shared by both benchmarks.

use std::time::Instant;

use anyhow::Result;

/// Wall times in milliseconds of every job, `iters` rounds after `warmup` rounds. Each round
/// runs every job once, back to back, so a slow spell of a shared machine hits them alike and
/// per-round ratios between jobs stay meaningful.
#[allow(dead_code)] // the training benchmark times its own phases
pub fn interleaved_ms(
    warmup: usize,
    iters: usize,
    jobs: &mut [&mut dyn FnMut() -> Result<()>],
) -> Result<Vec<Vec<f64>>> {
    for _ in 0..warmup {
        for job in jobs.iter_mut() {
            job()?;
        }
    }
    let mut times = vec![Vec::with_capacity(iters.max(1)); jobs.len()];
    for _ in 0..iters.max(1) {
        for (job, times) in jobs.iter_mut().zip(times.iter_mut()) {
            let start = Instant::now();
            job()?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Median over rounds of `times[i] / reference[i]`.
pub fn median_ratio(times: &[f64], reference: &[f64]) -> f64 {
    let ratios: Vec<f64> = times.iter().zip(reference).map(|(t, r)| t / r).collect();
    median(&ratios)
}

impl Timing {
    pub fn of(times: &[f64]) -> Self {
        Timing {
            median: median(times),
            min: times.iter().copied().fold(f64::INFINITY, f64::min),
        }
    }
}

/// Median and fastest of repeated timings, in milliseconds.
#[derive(Clone, Copy)]
pub struct Timing {
    pub median: f64,
    pub min: f64,
}
