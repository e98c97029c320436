//! Reading the recorded reference files of `tests/data/density/` (written by the scripts in
//! `tools/density/`).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

/// The tensors of `tests/data/density/<name>.safetensors`, on the CPU.
pub fn load(name: &str) -> Result<HashMap<String, Tensor>> {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/density"))
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))
}

/// Tensor `key` of a loaded file, or an error naming it.
pub fn get<'a>(tensors: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    tensors
        .get(key)
        .with_context(|| format!("reference file has no tensor `{key}`"))
}

/// A one-element tensor of a loaded file as f64.
pub fn scalar(tensors: &HashMap<String, Tensor>, key: &str) -> Result<f64> {
    Ok(get(tensors, key)?.flatten_all()?.to_vec1::<f64>()?[0])
}
