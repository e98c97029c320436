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

/// The dtype of tensor `name` as the safetensors header spells it (`I32`), for messages;
/// `None` if the header cannot be read (the file was parsed already, so it can).
fn header_dtype(bytes: &[u8], name: &str) -> Option<String> {
    let length = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let header = bytes.get(8..8usize.checked_add(usize::try_from(length).ok()?)?)?;
    let header: serde_json::Value = serde_json::from_slice(header).ok()?;
    Some(header.get(name)?.get("dtype")?.as_str()?.to_string())
}

/// Reads tensor `x` (N, d) from a safetensors file, converted to f64; errors name the file
/// and what is wrong (missing tensor, not a float dtype, wrong rank, too few samples,
/// non-finite values).
/// One Gaussian (`components` `None`) needs N > d for a full-rank maximum-likelihood
/// covariance; a mixture of K components needs N >= K, as scikit-learn (its `reg_covar`
/// keeps every covariance positive definite whatever N and d).
///
/// # Shapes
/// → (N, d), f64
pub fn load_samples(path: &Path, components: Option<usize>, device: &Device) -> Result<Tensor> {
    // A FIFO, device or directory is refused before it is opened.
    let bytes = gauss_layer::files::read_regular(path)?;
    let file = gauss_layer::files::DataFile::parse(&bytes, path)?;
    let shape = file
        .shape("x")
        .context("expected a tensor named `x` of shape (N, d)")?;
    // `--data` takes samples as floats; integers (labels, pixel counts, a wrong tensor) are
    // refused rather than silently converted.
    if !file.is_float("x")? {
        let dtype = header_dtype(&bytes, "x").unwrap_or_else(|| "not a float".to_string());
        bail!(
            "{}: tensor `x` has dtype {dtype}; --data takes samples of a float dtype (F16, BF16, F32 or F64)",
            path.display()
        );
    }
    let &[n, d] = shape.as_slice() else {
        bail!(
            "{}: tensor `x` must have shape (N, d), got {shape:?}",
            path.display()
        );
    };
    match components {
        None if d == 0 || n <= d => bail!(
            "{}: tensor `x` must have more samples than dimensions (N > d >= 1) for a \
             full-rank maximum-likelihood covariance, got shape {shape:?}",
            path.display()
        ),
        Some(k) if d == 0 || n < k => bail!(
            "{}: tensor `x` must have at least one sample per component (N >= {k}) and \
             d >= 1, got shape {shape:?}",
            path.display()
        ),
        _ => {}
    }
    crate::checks::sizes(n, d, components.unwrap_or(1))?;
    // Every value finite (named by row and column when not).
    Ok(file.matrix("x")?.to_tensor(DType::F64, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file holding one tensor `x` of `dtype` and `shape` (zero bytes), written
    /// by hand: the dtypes candle cannot build.
    fn write_raw(
        path: &Path,
        dtype: &str,
        shape: [usize; 2],
        bytes_per_value: usize,
    ) -> Result<()> {
        let size = shape[0] * shape[1] * bytes_per_value;
        let mut header = format!(
            r#"{{"x":{{"dtype":"{dtype}","shape":[{},{}],"data_offsets":[0,{size}]}}}}"#,
            shape[0], shape[1]
        );
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        file.extend(vec![0u8; size]);
        std::fs::write(path, file)?;
        Ok(())
    }

    /// `--data` takes "any float dtype": an integer `x` was converted and fitted; now it is
    /// refused naming the dtype, and the float dtypes still load.
    #[test]
    fn integer_samples_are_refused_naming_the_dtype() -> Result<()> {
        let device = Device::Cpu;
        let dir = gauss_tests::temp_dir("fit-gaussian-int-data")?;
        for (dtype, bytes) in [("I32", 4), ("I64", 8), ("U8", 1), ("I16", 2)] {
            let path = dir.join(format!("{dtype}.safetensors"));
            write_raw(&path, dtype, [5, 2], bytes)?;
            for components in [None, Some(2)] {
                let text = load_samples(&path, components, &device)
                    .unwrap_err()
                    .to_string();
                assert!(
                    text.contains(&format!("tensor `x` has dtype {dtype}")),
                    "{text}"
                );
                assert!(text.contains("float dtype"), "{text}");
            }
        }
        for (dtype, bytes) in [("F32", 4), ("F16", 2), ("BF16", 2), ("F64", 8)] {
            let path = dir.join(format!("{dtype}.safetensors"));
            write_raw(&path, dtype, [5, 2], bytes)?;
            assert_eq!(
                load_samples(&path, None, &device)?.dims(),
                &[5, 2],
                "{dtype}"
            );
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// A mixture needs one sample per component, not N > d: 6 samples in 10 dimensions fit
    /// 2 components (scikit-learn fits them too; `reg_covar` keeps the covariances positive
    /// definite), while one Gaussian's full-rank MLE still needs N > d.
    #[test]
    fn mixtures_take_fewer_samples_than_dimensions() -> Result<()> {
        let device = Device::Cpu;
        let dir = gauss_tests::temp_dir("fit-gaussian-few-samples")?;
        let path = dir.join("x.safetensors");
        let known = KnownGaussian::random(10, 3);
        let x = known.sample(6, 4, &device)?;
        candle_core::safetensors::save(&std::collections::HashMap::from([("x", x)]), &path)?;

        let text = load_samples(&path, None, &device).unwrap_err().to_string();
        assert!(text.contains("N > d"), "{text}");
        let text = load_samples(&path, Some(7), &device)
            .unwrap_err()
            .to_string();
        assert!(text.contains("N >= 7"), "{text}");

        let x = load_samples(&path, Some(2), &device)?;
        assert_eq!(x.dims(), &[6, 10]);
        let args = crate::mixture::MixtureArgs {
            components: 2,
            parameterization: gauss_layer::Parameterization::Cholesky,
            tied: false,
            options: gauss_layer::MixtureFitOptions::default(),
            out: None,
        };
        let summary = crate::mixture::run(&x, "few", &args)?;
        let score = summary["mean_log_likelihood"].as_f64().context("a score")?;
        assert!(score.is_finite(), "{summary}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
