//! Every damaged checkpoint gives `GaussError::Checkpoint` naming the tensor or field at fault,
//! never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gauss_layer::{GaussError, GaussNet, GaussNetConfig};

use gauss_tests::{new_net, small_diag_net_config, temp_dir};

/// A saved checkpoint: its path, its (name → tensor) map and its metadata.
type Saved = (PathBuf, HashMap<String, Tensor>, HashMap<String, String>);

/// A small saved network.
fn saved(dir: &Path) -> Result<Saved> {
    let config = GaussNetConfig {
        batch_norm: true,
        ..small_diag_net_config()
    };
    let (net, _varmap) = new_net(config, DType::F32)?;
    let path = dir.join("good.safetensors");
    net.save(&path)?;
    let bytes = std::fs::read(&path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    Ok((path, tensors, metadata))
}

fn write(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes = safetensors::tensor::serialize(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        Some(metadata),
    )?;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// Loads `path` and returns the checkpoint error's reason, failing on success or another error.
fn reason(path: &Path, dtype: Option<DType>) -> String {
    match GaussNet::load(path, &Device::Cpu, dtype) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(GaussError::Checkpoint { reason, .. }) => reason,
        Err(other) => panic!("expected a checkpoint error, got {other}"),
    }
}

#[test]
fn damaged_checkpoints_name_what_is_wrong() -> Result<()> {
    let dir = temp_dir("corrupt-cases")?;
    let (good, tensors, metadata) = saved(&dir)?;
    let bytes = std::fs::read(&good)?;
    let victim = "layers.0.center";
    assert!(tensors.contains_key(victim), "test assumes {victim} exists");

    // Missing tensor.
    let mut t = tensors.clone();
    t.remove(victim);
    let p = dir.join("missing.safetensors");
    write(&p, &t, metadata.clone())?;
    let r = reason(&p, None);
    assert!(r.contains(victim) && r.contains("missing"), "{r}");

    // Wrong shape.
    let mut t = tensors.clone();
    t.insert(
        victim.into(),
        Tensor::zeros((4, 5), DType::F32, &Device::Cpu)?,
    );
    let p = dir.join("shape.safetensors");
    write(&p, &t, metadata.clone())?;
    let r = reason(&p, None);
    assert!(r.contains(victim) && r.contains("shape"), "{r}");

    // Wrong dtype: an error without a requested dtype, converted with one.
    let mut t = tensors.clone();
    // f64: checkpoint tests load on Device::Cpu
    t.insert(victim.into(), tensors[victim].to_dtype(DType::F64)?);
    let p = dir.join("dtype.safetensors");
    write(&p, &t, metadata.clone())?;
    let r = reason(&p, None);
    assert!(r.contains(victim) && r.contains("dtype"), "{r}");
    let converted = GaussNet::load(&p, &Device::Cpu, Some(DType::F32))?;
    assert_eq!(converted.layers()[0].center().dtype(), DType::F32);

    // Unexpected extra tensor.
    let mut t = tensors.clone();
    t.insert(
        "layers.9.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu)?,
    );
    let p = dir.join("extra.safetensors");
    write(&p, &t, metadata.clone())?;
    let r = reason(&p, None);
    assert!(
        r.contains("layers.9.weight") && r.contains("unexpected"),
        "{r}"
    );

    // Truncated file: every cut gives an error (header cut, data cut).
    for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.join(format!("truncated-{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut])?;
        let r = reason(&p, None);
        assert!(
            r.contains("safetensors") || r.contains("truncated"),
            "cut at {cut}: {r}"
        );
    }

    // Not a safetensors file at all.
    let p = dir.join("text.safetensors");
    std::fs::write(
        &p,
        b"this is not a checkpoint, just some text that is long enough",
    )?;
    let r = reason(&p, None);
    assert!(r.contains("safetensors"), "{r}");

    // A safetensors file without our metadata.
    let p = dir.join("plain.safetensors");
    write(&p, &tensors, HashMap::new())?;
    let r = reason(&p, None);
    assert!(r.contains("`format`") && r.contains("missing"), "{r}");

    // Unknown format versions (one past u32), a version that is not a number, and spellings
    // of a known version the writer never makes (leading zero, sign, blank).
    for (version, needle) in [
        ("99", "99, this build reads versions 1 to"),
        ("99999999999", "99999999999, this build reads versions 1 to"),
        ("one", "not an integer"),
        ("03", "\"03\", not an integer in canonical decimal"),
        ("+3", "\"+3\", not an integer in canonical decimal"),
        (" 3", "\" 3\", not an integer in canonical decimal"),
        ("", "\"\", not an integer"),
    ] {
        let mut m = metadata.clone();
        m.insert("format_version".into(), version.into());
        let p = dir.join(format!("version-{version}.safetensors"));
        write(&p, &tensors, m)?;
        let r = reason(&p, None);
        assert!(r.contains("format_version") && r.contains(needle), "{r}");
    }

    // Config that does not parse, one that lacks fields (strict), one with an unknown field,
    // and one that parses but is invalid.
    let mut zero_inputs: serde_json::Value = serde_json::from_str(&metadata["config"])?;
    zero_inputs["in_features"] = serde_json::json!(0);
    let mut unknown: serde_json::Value = serde_json::from_str(&metadata["config"])?;
    unknown["layer"]["tanx"] = serde_json::json!(true);
    for (config, needle) in [
        ("{not json".to_string(), "does not parse"),
        (
            r#"{"in_features": 0}"#.to_string(),
            "missing field `hidden`",
        ),
        (unknown.to_string(), "at `layer.tanx`: unknown field `tanx`"),
        (zero_inputs.to_string(), "invalid"),
    ] {
        let mut m = metadata.clone();
        m.insert("config".into(), config);
        let p = dir.join("config.safetensors");
        write(&p, &tensors, m)?;
        let r = reason(&p, None);
        assert!(r.contains("`config`") && r.contains(needle), "{r}");
    }

    // A missing file is an I/O error naming the path.
    match GaussNet::load(dir.join("absent.safetensors"), &Device::Cpu, None) {
        Err(GaussError::Io { path, .. }) => assert!(path.contains("absent")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[cfg(unix)]
#[test]
fn special_files_are_errors_not_hangs() -> Result<()> {
    let dir = temp_dir("ckpt-special")?;
    let r = reason(&dir, None);
    assert!(r.contains("not a regular file"), "{r}");
    // An endless device, and a FIFO without a writer (opening it would block forever).
    let r = reason(Path::new("/dev/zero"), None);
    assert!(r.contains("not a regular file"), "{r}");
    let fifo = dir.join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let r = reason(&fifo, None);
        assert!(r.contains("not a regular file"), "{r}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
