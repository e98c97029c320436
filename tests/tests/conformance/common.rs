//! Loading reference files and collecting comparison failures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use gauss_layer::testing::{relative_error, tolerance};

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
    tolerance: f64,
    checks: usize,
    worst: f64,
    failures: Vec<String>,
}

impl Report {
    /// A report at the project tolerance of `dtype`.
    pub fn new(dtype: DType) -> Self {
        Self {
            dtype,
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
            "{files} reference files in {} ({:?}): {} checks, {} failed, worst passing relative error {:e} (tolerance {:e})",
            dir.display(),
            self.dtype,
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
