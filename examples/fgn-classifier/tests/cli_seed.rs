//! `train --seed` makes a run repeatable, the λ-loss's random trace probes included (they
//! come from `gauss_layer::seed_trace_probes`; Candle's CPU generator cannot be seeded).

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gauss_tests::temp_dir;

mod common;
use common::run_ok;

/// Trains a small cholesky FGN with Hutchinson probes and returns its saved tensors.
fn trained(dir: &std::path::Path, name: &str, seed: &str) -> Result<HashMap<String, Vec<f32>>> {
    let ckpt = dir.join(name).display().to_string();
    run_ok(&[
        "train",
        "--fgn-only",
        "--param",
        "cholesky",
        "--hidden",
        "8",
        "--epochs",
        "2",
        "--trace-probes",
        "2",
        "--seed",
        seed,
        "--out",
        &ckpt,
    ])?;
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&ckpt, &Device::Cpu)?;
    tensors
        .into_iter()
        .map(|(name, t)| {
            Ok((
                name,
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            ))
        })
        .collect()
}

#[test]
fn one_seed_trains_one_network_with_random_trace_probes() -> Result<()> {
    let dir = temp_dir("seed")?;
    let first = trained(&dir, "a.safetensors", "3")?;
    let again = trained(&dir, "b.safetensors", "3")?;
    assert!(!first.is_empty());
    assert_eq!(
        first, again,
        "two runs with --seed 3 saved different tensors"
    );
    let other = trained(&dir, "c.safetensors", "4")?;
    assert_ne!(
        first, other,
        "--seed 4 trained the same network as --seed 3"
    );
    Ok(())
}
