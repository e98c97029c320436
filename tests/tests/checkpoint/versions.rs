//! Format versions: this build writes version 3 and still reads the version-1 and version-2
//! files written by earlier builds (fixtures in `tests/data/checkpoint/`, see the README
//! there), filling the config fields added since and moving the fields moved since (the
//! upgrade table); version 3 is parsed strictly.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, D};
use gauss_layer::checkpoint::{self, FORMAT_VERSION};
use gauss_layer::{GaussError, PrecisionConfig};

use gauss_tests::{new_net, small_diag_net_config, temp_dir};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/checkpoint")
        .join(name)
}

/// Correct predictions of `net` on the bundled digits' test split (pixels / 16).
fn digits_correct(net: &gauss_layer::GaussNet) -> Result<usize> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/digits.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let images = (tensors["test_images"].to_dtype(DType::F32)? / 16.0)?;
    let labels = tensors["test_labels"]
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    let predicted = net
        .forward(&images, false)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?;
    Ok(predicted
        .iter()
        .zip(&labels)
        .filter(|(p, l)| p == l)
        .count())
}

#[test]
fn version_1_and_2_files_of_earlier_builds_still_load() -> Result<()> {
    for (name, version) in [
        ("v1-cholesky.safetensors", 1),
        ("v1-before-seed.safetensors", 1),
        ("v2-cholesky.safetensors", 2),
    ] {
        let loaded = checkpoint::load(fixture(name), &Device::Cpu, None)
            .with_context(|| format!("loading {name}"))?;
        assert_eq!(loaded.format_version, version, "{name}");
        let config = loaded.net.config();
        assert_eq!((config.in_features, config.out_features), (64, 10));
        assert_eq!(config.hidden, vec![4]);
        // Cholesky with the defaults, written beside `tanh` in versions 1 and 2, arrives in
        // each layer's `precision`.
        let output = config.output_layer.as_ref().unwrap_or(&config.layer);
        for layer in [&config.layer, output] {
            assert_eq!(layer.precision, PrecisionConfig::default(), "{name}");
        }
        assert!(config.layer.tanh && config.gate);
        // The seed recorded by the writer, or `None` from the upgrade table.
        let seed = if name.contains("before-seed") {
            None
        } else {
            Some(0)
        };
        assert_eq!(config.layer.init.seed, seed, "{name}");
        // The network is the one that was trained: the test accuracy it recorded when saved
        // (metadata written by fgn-classifier from the same forward pass) is reproduced.
        let recorded: usize = loaded.user_metadata["test_correct"].parse()?;
        assert_eq!(recorded, 334);
        assert_eq!(digits_correct(&loaded.net)?, recorded, "{name}");
    }
    Ok(())
}

#[test]
fn saves_write_the_current_version_and_strict_configs() -> Result<()> {
    let dir = temp_dir("ckpt-version")?;
    let (net, _vars) = new_net(small_diag_net_config(), DType::F32)?;
    let path = dir.join("net.safetensors");
    net.save(&path)?;
    let loaded = checkpoint::load(&path, &Device::Cpu, None)?;
    assert_eq!(loaded.format_version, FORMAT_VERSION);
    assert_eq!(FORMAT_VERSION, 3);
    // The same file relabelled version 1 still loads (a v1 reader accepted complete configs).
    let bytes = std::fs::read(&path)?;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n])?;
    let relabelled = header.replace("\"format_version\":\"3\"", "\"format_version\":\"1\"");
    assert_ne!(
        relabelled, header,
        "the header spells the version as expected"
    );
    let mut v1 = (relabelled.len() as u64).to_le_bytes().to_vec();
    v1.extend_from_slice(relabelled.as_bytes());
    v1.extend_from_slice(&bytes[8 + n..]);
    let loaded = checkpoint::load_from_bytes(&v1, "relabelled", &Device::Cpu, None)?;
    assert_eq!(loaded.format_version, 1);
    assert_eq!(loaded.net.config(), net.config());
    // A missing field that no upgrade row provides is an error in both versions.
    for version in ["1", "2", "3"] {
        let edited = header
            .replace(
                "\"format_version\":\"3\"",
                &format!("\"format_version\":\"{version}\""),
            )
            .replace("\\\"gate\\\":true", "\\\"gatex\\\":true");
        assert_ne!(edited, header);
        let mut file = (edited.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(edited.as_bytes());
        file.extend_from_slice(&bytes[8 + n..]);
        match checkpoint::load_from_bytes(&file, "edited", &Device::Cpu, None) {
            Err(GaussError::Checkpoint { reason, .. }) => {
                assert!(
                    reason.contains("unknown field `gatex`"),
                    "v{version}: {reason}"
                )
            }
            other => panic!("v{version}: expected a checkpoint error, got {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
