//! Values that overflow are refused, never turned into ∞ or NaN; strict configs; singular
//! factors; sizes (issue 17, items 2, 3, 4, 7, 9, 13).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gauss_layer::import::{self, FgnImportOptions};
use gauss_layer::{checkpoint, files, memory, GaussError, GaussNetConfig};
use gauss_layer::{GaussLayerConfig, Parameterization};
use gauss_losses::{nll_covariance_factor, nll_precision_factor, Reduction};
use gauss_tests::{new_net, small_diag_net_config, temp_dir};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/interop")
        .join(name)
        .join("model.safetensors")
}

/// `bytes` (a safetensors file) with its JSON header padded with spaces to `len` bytes, as
/// the format allows.
fn with_header_len(bytes: &[u8], len: usize) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end();
    assert!(header.len() <= len);
    let mut out = (len as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(b' ', len - header.len()));
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn valid_state_dicts_that_start_like_a_pickle_import() -> Result<()> {
    // Header lengths 0x280..0x580 make the file start with `80 02`..`80 05`, a pickle's
    // opening: the import must read it as the safetensors file it is (issue 17, item 4).
    let dir = temp_dir("hard-pickle")?;
    let bytes = std::fs::read(fixture("layer_diag_nonlin"))?;
    let options = FgnImportOptions {
        non_lin: true,
        ..Default::default()
    };
    let (reference, _) = import::import_fgn_model(
        fixture("layer_diag_nonlin"),
        &Device::Cpu,
        DType::F64,
        &options,
    )?;
    for len in [0x280usize, 0x380, 0x480, 0x580] {
        let padded = with_header_len(&bytes, len);
        assert_eq!(padded[0], 0x80);
        let path = dir.join(format!("padded-{len:x}.safetensors"));
        std::fs::write(&path, &padded)?;
        let (net, _) = import::import_fgn_model(&path, &Device::Cpu, DType::F64, &options)?;
        for ((name, a), (_, b)) in net.named_tensors().iter().zip(reference.named_tensors()) {
            let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "{name}");
        }
    }
    // A real pickle's opening with no valid safetensors behind it is still diagnosed.
    let e =
        import::state_dict_from_bytes(&[0x80, 0x02, 0x8a, 0x0a], "m.pth", &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
    assert!(e.contains("torch.save"), "{e}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn an_import_that_overflows_its_dtype_is_refused_naming_the_tensor() -> Result<()> {
    // f64 state dicts with a center of 1e300 or a weight of 1e39: fine in f64, ∞ in f32.
    let dir = temp_dir("hard-import-f32")?;
    let tensors = import::load_state_dict(fixture("layer_diag_nonlin"), &Device::Cpu, DType::F64)?;
    let options = FgnImportOptions {
        non_lin: true,
        ..Default::default()
    };
    for (key, value) in [("centers", 1e300), ("weights", 1e39)] {
        let mut edited: HashMap<String, Tensor> = tensors.clone();
        let t = &edited[key];
        let mut values = t.flatten_all()?.to_vec1::<f64>()?;
        values[0] = value;
        edited.insert(
            key.to_string(),
            Tensor::from_vec(values, t.dims(), &Device::Cpu)?,
        );
        let path = dir.join(format!("{key}.safetensors"));
        candle_core::safetensors::save(&edited, &path)?;
        import::import_fgn_model(&path, &Device::Cpu, DType::F64, &options)?;
        let e = import::import_fgn_model(&path, &Device::Cpu, DType::F32, &options)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not finite in F32") && e.contains(&format!("{value:e}")),
            "{e}"
        );
        assert!(e.contains(&format!("{key}.safetensors")), "{e}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn data_matrices_are_checked_after_scaling_and_casting() -> Result<()> {
    let dir = temp_dir("hard-matrix")?;
    let path = dir.join("x.safetensors");
    let x = Tensor::new(&[[0u8, 255], [16, 1]], &Device::Cpu)?;
    files::save_tensors(&path, &[("x", &x)])?;
    let bytes = files::read_regular(&path)?;
    let matrix = files::DataFile::parse(&bytes, &path)?.matrix("x")?;
    // 255 / 1e-307 is ∞ already in f64; 255 / 1e-40 = 2.55e42 only overflows f32.
    for (scale, dtype) in [(1e-307, DType::F64), (1e-40, DType::F32)] {
        let mut scaled = matrix.clone();
        scaled.divide(scale);
        let e = scaled.to_tensor(dtype, &Device::Cpu).unwrap_err();
        assert!(matches!(e, GaussError::Data { .. }), "{e:?}");
        assert!(e.to_string().contains("row 0, column 1"), "{e}");
    }
    let mut scaled = matrix.clone();
    scaled.divide(255.0);
    let t = scaled.to_tensor(DType::F32, &Device::Cpu)?;
    assert_eq!(t.to_vec2::<f32>()?[0], vec![0.0, 1.0]);
    // Not a matrix; no rows; missing tensor; not a number.
    let cases: Vec<(&str, Tensor, &str)> = vec![
        (
            "x",
            Tensor::zeros(3, DType::F32, &Device::Cpu)?,
            "expected shape (N, D)",
        ),
        (
            "x",
            Tensor::zeros((0, 3), DType::F32, &Device::Cpu)?,
            "N = 0",
        ),
        (
            "y",
            Tensor::zeros((1, 3), DType::F32, &Device::Cpu)?,
            "no tensor `x`",
        ),
    ];
    for (name, t, needle) in cases {
        files::save_tensors(&path, &[(name, &t)])?;
        let bytes = files::read_regular(&path)?;
        let e = files::DataFile::parse(&bytes, &path)?
            .matrix("x")
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle) && e.contains("x.safetensors"), "{e}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The checkpoint's header with `edit` applied (and relabelled `version`).
fn edited_checkpoint(bytes: &[u8], version: &str, edit: impl Fn(&str) -> String) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let edited = edit(&header.replace(
        "\"format_version\":\"3\"",
        &format!("\"format_version\":\"{version}\""),
    ));
    assert_ne!(edited, header);
    let mut out = (edited.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(edited.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn configs_refuse_duplicate_keys_and_nested_unknown_fields_in_every_version() -> Result<()> {
    let dir = temp_dir("hard-config")?;
    let (net, _vars) = new_net(small_diag_net_config(), DType::F32)?;
    let path = dir.join("net.safetensors");
    checkpoint::save(&net, &path)?;
    let bytes = std::fs::read(&path)?;
    for version in ["1", "2", "3"] {
        // `"gate":false` appended after `"gate":true`: last-wins would load gate = false.
        let file = edited_checkpoint(&bytes, version, |h| {
            h.replace("\\\"gate\\\":true", "\\\"gate\\\":true,\\\"gate\\\":false")
        });
        let e = checkpoint::load_from_bytes(&file, "dup", &Device::Cpu, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("duplicate") && e.contains("gate"),
            "v{version}: {e}"
        );
    }
    // A lowrank network with an unknown field inside its parameterization.
    let config = GaussNetConfig {
        layer: GaussLayerConfig::with_parameterization(Parameterization::LowRank { rank: 2 }),
        ..small_diag_net_config()
    };
    let (net, _vars) = new_net(config, DType::F32)?;
    checkpoint::save(&net, &path)?;
    let bytes = std::fs::read(&path)?;
    for version in ["1", "2", "3"] {
        let file = edited_checkpoint(&bytes, version, |h| {
            h.replace("{\\\"rank\\\":2}", "{\\\"rank\\\":2,\\\"extra\\\":1}")
        });
        let e = checkpoint::load_from_bytes(&file, "extra", &Device::Cpu, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `extra`"), "v{version}: {e}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn sizes_are_counted_in_checked_arithmetic_and_lowrank_rank_is_at_most_d() -> Result<()> {
    let config = GaussNetConfig {
        in_features: 64,
        hidden: vec![4611686018427387904],
        out_features: 10,
        ..Default::default()
    };
    assert!(memory::network_elements(&config).is_err());
    assert!(memory::check_fits("x", None).is_err());
    // 1e9 hidden diag neurons over 64 inputs: 1.3e11 parameters, more than any machine here.
    let config = GaussNetConfig {
        hidden: vec![1_000_000_000],
        layer: GaussLayerConfig::with_parameterization(Parameterization::Diag),
        ..config
    };
    let bytes = memory::network_elements(&config)?.checked_mul(16);
    let e = memory::check_fits("training", bytes)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs about"), "{e}");
    // Rank 1000 on 64 inputs (6.4 GB of U before): refused by the config, as is the layer.
    let lowrank = GaussLayerConfig::with_parameterization(Parameterization::LowRank { rank: 1000 });
    let config = GaussNetConfig {
        hidden: vec![8],
        layer: lowrank.clone(),
        ..config
    };
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("rank <= the layer's 64 inputs"), "{e}");
    assert!(lowrank.validate_sizes(64, 8).is_err());
    let fine = GaussLayerConfig::with_parameterization(Parameterization::LowRank { rank: 64 });
    fine.validate_sizes(64, 8)?;
    Ok(())
}

#[test]
fn losses_refuse_a_singular_factor_instead_of_returning_inf() -> Result<()> {
    let x = Tensor::new(&[[0.5f64, -1.0], [2.0, 0.25]], &Device::Cpu)?;
    let mean = Tensor::new(&[0.0f64, 0.0], &Device::Cpu)?;
    let singular = Tensor::new(&[[1.0f64, 0.0], [0.3, 0.0]], &Device::Cpu)?;
    for result in [
        nll_covariance_factor(&x, &mean, &singular, Reduction::Mean),
        nll_precision_factor(&x, &mean, &singular, Reduction::Mean),
    ] {
        match result {
            Err(GaussError::Numerical { reason, .. }) => {
                assert!(reason.contains("diagonal entry 1"), "{reason}")
            }
            other => panic!("expected a numerical error, got {other:?}"),
        }
    }
    let inf = Tensor::new(&[[f64::INFINITY, 0.0], [0.0, 1.0]], &Device::Cpu)?;
    assert!(nll_precision_factor(&x, &mean, &inf, Reduction::Sum).is_err());
    Ok(())
}

/// A network with an input batch norm names an input of the wrong dtype (the batch norm runs
/// before the first layer's own check; it used to surface as Candle's bare "dtype mismatch in
/// sub"), in both directions.
#[test]
fn networks_name_an_input_of_the_wrong_dtype() -> Result<()> {
    for (net_dtype, input_dtype) in [(DType::F64, DType::F32), (DType::F32, DType::F64)] {
        let config = GaussNetConfig {
            input_batch_norm: true,
            batch_norm: true,
            ..small_diag_net_config()
        };
        let (net, _vars) = new_net(config, net_dtype)?;
        let x = Tensor::zeros((5, 3), input_dtype, &Device::Cpu)?;
        for train in [false, true] {
            match net.forward(&x, train) {
                Err(GaussError::DType { what, got, .. }) => {
                    assert_eq!((what.as_str(), got), ("input x", input_dtype))
                }
                other => panic!("{net_dtype:?} net, {input_dtype:?} x: {other:?}"),
            }
        }
        let ok = net.forward(&x.to_dtype(net_dtype)?, false)?;
        assert_eq!(ok.dims(), [5, 2]);
    }
    Ok(())
}
