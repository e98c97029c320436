//! `train --calibration-split` through the built binary: the held-out images are counted, the
//! fitted temperature is recorded in the checkpoint and `eval` reads it back, and `predict`'s
//! `output` is the network's logits divided by it (checked against the network run here).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use gauss_layer::checkpoint;
use gauss_tests::temp_dir;

fn run(args: &[&str]) -> Result<(bool, String, String)> {
    gauss_tests::run_limited(env!("CARGO_BIN_EXE_fgn-classifier"), args)
}

fn run_ok(args: &[&str]) -> Result<serde_json::Value> {
    let (ok, stdout, stderr) = run(args)?;
    if !ok {
        bail!("{args:?} failed: {stderr}");
    }
    Ok(serde_json::from_str(stdout.lines().last().unwrap_or(""))?)
}

#[test]
fn the_fitted_temperature_is_recorded_and_applied() -> Result<()> {
    let dir = temp_dir("calibration")?;
    let ckpt = dir.join("net.safetensors").display().to_string();
    let trained = run_ok(&[
        "train",
        "--fgn-only",
        "--epochs",
        "3",
        "--calibration-split",
        "0.2",
        "--out",
        &ckpt,
    ])?;
    let field = |name: &str| trained[name].as_f64().with_context(|| format!("`{name}`"));
    let (train_images, held_out) = (field("train_images")?, field("calibration_images")?);
    assert_eq!(
        held_out,
        (0.2 * (train_images + held_out)).round(),
        "{trained}"
    );
    let temperature = field("temperature")?;
    assert!(temperature.is_finite() && temperature > 0.0, "{trained}");

    // The checkpoint records it exactly (f64 Display round-trips) and eval applies it: the
    // same accuracy on the bundled test split.
    let loaded = checkpoint::load(&ckpt, &Device::Cpu, None)?;
    let recorded: f64 = loaded.user_metadata["temperature"].parse()?;
    assert_eq!(recorded, temperature);
    let evaluated = run_ok(&["eval", &ckpt])?;
    assert_eq!(evaluated["temperature"].as_f64(), Some(temperature));
    assert_eq!(evaluated["test_accuracy"], trained["test_accuracy"]);

    // predict: output = logits / T, against the network run here on the same inputs.
    let x = Tensor::rand(0f32, 16.0, (5, 64), &Device::Cpu)?.round()?;
    let input = dir.join("x.safetensors");
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), x.clone())]), &input)?;
    let output = dir.join("out.safetensors");
    let predicted = run_ok(&[
        "predict",
        &ckpt,
        "--input",
        &input.display().to_string(),
        "--output",
        &output.display().to_string(),
    ])?;
    assert_eq!(predicted["temperature"].as_f64(), Some(temperature));
    let got = candle_core::safetensors::load(&output, &Device::Cpu)?["output"].clone();
    let scale: f64 = loaded.user_metadata["input_scale"].parse()?;
    let logits = loaded.net.forward(&(x / scale)?, false)?;
    let expected = (logits / temperature)?;
    // f64: every tensor here is on Device::Cpu
    let diff = (got - &expected)?
        .abs()?
        .max_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    assert!(
        diff < 1e-5,
        "predict output differs from logits / T by {diff}"
    );
    // And the division matters: T differs from 1 by more than that.
    assert!((temperature - 1.0).abs() > 1e-3, "T = {temperature}");

    for bad in ["0", "0.75", "nan"] {
        let (ok, _, stderr) = run(&["train", "--fgn-only", "--calibration-split", bad])?;
        assert!(
            !ok && stderr.contains("--calibration-split"),
            "{bad}: {stderr}"
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
