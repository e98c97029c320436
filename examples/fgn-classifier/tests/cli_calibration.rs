//! `train --calibration-split` through the built binary: the held-out images are counted, the
//! fitted temperature is recorded in the checkpoint and `eval` reads it back, and `predict`'s
//! `output` is the network's logits divided by it (checked against the network run here).

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use gauss_layer::checkpoint;
use gauss_tests::temp_dir;

mod common;
use common::{run, run_ok, write_two_class_idx};

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
    // Float pixels 0..16: their scale is declared (predict refuses float `x` without it).
    let predicted = run_ok(&[
        "predict",
        &ckpt,
        "--input",
        &input.display().to_string(),
        "--output",
        &output.display().to_string(),
        "--input-scale",
        "16",
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

/// A copy of a safetensors file without the metadata entry `key` (the header is JSON after
/// its 8-byte length; tensor offsets are relative to the data, so the header may change
/// size).
fn without_metadata(from: &std::path::Path, to: &std::path::Path, key: &str) -> Result<()> {
    let bytes = std::fs::read(from)?;
    let length = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + length])?;
    header["__metadata__"]
        .as_object_mut()
        .context("no __metadata__")?
        .remove(key)
        .context("the key is not in the metadata")?;
    let mut text = serde_json::to_string(&header)?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + length..]);
    std::fs::write(to, out)?;
    Ok(())
}

#[test]
fn a_cnn_records_and_applies_its_temperature() -> Result<()> {
    let dir = temp_dir("calibration-cnn")?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    write_two_class_idx(&data, 200)?;
    let data = data.display().to_string();
    let ckpt = dir.join("cnn.safetensors");
    let ckpt_text = ckpt.display().to_string();
    let trained = run_ok(&[
        "train",
        "--arch",
        "cnn",
        "--data-dir",
        &data,
        "--channels",
        "4",
        "--features",
        "8",
        "--hidden",
        "8",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--calibration-split",
        "0.2",
        "--out",
        &ckpt_text,
    ])?;
    assert_eq!(trained["train_images"].as_u64(), Some(160), "{trained}");
    assert_eq!(
        trained["calibration_images"].as_u64(),
        Some(40),
        "{trained}"
    );
    let temperature = trained["fgn"]["temperature"]
        .as_f64()
        .with_context(|| format!("fgn.temperature in {trained}"))?;
    assert!(temperature.is_finite() && temperature > 0.0, "{trained}");
    assert!(
        trained["classical"]["temperature"].as_f64().is_some(),
        "{trained}"
    );

    // eval reads the recorded temperature: the same report as after training.
    let evaluated = run_ok(&["eval", &ckpt_text, "--data-dir", &data])?;
    assert_eq!(evaluated["temperature"].as_f64(), Some(temperature));
    for field in ["accuracy", "nll", "ece_15"] {
        assert_eq!(
            evaluated["fgn"][field], trained["fgn"][field],
            "{field}: {evaluated} vs {trained}"
        );
    }

    // predict: output · T is the output of the same checkpoint without a temperature.
    let x = Tensor::rand(0f32, 255.0, (6, 144), &Device::Cpu)?.round()?;
    let input = dir.join("x.safetensors");
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), x)]), &input)?;
    let plain = dir.join("plain.safetensors");
    // The user metadata is stored under `user.` keys.
    without_metadata(&ckpt, &plain, "user.temperature")?;
    let mut outputs = Vec::new();
    for (checkpoint, name) in [(&ckpt, "scaled"), (&plain, "plain")] {
        let output = dir.join(format!("{name}-out.safetensors"));
        let predicted = run_ok(&[
            "predict",
            &checkpoint.display().to_string(),
            "--input",
            &input.display().to_string(),
            "--output",
            &output.display().to_string(),
            "--input-scale",
            "255",
        ])?;
        outputs.push((
            predicted["temperature"].as_f64(),
            candle_core::safetensors::load(&output, &Device::Cpu)?["output"].clone(),
        ));
    }
    assert_eq!(outputs[0].0, Some(temperature));
    assert_eq!(outputs[1].0, Some(1.0));
    // f64: every tensor here is on Device::Cpu
    let diff = ((&outputs[0].1 * temperature)? - &outputs[1].1)?
        .abs()?
        .max_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    assert!(
        diff < 1e-4,
        "output · T differs from the plain output by {diff}"
    );
    assert!((temperature - 1.0).abs() > 1e-3, "T = {temperature}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
