//! A short training run of a `GaussNet` with the FGN objective lowers the loss, and a
//! checkpoint loaded for training resumes from the same loss.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use gauss_layer::checkpoint;
use gauss_layer::{GaussLayerConfig, GaussNet, GaussNetConfig, Parameterization, PrecisionConfig};
use gauss_losses::{fgn_objective, FgnObjectiveConfig};

use gauss_tests::new_net;

/// Two Gaussian blobs in 4-D around ±1 on every axis, labels 0 and 1 (deterministic).
fn blobs() -> Result<(Tensor, Tensor)> {
    let n = 64;
    let noise = Tensor::randn(0f32, 0.3, (n, 4), &Device::Cpu)?;
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
    let signs: Vec<f32> = labels
        .iter()
        .map(|&l| if l == 0 { -1.0 } else { 1.0 })
        .collect();
    let shift = Tensor::new(signs.as_slice(), &Device::Cpu)?
        .unsqueeze(1)?
        .broadcast_as((n, 4))?;
    Ok((
        (noise + shift)?,
        Tensor::new(labels.as_slice(), &Device::Cpu)?,
    ))
}

/// The optimizer of both the first run and the resumed one.
fn adamw(vars: Vec<Var>) -> Result<AdamW> {
    Ok(AdamW::new(
        vars,
        ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?)
}

fn loss(net: &GaussNet, x: &Tensor, y: &Tensor, objective: &FgnObjectiveConfig) -> Result<Tensor> {
    let logits = net.forward(x, false)?;
    Ok(fgn_objective(&logits, y, net.layers(), objective)?.total)
}

#[test]
fn short_training_lowers_the_loss_and_resumes_from_a_checkpoint() -> Result<()> {
    let (x, y) = blobs()?;
    let config = GaussNetConfig {
        in_features: 4,
        hidden: vec![8],
        out_features: 2,
        layer: GaussLayerConfig {
            precision: PrecisionConfig::with_parameterization(Parameterization::Diag),
            tanh: true,
            ..Default::default()
        },
        output_layer: Some(GaussLayerConfig::with_parameterization(
            Parameterization::Diag,
        )),
        ..Default::default()
    };
    let (net, varmap) = new_net(config, DType::F32)?;
    let objective = FgnObjectiveConfig::default();
    let mut opt = adamw(varmap.all_vars())?;
    let before = loss(&net, &x, &y, &objective)?.to_scalar::<f32>()?;
    for _ in 0..40 {
        let logits = net.forward(&x, true)?;
        opt.backward_step(&fgn_objective(&logits, &y, net.layers(), &objective)?.total)?;
    }
    let after = loss(&net, &x, &y, &objective)?.to_scalar::<f32>()?;
    assert!(
        after.is_finite() && after < 0.8 * before,
        "loss {before} -> {after}"
    );

    // Resume: the loaded network starts from the same loss and keeps training.
    let path = std::env::temp_dir().join(format!("gauss-train-{}.safetensors", std::process::id()));
    net.save(&path)?;
    let loaded = checkpoint::load(&path, &Device::Cpu, None)?;
    std::fs::remove_file(&path)?;
    let resumed = loss(&loaded.net, &x, &y, &objective)?.to_scalar::<f32>()?;
    assert_eq!(
        resumed.to_bits(),
        after.to_bits(),
        "resumed loss {resumed} vs {after}"
    );
    let mut opt = adamw(loaded.varmap.all_vars())?;
    for _ in 0..10 {
        let logits = loaded.net.forward(&x, true)?;
        opt.backward_step(&fgn_objective(&logits, &y, loaded.net.layers(), &objective)?.total)?;
    }
    let further = loss(&loaded.net, &x, &y, &objective)?.to_scalar::<f32>()?;
    assert!(
        further < resumed,
        "resumed training did not lower the loss: {resumed} -> {further}"
    );
    Ok(())
}
