//! A new user's first mistakes, through the built binary: each ends at once in one line that
//! names the option at fault in the command line's own terms, before any training, saving or
//! evaluation.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use gauss_tests::temp_dir;

mod common;
use common::{run, run_ok};

/// A command that must fail with exactly one line on stderr, nothing on stdout, no panic.
fn run_err(args: &[&str]) -> Result<String> {
    let (ok, stdout, stderr) = run(args)?;
    if ok {
        bail!("{args:?} should have failed: {stdout}");
    }
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected, got {stderr}");
    assert!(stdout.is_empty(), "{args:?} printed {stdout}");
    Ok(lines[0].to_string())
}

/// The two `t10k` IDX files of `n` `height × width` images in `dir` (labels 0).
fn write_test_split(dir: &Path, n: u32, height: u32, width: u32) -> Result<()> {
    let idx = |magic: u32, dims: &[u32], items: Vec<u8>| -> Vec<u8> {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend(items);
        out
    };
    let pixels = vec![128u8; (n * height * width) as usize];
    std::fs::write(
        dir.join("t10k-images-idx3-ubyte"),
        idx(2051, &[n, height, width], pixels),
    )?;
    std::fs::write(
        dir.join("t10k-labels-idx1-ubyte"),
        idx(2049, &[n], vec![0; n as usize]),
    )?;
    Ok(())
}

/// `train --ood` and `eval --ood` sets are checked before any work: a directory without the
/// IDX test files, or of images of another size than the training data's, ends the command
/// with one line naming `--ood`, and `train` writes no checkpoint (it trained, saved, then
/// failed without its JSON).
#[test]
fn a_bad_ood_set_is_refused_before_training_or_saving() -> Result<()> {
    let dir = temp_dir("new-user-ood")?;
    let (empty, wide) = (dir.join("empty"), dir.join("wide"));
    std::fs::create_dir_all(&empty)?;
    std::fs::create_dir_all(&wide)?;
    write_test_split(&wide, 3, 28, 28)?;
    let out = dir.join("net.safetensors");
    let out_arg = out.display().to_string();
    let (empty, wide) = (empty.display().to_string(), wide.display().to_string());
    let line = run_err(&["train", "--fgn-only", "--out", &out_arg, "--ood", &empty])?;
    assert!(
        line.contains("--ood") && line.contains("no IDX file `t10k-images-idx3-ubyte`"),
        "{line}"
    );
    let line = run_err(&["train", "--fgn-only", "--out", &out_arg, "--ood", &wide])?;
    assert!(
        line.contains("--ood") && line.contains("28×28 (784 pixels)") && line.contains("64"),
        "{line}"
    );
    assert!(!out.exists(), "train saved a checkpoint");
    // eval: the same, before evaluating (a saved 64-input checkpoint).
    run_ok(&["train", "--fgn-only", "--epochs", "1", "--out", &out_arg])?;
    let line = run_err(&["eval", &out_arg, "--ood", "noise", "--ood", &wide])?;
    assert!(
        line.contains("--ood") && line.contains("784 pixels"),
        "{line}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `predict` decides `x`'s scale as `eval --data` decides its images': integer `x` is
/// divided by the recorded `input_scale`, float `x` of a checkpoint trained on scaled pixels
/// is refused without `--input-scale` (digits already in [0, 1] were divided by 16 again:
/// 48% accuracy, silently), and `--input-scale 1` on them gives what the integer pixels give.
#[test]
fn predict_asks_for_the_scale_of_float_inputs() -> Result<()> {
    let dir = temp_dir("new-user-predict")?;
    let config = gauss_layer::GaussNetConfig {
        in_features: 64,
        hidden: vec![4],
        out_features: 10,
        ..Default::default()
    };
    let (net, _vars) = gauss_tests::new_net(config, DType::F32)?;
    let ckpt = dir.join("trained.safetensors");
    let meta = BTreeMap::from([("input_scale".to_string(), "16".to_string())]);
    gauss_layer::checkpoint::save_with_metadata(&net, &ckpt, &meta)?;
    let ckpt = ckpt.display().to_string();
    let pixels: Vec<u8> = (0..3 * 64).map(|i| (i * 7 % 17) as u8).collect();
    let raw = Tensor::from_vec(pixels, (3, 64), &Device::Cpu)?;
    let input = |name: &str, x: Tensor| -> Result<String> {
        let path = dir.join(format!("{name}.safetensors"));
        candle_core::safetensors::save(&HashMap::from([("x".to_string(), x)]), &path)?;
        Ok(path.display().to_string())
    };
    let integers = input("u8", raw.clone())?;
    let unit = input("unit", (raw.to_dtype(DType::F32)? / 16.0)?)?;
    let output = |name: &str| dir.join(name).display().to_string();
    let (by_integers, by_unit) = (output("u8-out.safetensors"), output("unit-out.safetensors"));

    let line = run_err(&["predict", &ckpt, "--input", &unit, "--output", &by_unit])?;
    assert!(
        line.contains("floats") && line.contains("--input-scale 1") && line.contains("16"),
        "{line}"
    );
    let json = run_ok(&[
        "predict",
        &ckpt,
        "--input",
        &integers,
        "--output",
        &by_integers,
    ])?;
    assert_eq!(json["input_scale"], 16.0);
    let json = run_ok(&[
        "predict",
        &ckpt,
        "--input",
        &unit,
        "--output",
        &by_unit,
        "--input-scale",
        "1",
    ])?;
    assert_eq!(json["input_scale"], 1.0);
    let read = |path: &str| -> Result<Vec<Vec<f32>>> {
        Ok(candle_core::safetensors::load(path, &Device::Cpu)?["output"].to_vec2::<f32>()?)
    };
    assert_eq!(read(&by_integers)?, read(&by_unit)?);
    let line = run_err(&[
        "predict",
        &ckpt,
        "--input",
        &unit,
        "--output",
        &by_unit,
        "--input-scale",
        "0",
    ])?;
    assert!(line.contains("--input-scale must be"), "{line}");
    // --help says how `x` is scaled.
    let (_, help, _) = run(&["predict", "--help"])?;
    assert!(
        help.contains("input_scale") && help.contains("--input-scale"),
        "{help}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `--rank 0` is refused as `--rank` (not as a `lowrank:0` the user never wrote), and
/// `--param lowrank:R` trains as `--param lowrank --rank R` does.
#[test]
fn lowrank_is_set_by_either_form_and_refused_in_the_options_terms() -> Result<()> {
    let dir = temp_dir("new-user-rank")?;
    let line = run_err(&["train", "--param", "lowrank", "--rank", "0"])?;
    assert_eq!(line, "error: --rank must be >= 1, got 0");
    let line = run_err(&["train", "--param", "lowrank:2", "--rank", "3"])?;
    assert!(
        line.contains("--param lowrank:2") && line.contains("--rank 3"),
        "{line}"
    );
    let mut reports = Vec::new();
    for (name, form) in [
        ("named", &["--param", "lowrank:2"][..]),
        ("ranked", &["--param", "lowrank", "--rank", "2"][..]),
    ] {
        let out = dir
            .join(format!("{name}.safetensors"))
            .display()
            .to_string();
        let base = [
            "train",
            "--fgn-only",
            "--epochs",
            "1",
            "--hidden",
            "4",
            "--out",
            &out,
        ];
        reports.push(run_ok(&[&base[..], form].concat())?);
    }
    assert_eq!(reports[0]["test_accuracy"], reports[1]["test_accuracy"]);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// An `--init-factor` whose initial precision overflows (or underflows, or leaves what a
/// checkpoint holds) is named as `--init-factor`, not as a `precision_scale` of `inf`.
#[test]
fn convert_names_the_init_factor_whose_precision_overflows() -> Result<()> {
    let dir = temp_dir("new-user-convert")?;
    let classic = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/interop/classic.safetensors")
        .display()
        .to_string();
    let out = dir.join("c.safetensors").display().to_string();
    for (factor, needle) in [
        ("1e-300", "overflows to inf"),
        ("1e300", "underflows to 0"),
        ("1e-100", "too large"),
        ("1e160", "too small"),
        ("0", "--init-factor must be a finite number > 0"),
    ] {
        let given = format!("--init-factor={factor}");
        let line = run_err(&[
            "convert", &classic, "--covar", "diag", &given, "--out", &out,
        ])?;
        assert!(
            line.contains("--init-factor")
                && line.contains(needle)
                && !line.contains("precision_scale"),
            "{factor}: {line}"
        );
    }
    assert!(!Path::new(&out).exists());
    run_ok(&[
        "convert",
        &classic,
        "--covar",
        "diag",
        "--init-factor",
        "1e-10",
        "--out",
        &out,
    ])?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `eval CKPT --mnist DIR` on images of another width says so of `--mnist`, not "pass --data
/// or --mnist".
#[test]
fn eval_width_hint_fits_the_option_given() -> Result<()> {
    let dir = temp_dir("new-user-width")?;
    write_test_split(&dir, 3, 28, 28)?;
    let ckpt = dir.join("digits.safetensors").display().to_string();
    run_ok(&[
        "train",
        "--fgn-only",
        "--epochs",
        "1",
        "--hidden",
        "4",
        "--out",
        &ckpt,
    ])?;
    let data = dir.display().to_string();
    let line = run_err(&["eval", &ckpt, "--mnist", &data])?;
    assert!(
        line.contains("have 784 pixels") && line.contains("leave out --mnist"),
        "{line}"
    );
    assert!(!line.contains("pass --data or --mnist"), "{line}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
