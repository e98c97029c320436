//! Seeded initialization. Candle's CPU random generator cannot be seeded, so the tensors that
//! decide where training goes (weights, biases, centers) are redrawn from a seeded generator.
//! The precisions keep the layer's deterministic initial width (their random perturbation is
//! relative 1e-3 and does not matter).

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use gauss_layer::GaussNet;
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::data::Split;

fn uniform(rng: &mut StdRng, shape: &[usize], bound: f64, like: &Tensor) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-bound..=bound) as f32)
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())?)
}

fn set(varmap: &mut VarMap, name: &str, value: Tensor) -> Result<()> {
    if varmap
        .data()
        .lock()
        .map(|d| d.contains_key(name))
        .unwrap_or(false)
    {
        varmap.set_one(name, value)?;
    }
    Ok(())
}

/// Seeded Kaiming-uniform weights and biases for a `Linear` stack named `{i}.weight`, `{i}.bias`.
pub fn seeded_mlp(varmap: &mut VarMap, sizes: &[usize], rng: &mut StdRng) -> Result<()> {
    for (i, w) in sizes.windows(2).enumerate() {
        let like = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
            .get(&format!("{i}.weight"))
            .map(|v| v.as_tensor().clone());
        let Some(like) = like else { continue };
        let bound = 1.0 / (w[0] as f64).sqrt();
        set(
            varmap,
            &format!("{i}.weight"),
            uniform(rng, &[w[1], w[0]], bound * 3f64.sqrt(), &like)?,
        )?;
        set(
            varmap,
            &format!("{i}.bias"),
            uniform(rng, &[w[1]], bound, &like)?,
        )?;
    }
    Ok(())
}

/// Seeded FGN weights and biases (Kaiming uniform), first-layer centers on random training
/// images (each neuron starts where the data is), deeper centers N(0, 0.1²).
pub fn seeded_fgn(
    varmap: &mut VarMap,
    net: &GaussNet,
    train: &Split,
    rng: &mut StdRng,
) -> Result<()> {
    let normal = Normal::new(0.0f64, 0.1)?;
    for (i, layer) in net.layers().iter().enumerate() {
        let (z, d) = (layer.out_features(), layer.in_features());
        let like = layer.center();
        let bound = 1.0 / (d as f64).sqrt();
        set(
            varmap,
            &format!("layers.{i}.weight"),
            uniform(rng, &[z, d], bound * 3f64.sqrt(), like)?,
        )?;
        set(
            varmap,
            &format!("layers.{i}.bias"),
            uniform(rng, &[z], bound, like)?,
        )?;
        let center = if i == 0 {
            let picks: Vec<u32> = (0..z)
                .map(|_| rng.random_range(0..train.len() as u32))
                .collect();
            let index = Tensor::new(picks.as_slice(), &Device::Cpu)?;
            train.images.index_select(&index, 0)?
        } else {
            let values: Vec<f32> = (0..z * d).map(|_| normal.sample(rng) as f32).collect();
            Tensor::from_vec(values, (z, d), &Device::Cpu)?
        };
        set(
            varmap,
            &format!("layers.{i}.center"),
            center.to_dtype(like.dtype())?.to_device(like.device())?,
        )?;
    }
    Ok(())
}
