//! Helpers of the CLI tests: run the built binary, and a small generated IDX set.

#![allow(dead_code)] // Each test file uses its own subset.

use anyhow::{bail, Result};

pub fn run(args: &[&str]) -> Result<(bool, String, String)> {
    gauss_tests::run_limited(env!("CARGO_BIN_EXE_fgn-classifier"), args)
}

/// Runs `args`, fails with its stderr if it fails, and parses its last stdout line as JSON.
pub fn run_ok(args: &[&str]) -> Result<serde_json::Value> {
    let (ok, stdout, stderr) = run(args)?;
    if !ok {
        bail!("{args:?} failed: {stderr}");
    }
    Ok(serde_json::from_str(stdout.lines().last().unwrap_or(""))?)
}

/// A 12×12 IDX set in `dir`: `n` train and `n / 4` test images of two classes, class 0
/// bright in the top half and class 1 in the bottom half, with seeded noise on every pixel.
pub fn write_two_class_idx(dir: &std::path::Path, n: usize) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let idx = |magic: u32, dims: &[u32], items: &[u8]| -> Vec<u8> {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(items);
        out
    };
    for (prefix, count) in [("train", n), ("t10k", n / 4)] {
        let labels: Vec<u8> = (0..count).map(|i| (i % 2) as u8).collect();
        let mut pixels = Vec::with_capacity(count * 144);
        for &label in &labels {
            for p in 0..144 {
                let top = p < 72;
                let base = if top == (label == 0) { 150.0 } else { 40.0 };
                let value: f64 = base + rng.random_range(-60.0..60.0);
                pixels.push(value.clamp(0.0, 255.0) as u8);
            }
        }
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte")),
            idx(2051, &[count as u32, 12, 12], &pixels),
        )?;
        std::fs::write(
            dir.join(format!("{prefix}-labels-idx1-ubyte")),
            idx(2049, &[count as u32], &labels),
        )?;
    }
    Ok(())
}
