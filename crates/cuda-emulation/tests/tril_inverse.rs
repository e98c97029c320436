//! The `tril_inverse` CUDA kernel, run on the CPU by the emulation, against the closed form
//! `L · L⁻¹ = I` and gauss-layer's CPU op (faer's blocked inverse).

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random lower-triangular blocks with diagonal in [0.5, 2] and off-diagonal entries of size
/// ~0.3/√d (well conditioned), plus finite garbage in the strict upper triangle, which the
/// kernel must ignore.
fn random_lower(neurons: usize, d: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let scale = 0.3 / (d as f64).sqrt();
    let mut values = vec![0.0; neurons * d * d];
    for n in 0..neurons {
        for i in 0..d {
            for j in 0..d {
                values[n * d * d + i * d + j] = match i.cmp(&j) {
                    std::cmp::Ordering::Greater => rng.random_range(-scale..scale),
                    std::cmp::Ordering::Equal => rng.random_range(0.5..2.0),
                    std::cmp::Ordering::Less => rng.random_range(-50.0..50.0),
                };
            }
        }
    }
    values
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// `L · M` for row-major blocks, using only L's lower triangle.
fn lower_times(lower: &[f64], inverse: &[f64], neurons: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; neurons * d * d];
    for n in 0..neurons {
        let (l, m) = (&lower[n * d * d..], &inverse[n * d * d..]);
        for i in 0..d {
            for j in 0..d {
                out[n * d * d + i * d + j] = (0..=i).map(|k| l[i * d + k] * m[k * d + j]).sum();
            }
        }
    }
    out
}

fn identity(neurons: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; neurons * d * d];
    for n in 0..neurons {
        for i in 0..d {
            out[n * d * d + i * d + i] = 1.0;
        }
    }
    out
}

const SHAPES: [(usize, usize); 5] = [(1, 1), (3, 17), (4, 64), (2, 130), (5, 2)];
const BLOCKS: [u32; 3] = [1, 32, 128];

#[test]
fn f64_kernel_inverts_at_every_block_size() -> Result<()> {
    for (seed, &(neurons, d)) in SHAPES.iter().enumerate() {
        let lower = random_lower(neurons, d, seed as u64);
        let cpu_op = gauss_layer::ops::tril_inverse(&Tensor::from_vec(
            lower.clone(),
            (neurons, d, d),
            &Device::Cpu,
        )?)?
        .flatten_all()?
        .to_vec1::<f64>()?;
        for block in BLOCKS {
            let inverse = cuda_emulation::tril_inverse(&lower, neurons, d, block);
            // Closed form: L · L⁻¹ = I (L well conditioned, so f64 rounding stays ~1e-13).
            let residual = max_abs_diff(
                &lower_times(&lower, &inverse, neurons, d),
                &identity(neurons, d),
            );
            assert!(
                residual < 1e-12,
                "(Z, d) = ({neurons}, {d}), block {block}: |L M − I| = {residual:e}"
            );
            // The strict upper triangle is written exactly 0.
            for n in 0..neurons {
                for i in 0..d {
                    for j in i + 1..d {
                        assert_eq!(inverse[n * d * d + i * d + j], 0.0);
                    }
                }
            }
            let vs_cpu = max_abs_diff(&inverse, &cpu_op);
            assert!(
                vs_cpu < 1e-12,
                "(Z, d) = ({neurons}, {d}), block {block}: vs CPU op {vs_cpu:e}"
            );
        }
    }
    Ok(())
}

#[test]
fn f32_kernel_matches_the_cpu_op_to_f32_rounding() -> Result<()> {
    for (seed, &(neurons, d)) in SHAPES.iter().enumerate() {
        let lower64 = random_lower(neurons, d, 100 + seed as u64);
        let lower: Vec<f32> = lower64.iter().map(|&v| v as f32).collect();
        let cpu_op = gauss_layer::ops::tril_inverse(&Tensor::from_vec(
            lower.clone(),
            (neurons, d, d),
            &Device::Cpu,
        )?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
        let inverse = cuda_emulation::tril_inverse(&lower, neurons, d, 128);
        let worst = inverse
            .iter()
            .zip(&cpu_op)
            .map(|(a, b)| ((a - b).abs() / (1.0 + b.abs())) as f64)
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-4,
            "(Z, d) = ({neurons}, {d}): f32 kernel vs CPU op {worst:e}"
        );
    }
    Ok(())
}
