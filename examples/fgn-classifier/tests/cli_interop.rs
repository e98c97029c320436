//! The `import`, `convert` and `predict` subcommands end to end, on the fixtures of the original
//! PyTorch FGN code in `tests/data/interop/` (see its FORMAT.md): every manifest case imported
//! and run through the built binary reproduces the original's `out` and `g{i}` to 1e-9
//! relative in f64 and 1e-5 in f32 (max |ours − theirs| / max |theirs|); the conversion
//! reproduces the original's `convert_classic_to_fgn` to 1e-6; bad input gets a one-line
//! error and a non-zero exit.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use gauss_layer::testing::relative_error;

const TOL_F64: f64 = 1e-9;
const TOL_F32: f64 = 1e-5;
const TOL_CONVERT: f64 = 1e-6;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/interop")
}

/// A fresh directory under the system temporary directory, unique per call.
fn temp_dir(name: &str) -> Result<PathBuf> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fgn-cli-{name}-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn run(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_fgn-classifier"))
        .args(args)
        .output()?)
}

/// Runs a command that must succeed and print one JSON line; returns it.
fn run_ok(args: &[&str]) -> Result<serde_json::Value> {
    let out = run(args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let lines: Vec<&str> = stdout.lines().collect();
    if lines.len() != 1 {
        bail!("{args:?}: expected one line on stdout, got {lines:?}");
    }
    Ok(serde_json::from_str(lines[0])?)
}

/// Runs a command that must fail with a one-line error; returns the line.
fn run_err(args: &[&str]) -> Result<String> {
    let out = run(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status.success() || out.status.code().is_none() {
        bail!(
            "{args:?} should have failed cleanly: {:?} {stderr}",
            out.status
        );
    }
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: one-line error expected, got {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{args:?} printed to stdout on failure"
    );
    Ok(lines[0].to_string())
}

struct Case {
    name: String,
    kind: String,
    covar: String,
    non_lin: bool,
    free_biases: bool,
}

fn manifest() -> Result<Vec<Case>> {
    let text = std::fs::read_to_string(data_dir().join("manifest.txt"))?;
    let mut cases = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        cases.push(match f.len() {
            5 => Case {
                name: f[0].into(),
                kind: f[1].into(),
                covar: f[2].into(),
                non_lin: f[3] == "1",
                free_biases: f[4] == "1",
            },
            // Conversion cases list `name covar`; the original's converted net has non_lin
            // (the classical net's tanh) and free biases (see tests/tests/interop/fixtures.rs).
            2 => Case {
                name: f[0].into(),
                kind: "conv".into(),
                covar: f[1].into(),
                non_lin: true,
                free_biases: true,
            },
            _ => bail!("manifest line {line:?}"),
        });
    }
    Ok(cases)
}

fn reference(case: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        data_dir().join(case).join("ref.safetensors"),
        &Device::Cpu,
    )?)
}

/// Writes `x` of the reference in `suffix` (f64/f32) to a file for predict.
fn write_input(dir: &Path, r: &HashMap<String, Tensor>, suffix: &str) -> Result<PathBuf> {
    let path = dir.join(format!("x_{suffix}.safetensors"));
    let x = r.get(&format!("x_{suffix}")).context("x")?.clone();
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), x)]), &path)?;
    Ok(path)
}

/// Runs predict in `suffix` and returns the relative errors of out, g0, g1, ….
fn predict_errors(
    dir: &Path,
    checkpoint: &Path,
    r: &HashMap<String, Tensor>,
    suffix: &str,
) -> Result<Vec<f64>> {
    let input = write_input(dir, r, suffix)?;
    let output = dir.join(format!("y_{suffix}.safetensors"));
    let json = run_ok(&[
        "predict",
        &checkpoint.display().to_string(),
        "--input",
        &input.display().to_string(),
        "--output",
        &output.display().to_string(),
        "--dtype",
        suffix,
    ])?;
    assert_eq!(json["dtype"], suffix);
    let y = candle_core::safetensors::load(&output, &Device::Cpu)?;
    let dtype = if suffix == "f64" {
        DType::F64
    } else {
        DType::F32
    };
    // f64: the CLI tests read the binary's outputs on the CPU.
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64);
    let out = y.get("output").context("output")?;
    assert_eq!(out.dtype(), dtype);
    let want = r.get(&format!("out_{suffix}")).context("out")?;
    let mut errs = vec![relative_error(&f64_of(out)?, &f64_of(want)?)?];
    for i in 0.. {
        let Some(want) = r.get(&format!("g{i}_{suffix}")) else {
            break;
        };
        let g = y
            .get(&format!("g{i}"))
            .with_context(|| format!("g{i} missing"))?;
        errs.push(relative_error(&f64_of(g)?, &f64_of(want)?)?);
    }
    assert_eq!(
        y.len(),
        errs.len(),
        "output holds `output` and one g per layer"
    );
    Ok(errs)
}

fn show(errs: &[f64]) -> Vec<String> {
    errs.iter().map(|e| format!("{e:.1e}")).collect()
}

#[test]
fn every_manifest_case_reproduces_the_original_through_the_cli() -> Result<()> {
    let mut failures = Vec::new();
    for case in manifest()? {
        if case.name.contains("ordinal") {
            continue; // an L1 layer: refused, see the next test
        }
        let dir = temp_dir(&case.name)?;
        let checkpoint = dir.join("fgn.safetensors");
        let model = data_dir().join(&case.name).join("model.safetensors");
        let (model, checkpoint_s) = (
            model.display().to_string(),
            checkpoint.display().to_string(),
        );
        let mut args = vec![
            "import",
            &model,
            "--covar",
            &case.covar,
            "--out",
            &checkpoint_s,
        ];
        if case.non_lin {
            args.push("--non-lin");
        }
        if !case.free_biases {
            args.push("--tied-biases");
        }
        let json = run_ok(&args)?;
        let kind = if case.kind == "layer" { "layer" } else { "net" };
        assert_eq!(json["kind"], kind, "{}", case.name);
        assert_eq!(json["covar_type"], case.covar.as_str());
        let r = reference(&case.name)?;
        for (suffix, tol) in [("f64", TOL_F64), ("f32", TOL_F32)] {
            let errs = predict_errors(&dir, &checkpoint, &r, suffix)?;
            eprintln!("{} {suffix}: out, g… {:?}", case.name, show(&errs));
            if errs.iter().any(|e| e.is_nan() || *e > tol) {
                failures.push(format!(
                    "{} {suffix}: {:?} > {tol:e}",
                    case.name,
                    show(&errs)
                ));
            }
        }
        std::fs::remove_dir_all(&dir)?;
    }
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

#[test]
fn convert_reproduces_the_originals_conversion_through_the_cli() -> Result<()> {
    let dir = temp_dir("convert")?;
    let checkpoint = dir.join("converted.safetensors");
    let classic = data_dir().join("classic.safetensors");
    let json = run_ok(&[
        "convert",
        &classic.display().to_string(),
        "--covar",
        "diag",
        "--out",
        &checkpoint.display().to_string(),
    ])?;
    // σ = 1/(10·Z) per layer (Z = 32, 10), P = 2σ².
    let scales = json["precision_scales"].as_array().context("scales")?;
    for (s, z) in scales.iter().zip([32.0, 10.0]) {
        let expected = 2.0 / (10.0f64 * z).powi(2);
        let got = s.as_f64().context("number")?;
        assert!(
            ((got - expected) / expected).abs() < 1e-12,
            "{got} vs {expected}"
        );
    }
    let r = reference("conv_diag")?;
    for (suffix, tol) in [("f64", TOL_CONVERT), ("f32", TOL_F32)] {
        let errs = predict_errors(&dir, &checkpoint, &r, suffix)?;
        eprintln!("conv_diag convert {suffix}: out, g… {:?}", show(&errs));
        assert!(errs.iter().all(|e| *e < tol), "{suffix}: {:?}", show(&errs));
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn bad_input_gets_a_one_line_error() -> Result<()> {
    let dir = temp_dir("errors")?;
    let out = dir.join("never.safetensors").display().to_string();
    let data = data_dir();
    let path = |p: &str| data.join(p).display().to_string();

    // An L1 model (ordinal 1) is refused.
    let line = run_err(&[
        "import",
        &path("layer_sphere_ordinal1/model.safetensors"),
        "--covar",
        "sphere",
        "--ordinal",
        "1",
        "--out",
        &out,
    ])?;
    assert!(line.contains("ordinal"), "{line}");
    // A torch.save pickle: the message says how to save safetensors.
    for command in ["import", "convert"] {
        let line = run_err(&[
            command,
            &path("classic_state_dict.pth"),
            "--covar",
            "diag",
            "--out",
            &out,
        ])?;
        assert!(
            line.contains("torch.save") && line.contains("save_file"),
            "{line}"
        );
    }
    // A chol file read as full.
    let line = run_err(&[
        "import",
        &path("net_chol_nonlin/model.safetensors"),
        "--covar",
        "full",
        "--out",
        &out,
    ])?;
    assert!(line.contains("chol"), "{line}");
    // A full file read as chol.
    let line = run_err(&[
        "import",
        &path("net_full_tied/model.safetensors"),
        "--covar",
        "chol",
        "--out",
        &out,
    ])?;
    assert!(line.contains("full"), "{line}");
    // A classical net given to import, an FGN net given to convert.
    let line = run_err(&[
        "import",
        &path("classic.safetensors"),
        "--covar",
        "diag",
        "--out",
        &out,
    ])?;
    assert!(line.contains("convert"), "{line}");
    let line = run_err(&[
        "convert",
        &path("net_diag_base/model.safetensors"),
        "--covar",
        "diag",
        "--out",
        &out,
    ])?;
    assert!(line.contains("import"), "{line}");
    // An output directory that does not exist, refused before any work.
    let line = run_err(&[
        "import",
        &path("net_diag_base/model.safetensors"),
        "--covar",
        "diag",
        "--out",
        "/nonexistent-dir-of-fgn-tests/x.safetensors",
    ])?;
    assert!(line.contains("does not exist"), "{line}");
    // A missing file.
    let line = run_err(&[
        "import",
        &path("nope.safetensors"),
        "--covar",
        "diag",
        "--out",
        &out,
    ])?;
    assert!(line.contains("nope.safetensors"), "{line}");
    assert!(!Path::new(&out).exists(), "nothing is written on failure");

    // predict: an input without `x`, of the wrong width, with a NaN.
    let checkpoint = dir.join("layer.safetensors");
    run_ok(&[
        "import",
        &path("layer_diag_nonlin/model.safetensors"),
        "--covar",
        "diag",
        "--non-lin",
        "--out",
        &checkpoint.display().to_string(),
    ])?;
    let bad_inputs: [(&str, Tensor); 3] = [
        ("images", Tensor::zeros((2, 64), DType::F32, &Device::Cpu)?),
        ("x", Tensor::zeros((2, 63), DType::F32, &Device::Cpu)?),
        ("x", Tensor::new(&[[f32::NAN; 64]], &Device::Cpu)?),
    ];
    for (i, (name, tensor)) in bad_inputs.into_iter().enumerate() {
        let input = dir.join(format!("bad{i}.safetensors"));
        candle_core::safetensors::save(&HashMap::from([(name.to_string(), tensor)]), &input)?;
        let line = run_err(&[
            "predict",
            &checkpoint.display().to_string(),
            "--input",
            &input.display().to_string(),
            "--output",
            &out,
        ])?;
        assert!(line.contains(&format!("bad{i}.safetensors")), "{line}");
    }
    assert!(!Path::new(&out).exists());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn predict_applies_the_input_scale_a_trained_checkpoint_records() -> Result<()> {
    // A checkpoint as `train` writes it: pixels divided by `input_scale` before the network.
    let dir = temp_dir("scale")?;
    let tensors = gauss_layer::import::load_state_dict(
        data_dir().join("layer_diag_nonlin/model.safetensors"),
        &Device::Cpu,
        DType::F64,
    )?;
    let options = gauss_layer::import::FgnImportOptions {
        non_lin: true,
        ..Default::default()
    };
    let (net, _) = gauss_layer::import::fgn_model_from_tensors(
        &tensors,
        &gauss_layer::import::FgnNetLayout::default(),
        &options,
    )?;
    let checkpoint = dir.join("trained.safetensors");
    let meta = BTreeMap::from([("input_scale".to_string(), "16".to_string())]);
    gauss_layer::checkpoint::save_with_metadata(&net, &checkpoint, &meta)?;
    // Integer pixels 0..16, as the digits come.
    let pixels: Vec<u8> = (0..3 * 64).map(|i| (i * 7 % 17) as u8).collect();
    let x = Tensor::from_vec(pixels, (3, 64), &Device::Cpu)?;
    let input = dir.join("x.safetensors");
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), x.clone())]), &input)?;
    let output = dir.join("y.safetensors");
    let json = run_ok(&[
        "predict",
        &checkpoint.display().to_string(),
        "--input",
        &input.display().to_string(),
        "--output",
        &output.display().to_string(),
    ])?;
    assert_eq!(json["input_scale"], 16.0);
    assert_eq!(json["rows"], 3);
    let y = candle_core::safetensors::load(&output, &Device::Cpu)?;
    // f64: the CLI tests read the binary's outputs on the CPU.
    let expected = net.forward(&(x.to_dtype(DType::F64)? / 16.0)?, false)?;
    let err = relative_error(y.get("output").context("output")?, &expected)?;
    assert!(err < 1e-12, "{err:e}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `import` writes f64 checkpoints; `eval` runs one on the f32 digits in its own dtype (it
/// refused: "input x: expected dtype F64"), with and without an input batch norm.
#[test]
fn eval_runs_an_f64_checkpoint() -> Result<()> {
    use gauss_layer::{GaussLayerConfig, GaussNetConfig, Parameterization};
    let dir = temp_dir("eval-f64")?;
    for input_batch_norm in [false, true] {
        let config = GaussNetConfig {
            in_features: 64,
            hidden: vec![4],
            out_features: 10,
            layer: GaussLayerConfig::with_parameterization(Parameterization::Diag),
            input_batch_norm,
            ..Default::default()
        };
        let (net, _vars) = gauss_tests::new_net(config, DType::F64)?;
        let path = dir.join(format!("f64-{input_batch_norm}.safetensors"));
        net.save(&path)?;
        let json = run_ok(&["eval", &path.display().to_string()])?;
        assert_eq!(json["test_total"], 360, "{json}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `eval` without `--data` feeds the bundled digits at the scale the checkpoint records: an
/// imported network records 1 (raw pixels 0..16), and was evaluated on the digits divided by
/// 16 (accuracy 0.089 where the same images through `--data` gave 0.6). Both ways agree now.
#[test]
fn eval_on_the_bundled_digits_uses_the_recorded_input_scale() -> Result<()> {
    let dir = temp_dir("eval-recorded-scale")?;
    let checkpoint = dir.join("imported.safetensors");
    let model = data_dir().join("net_diag_base/model.safetensors");
    run_ok(&[
        "import",
        &model.display().to_string(),
        "--covar",
        "diag",
        "--out",
        &checkpoint.display().to_string(),
    ])?;
    // The bundled test split as a data file of integer pixels.
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let digits =
        candle_core::safetensors::load(repo.join("data/digits.safetensors"), &Device::Cpu)?;
    let data = dir.join("digits-test.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([
            ("images".to_string(), digits["test_images"].clone()),
            ("labels".to_string(), digits["test_labels"].clone()),
        ]),
        &data,
    )?;
    let bundled = run_ok(&["eval", &checkpoint.display().to_string()])?;
    let from_file = run_ok(&[
        "eval",
        &checkpoint.display().to_string(),
        "--data",
        &data.display().to_string(),
    ])?;
    assert_eq!(bundled["test_total"], 360, "{bundled}");
    assert_eq!(
        bundled["test_accuracy"], from_file["test_accuracy"],
        "bundled {bundled}\nfile {from_file}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
