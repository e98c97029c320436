//! Seeded initialization. The FGN network seeds itself (`InitConfig::seed`); here only its
//! first-layer centers move onto training images. Candle's CPU random generator cannot be
//! seeded, so the classical MLP's `Linear` weights and biases are redrawn from a seeded
//! generator.

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use gauss_layer::GaussNet;
use rand::rngs::StdRng;
use rand::Rng;

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

/// Data-driven first-layer centers: each neuron starts on a random training image, where the
/// data is. Everything else (weights, biases, deeper centers, precisions) comes from the layers'
/// own seeded initialization ([`gauss_layer::InitConfig::seed`]).
pub fn centers_on_training_images(
    varmap: &mut VarMap,
    net: &GaussNet,
    train: &Split,
    rng: &mut StdRng,
) -> Result<()> {
    let Some(first) = net.layers().first() else {
        return Ok(());
    };
    let like = first.center();
    let picks: Vec<u32> = (0..first.out_features())
        .map(|_| rng.random_range(0..train.len() as u32))
        .collect();
    let index = Tensor::new(picks.as_slice(), &Device::Cpu)?;
    let center = train.images.index_select(&index, 0)?;
    set(
        varmap,
        "layers.0.center",
        center.to_dtype(like.dtype())?.to_device(like.device())?,
    )
}
