//! Where the samples come from: a safetensors file holding `x` (N, d), or draws from a known
//! Gaussian.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// A known Gaussian N(mean, Λ Λᵀ) to draw synthetic samples from.
pub struct KnownGaussian {
    /// The mean (d).
    pub mean: Vec<f64>,
    /// The covariance factor Λ, lower triangular, row-major (d × d).
    pub scale_tril: Vec<Vec<f64>>,
}

impl KnownGaussian {
    /// A random but well-conditioned Gaussian in `dim` dimensions, fixed by `seed`.
    pub fn random(dim: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mean = (0..dim).map(|_| rng.random_range(-2.0..2.0)).collect();
        let scale_tril = (0..dim)
            .map(|i| {
                (0..dim)
                    .map(|j| match j.cmp(&i) {
                        std::cmp::Ordering::Less => rng.random_range(-0.5..0.5),
                        std::cmp::Ordering::Equal => rng.random_range(0.5..1.5),
                        std::cmp::Ordering::Greater => 0.0,
                    })
                    .collect()
            })
            .collect();
        Self { mean, scale_tril }
    }

    /// The covariance Λ Λᵀ.
    pub fn covariance(&self) -> Vec<Vec<f64>> {
        let d = self.mean.len();
        (0..d)
            .map(|i| {
                (0..d)
                    .map(|j| {
                        (0..d)
                            .map(|k| self.scale_tril[i][k] * self.scale_tril[j][k])
                            .sum()
                    })
                    .collect()
            })
            .collect()
    }

    /// `n` samples `mean + Λ z`, `z ~ N(0, I)`, drawn with `seed`.
    ///
    /// # Shapes
    /// → (n, d), f64
    pub fn sample(&self, n: usize, seed: u64, device: &Device) -> Result<Tensor> {
        let d = self.mean.len();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut values = Vec::with_capacity(n * d);
        for _ in 0..n {
            let z: Vec<f64> = (0..d).map(|_| rng.sample(StandardNormal)).collect();
            for i in 0..d {
                let offset: f64 = (0..=i).map(|k| self.scale_tril[i][k] * z[k]).sum();
                values.push(self.mean[i] + offset);
            }
        }
        Ok(Tensor::from_vec(values, (n, d), device)?)
    }
}

/// Reads tensor `x` (N, d) from a safetensors file, converted to f64; errors name the file
/// and what is wrong (missing tensor, wrong rank, too few samples, non-finite values).
///
/// # Shapes
/// → (N, d), f64
pub fn load_samples(path: &Path, device: &Device) -> Result<Tensor> {
    // A FIFO, device or directory is refused before it is opened.
    let bytes = gauss_layer::files::read_regular(path)?;
    let file = gauss_layer::files::DataFile::parse(&bytes, path)?;
    let shape = file
        .shape("x")
        .context("expected a tensor named `x` of shape (N, d)")?;
    let &[n, d] = shape.as_slice() else {
        bail!(
            "{}: tensor `x` must have shape (N, d), got {shape:?}",
            path.display()
        );
    };
    if d == 0 || n <= d {
        bail!(
            "{}: tensor `x` must have more samples than dimensions (N > d >= 1) for a \
             full-rank maximum-likelihood covariance, got shape {shape:?}",
            path.display()
        );
    }
    crate::checks::sizes(n, d, 1)?;
    // Every value finite (named by row and column when not).
    Ok(file.matrix("x")?.to_tensor(DType::F64, device)?)
}
