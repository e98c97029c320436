//! Save → load of a `GaussNet` gives bit-identical outputs on CPU, keeps user metadata, and
//! converts dtypes on request. Saving is atomic (no temporary file left behind).

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gauss_layer::checkpoint;
use gauss_layer::{GaussLayerConfig, GaussNet, GaussNetConfig, Parameterization, PrecisionConfig};

use gauss_tests::{new_net, small_diag_net_config, temp_dir};

// f64: checkpoint tests load on Device::Cpu
fn bits(t: &Tensor) -> Result<Vec<u64>> {
    Ok(t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(f64::to_bits)
        .collect())
}

fn configs() -> Vec<GaussNetConfig> {
    let mut out = Vec::new();
    for parameterization in Parameterization::ALL {
        out.push(GaussNetConfig {
            in_features: 5,
            hidden: vec![7, 4],
            out_features: 3,
            layer: GaussLayerConfig {
                precision: PrecisionConfig::with_parameterization(parameterization),
                tanh: true,
                ..Default::default()
            },
            output_layer: Some(GaussLayerConfig::with_parameterization(parameterization)),
            input_batch_norm: true,
            batch_norm: true,
            dropout: 0.25,
            ..Default::default()
        });
    }
    out
}

#[test]
fn save_then_load_gives_bit_identical_outputs() -> Result<()> {
    let dir = temp_dir("ckpt-roundtrip")?;
    let x = Tensor::randn(0f32, 1.0, (9, 5), &Device::Cpu)?;
    for config in configs() {
        let name = config.layer.precision.parameterization.name();
        let (net, _vars) = new_net(config.clone(), DType::F32)?;
        // One training-mode pass moves the batch-norm running statistics off their defaults,
        // so the round trip also covers them.
        net.forward(&x, true)?;
        let (before, gaussians_before) = net.forward_with_gaussians(&x, false)?;
        let path = dir.join(format!("{name}.safetensors"));
        net.save(&path)?;
        let loaded = GaussNet::load(&path, &Device::Cpu, None)?;
        assert_eq!(loaded.config(), &config, "{name}: config comes back");
        let (after, gaussians_after) = loaded.forward_with_gaussians(&x, false)?;
        assert_eq!(bits(&before)?, bits(&after)?, "{name}: outputs differ");
        for (g0, g1) in gaussians_before.iter().zip(&gaussians_after) {
            assert_eq!(bits(g0)?, bits(g1)?, "{name}: Gaussians differ");
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".tmp") || name.contains(".gauss-tmp.")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn metadata_and_dtype_conversion() -> Result<()> {
    let dir = temp_dir("ckpt-meta")?;
    let (net, _vars) = new_net(small_diag_net_config(), DType::F32)?;
    let path = dir.join("net.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert(
        "test_accuracy".to_string(),
        "0.9722222222222222".to_string(),
    );
    meta.insert(
        "format".to_string(),
        "user value, not the format field".to_string(),
    );
    checkpoint::save_with_metadata(&net, &path, &meta)?;
    // Overwriting an existing checkpoint goes through the same temporary file + rename.
    checkpoint::save_with_metadata(&net, &path, &meta)?;

    let loaded = checkpoint::load(&path, &Device::Cpu, None)?;
    assert_eq!(loaded.user_metadata, meta);
    assert_eq!(loaded.stored_dtype, DType::F32);
    // The loaded VarMap holds every tensor of the network, ready for an optimizer.
    let names: Vec<String> = net.named_tensors().into_iter().map(|(n, _)| n).collect();
    let data = loaded.varmap.data().lock().expect("lock");
    for name in &names {
        assert!(data.contains_key(name), "VarMap lacks {name}");
    }
    drop(data);

    let x = Tensor::randn(0f32, 1.0, (6, 3), &Device::Cpu)?;
    let as_f64 = GaussNet::load(&path, &Device::Cpu, Some(DType::F64))?;
    // f64: checkpoint tests load on Device::Cpu
    let y64 = as_f64.forward(&x.to_dtype(DType::F64)?, false)?;
    assert_eq!(y64.dtype(), DType::F64);
    // f64: checkpoint tests load on Device::Cpu
    let y32 = net.forward(&x, false)?.to_dtype(DType::F64)?;
    // f32 weights widened to f64 exactly; only the f32 vs f64 arithmetic differs (f32 tolerance).
    let diff = (y64 - y32)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(diff < 1e-4, "f64 load differs by {diff}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A checkpoint saved from the CPU loads onto every enabled device and runs there: the same
/// outputs as on the CPU to the dtype's tolerance (bit-identical on the CPU itself); an f64
/// checkpoint with no dtype asked for keeps f64 where the device has it and runs in f32 on
/// Metal (`checkpoint::default_load_dtype`).
fn checkpoint_loads_and_runs_on_the_device(device: &Device) -> Result<()> {
    let dir = temp_dir("ckpt-device")?;
    let x = Tensor::randn(0f32, 1.0, (9, 5), &Device::Cpu)?;
    for config in configs() {
        let name = config.layer.precision.parameterization.name();
        for dtype in [DType::F32, DType::F64] {
            let (net, _vars) = new_net(config.clone(), dtype)?;
            let x = x.to_dtype(dtype)?;
            net.forward(&x, true)?;
            let expected = net.forward(&x, false)?;
            let path = dir.join(format!("{name}-{}.safetensors", dtype.as_str()));
            net.save(&path)?;
            let loaded = checkpoint::load(&path, device, None)?;
            assert_eq!(loaded.stored_dtype, dtype);
            let running = checkpoint::default_load_dtype(dtype, device);
            let layer_dtype = loaded.net.layers()[0].center().dtype();
            assert_eq!(layer_dtype, running, "{name}: loaded dtype");
            let y = loaded
                .net
                .forward(&x.to_dtype(running)?.to_device(device)?, false)?;
            let err = gauss_layer::testing::relative_error(&y, &expected)?;
            let tolerance = if device.is_cpu() {
                0.0
            } else {
                gauss_layer::testing::tolerance(running)
            };
            assert!(err <= tolerance, "{name} {dtype:?}: relative error {err:e}");
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
gauss_layer::test_device!(checkpoint_loads_and_runs_on_the_device);

/// Every float of the config comes back with its bits: the decimals below are ones that
/// `serde_json`'s default (not correctly rounded) parse reads one ulp off, so a loaded
/// network had another width floor, factor floor, batch-norm epsilon and init scale.
#[test]
fn config_floats_come_back_bit_for_bit() -> Result<()> {
    let dir = temp_dir("ckpt-floats")?;
    let mut config = small_diag_net_config();
    config.layer.precision.width_floor = Some(4.544_697_111_263_059_6e-5);
    config.layer.init.center_std = 5.873_272_580_101_452_4e-5;
    config.batch_norm_eps = 4.539_025_429_288_408_3e-5;
    config.batch_norm = true;
    let mut output = GaussLayerConfig::with_parameterization(Parameterization::Cholesky);
    output.precision.factor_diag_floor = 4.984_131_188_374_780_4e-5;
    config.output_layer = Some(output);
    let (net, _vars) = new_net(config.clone(), DType::F32)?;
    let path = dir.join("floats.safetensors");
    net.save(&path)?;
    let loaded = GaussNet::load(&path, &Device::Cpu, None)?;
    let got = loaded.config();
    assert_eq!(
        got.layer.precision.width_floor.map(f64::to_bits),
        config.layer.precision.width_floor.map(f64::to_bits)
    );
    assert_eq!(
        got.batch_norm_eps.to_bits(),
        config.batch_norm_eps.to_bits()
    );
    assert_eq!(got, &config);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
