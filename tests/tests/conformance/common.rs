//! Loading reference files, collecting comparison failures, and the gradient plumbing the
//! kinds share (reading a gradient, mapping a cholesky factor to the layer's raw tensor and
//! its gradient back).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use gauss_layer::testing::linalg;
use gauss_layer::testing::{relative_error, tolerance};
use gauss_layer::{GaussLayerConfig, PositiveMap};

/// The directory of reference files: `GAUSS_REFERENCE_DIR`, or the project's own copy.
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("GAUSS_REFERENCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/reference")),
    }
}

/// One reference file: its metadata and its f64 tensors (on the CPU).
pub struct ReferenceFile {
    /// The file name, for reports.
    pub name: String,
    /// Metadata `kind`.
    pub kind: String,
    /// All metadata.
    pub metadata: HashMap<String, String>,
    /// All tensors, as stored (f64, CPU).
    pub tensors: HashMap<String, Tensor>,
}

impl ReferenceFile {
    /// Reads one file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{name}: bad safetensors header: {e}"))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let kind = metadata
            .get("kind")
            .cloned()
            .with_context(|| format!("{name}: metadata has no `kind`"))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("{name}: reading tensors"))?;
        Ok(Self {
            name,
            kind,
            metadata,
            tensors,
        })
    }

    /// A metadata value, or an error naming the key.
    pub fn meta(&self, key: &str) -> anyhow::Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("{}: metadata has no `{key}`", self.name))
    }

    /// A tensor converted to `dtype` on `device`, or an error naming it.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> anyhow::Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: no tensor `{name}`", self.name))?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// Every `*.safetensors` file of `dir`, sorted by name; an error when there is none.
pub fn load_reference_files(dir: &Path) -> anyhow::Result<Vec<ReferenceFile>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading reference directory {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    anyhow::ensure!(
        !paths.is_empty(),
        "no *.safetensors reference file in {}",
        dir.display()
    );
    paths.iter().map(|p| ReferenceFile::load(p)).collect()
}

/// Collects every comparison; fails at the end with all failures listed.
pub struct Report {
    dtype: DType,
    portable: bool,
    tolerance: f64,
    checks: usize,
    worst: f64,
    failures: Vec<String>,
}

impl Report {
    /// A report at the project tolerance of `dtype`.
    pub fn new(dtype: DType, portable: bool) -> Self {
        Self {
            dtype,
            portable,
            tolerance: tolerance(dtype),
            checks: 0,
            worst: 0.0,
            failures: Vec::new(),
        }
    }

    /// Compares `actual` with the expected tensor (relative error, max |a−b| / max |b|).
    pub fn compare(&mut self, file: &str, tensor: &str, actual: &Tensor, expected: &Tensor) {
        self.checks += 1;
        match relative_error(actual, expected) {
            Ok(err) if err <= self.tolerance => self.worst = self.worst.max(err),
            Ok(err) => self.failures.push(format!(
                "{file}: {tensor}: relative error {err:e} > {:e}",
                self.tolerance
            )),
            Err(e) => self.failures.push(format!("{file}: {tensor}: {e}")),
        }
    }

    /// Records a failure that is not a comparison (a missing tensor, an error).
    pub fn fail(&mut self, file: &str, tensor: &str, error: String) {
        self.checks += 1;
        self.failures.push(format!("{file}: {tensor}: {error}"));
    }

    /// `Ok` when nothing failed; otherwise an error listing every failure.
    pub fn finish(self, dir: &Path, files: usize) -> anyhow::Result<()> {
        println!(
            "{files} reference files in {} ({:?}, {} path): {} checks, {} failed, worst passing relative error {:e} (tolerance {:e})",
            dir.display(),
            self.dtype,
            if self.portable { "portable" } else { "default" },
            self.checks,
            self.failures.len(),
            self.worst,
            self.tolerance
        );
        anyhow::ensure!(
            self.failures.is_empty(),
            "{} of {} conformance checks failed ({:?}):\n{}",
            self.failures.len(),
            self.checks,
            self.dtype,
            self.failures.join("\n")
        );
        Ok(())
    }
}

/// One reference file checked in one dtype on one device, its comparisons going to `report`.
pub struct Case<'a> {
    /// The reference file.
    pub file: &'a ReferenceFile,
    /// The working dtype.
    pub dtype: DType,
    /// The working device.
    pub device: &'a Device,
    /// Run the layers and precisions through the portable tensor-op path (what CUDA and
    /// Metal run) instead of the default (fused CPU ops where they apply).
    pub portable: bool,
    /// Where the comparisons go.
    pub report: &'a mut Report,
}

impl Case<'_> {
    /// A tensor of the file in the working dtype on the working device.
    pub fn tensor(&self, name: &str) -> anyhow::Result<Tensor> {
        self.file.tensor(name, self.dtype, self.device)
    }

    /// Compares `actual` with the file's tensor `expected`, reported under `label`; an error
    /// only when the file lacks `expected`.
    pub fn compare(&mut self, label: &str, actual: &Tensor, expected: &str) -> anyhow::Result<()> {
        let expected = self.tensor(expected)?;
        self.report
            .compare(&self.file.name, label, actual, &expected);
        Ok(())
    }

    /// Compares `actual` with a tensor computed by the test (not read from the file).
    pub fn compare_to(&mut self, label: &str, actual: &Tensor, expected: &Tensor) {
        self.report
            .compare(&self.file.name, label, actual, expected);
    }

    /// Records a failure that is not a comparison.
    pub fn fail(&mut self, label: &str, error: String) {
        self.report.fail(&self.file.name, label, error);
    }
}

/// The gradient that reached `var`, or an error naming `what`.
pub fn gradient(grads: &GradStore, var: &Var, what: &str) -> anyhow::Result<Tensor> {
    grads
        .get(var.as_tensor())
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no gradient reached {what}"))
}

/// The raw tensor of a cholesky precision (with `config`'s positive map and floor) whose
/// factor is `factor`, computed in f64 on the host. Needs `L_ii > floor`.
///
/// # Shapes
/// `factor`: (Z, d, d) → (Z, d, d), f64 on the CPU
pub fn cholesky_raw_from_factor(
    factor: &Tensor,
    config: &GaussLayerConfig,
) -> anyhow::Result<Tensor> {
    let (z, d, _) = factor.dims3()?;
    let mut values = factor
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    for n in 0..z {
        for i in 0..d {
            let k = n * d * d + i * d + i;
            anyhow::ensure!(
                values[k] > config.precision.factor_diag_floor,
                "factor diagonal {} of neuron {n} is not above the floor {}",
                values[k],
                config.precision.factor_diag_floor
            );
            values[k] = positive_map_inverse(
                config.precision.positive_map,
                values[k] - config.precision.factor_diag_floor,
            );
        }
    }
    Ok(Tensor::from_vec(values, (z, d, d), &Device::Cpu)?)
}

/// The gradient with respect to a cholesky raw tensor → the gradient with respect to its
/// factor `L`: the diagonal is divided by the positive map's derivative at the raw value.
///
/// # Shapes
/// `grad_raw`, `raw`: (Z, d, d) → (Z, d, d)
pub fn chain_raw_gradient_to_factor(
    grad_raw: &Tensor,
    raw: &Tensor,
    config: &GaussLayerConfig,
) -> anyhow::Result<Tensor> {
    let raw_diag = linalg::diagonal(raw)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?;
    let derivative: Vec<f64> = raw_diag
        .flatten_all()?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|r| positive_map_derivative(config.precision.positive_map, r))
        .collect();
    let derivative = Tensor::from_vec(derivative, raw_diag.dims(), &Device::Cpu)?
        .to_dtype(grad_raw.dtype())?
        .to_device(grad_raw.device())?;
    let diag = (linalg::diagonal(grad_raw)? / derivative)?;
    Ok((linalg::strict_tril(grad_raw)? + linalg::diag_embed(&diag)?)?)
}

/// The inverse of the positive map, in f64 (the reference files store `L`; the layer stores
/// the raw value): softplus⁻¹(y) = y + log(1 − e^{−y}), exp⁻¹ = log.
fn positive_map_inverse(map: PositiveMap, y: f64) -> f64 {
    match map {
        PositiveMap::Softplus => y + (-(-y).exp_m1()).ln(),
        PositiveMap::Exp => y.ln(),
    }
}

/// The derivative of the positive map at a raw value: the sigmoid for softplus, `e^r` for exp.
fn positive_map_derivative(map: PositiveMap, r: f64) -> f64 {
    match map {
        PositiveMap::Softplus => 1.0 / (1.0 + (-r).exp()),
        PositiveMap::Exp => r.exp(),
    }
}
