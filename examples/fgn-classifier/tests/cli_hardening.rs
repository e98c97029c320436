//! Issue 17 ("Hardening II") through the built binary: every hostile input ends in a clean
//! one-line error within 10 s under a 3 GB address-space limit (`ulimit -v 3000000`, where
//! the shell has it), no input or device node is replaced, values that overflow are refused
//! instead of becoming NaN, and the next command removes a killed writer's temporary file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use gauss_tests::temp_dir;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/interop")
        .join(name)
        .join("model.safetensors")
        .display()
        .to_string()
}

/// Runs the binary under the shared limits (`gauss_tests::run_limited`).
fn run(args: &[&str]) -> Result<(bool, String, String)> {
    gauss_tests::run_limited(env!("CARGO_BIN_EXE_fgn-classifier"), args)
}

/// A command that must fail with exactly one line on stderr, nothing on stdout, no panic.
fn run_err(args: &[&str]) -> Result<String> {
    let (ok, stdout, stderr) = run(args)?;
    if ok {
        bail!("{args:?} should have failed: {stdout}");
    }
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: one-line error expected, got {stderr}"
    );
    assert!(stdout.is_empty(), "{args:?} printed {stdout}");
    Ok(lines[0].to_string())
}

fn run_ok(args: &[&str]) -> Result<serde_json::Value> {
    let (ok, stdout, stderr) = run(args)?;
    if !ok {
        bail!("{args:?} failed: {stderr}");
    }
    Ok(serde_json::from_str(stdout.lines().last().unwrap_or(""))?)
}

fn mkfifo(path: &Path) -> bool {
    Command::new("mkfifo")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// An imported 64-input checkpoint in `dtype` (`f32` or `f64`).
fn checkpoint(dir: &Path, dtype: &str) -> Result<String> {
    let out = dir
        .join(format!("net-{dtype}.safetensors"))
        .display()
        .to_string();
    run_ok(&[
        "import",
        &fixture("layer_diag_nonlin"),
        "--covar",
        "diag",
        "--non-lin",
        "--dtype",
        dtype,
        "--out",
        &out,
    ])?;
    Ok(out)
}

fn save(path: &Path, tensors: Vec<(&str, Tensor)>) -> Result<String> {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    candle_core::safetensors::save(&map, path)?;
    Ok(path.display().to_string())
}

#[test]
fn fifo_inputs_are_refused_without_hanging() -> Result<()> {
    let dir = temp_dir("fifo")?;
    let pipe = dir.join("pipe");
    if !mkfifo(&pipe) {
        return Ok(());
    }
    let pipe = pipe.display().to_string();
    let ckpt = checkpoint(&dir, "f64")?;
    let out = dir.join("o.safetensors").display().to_string();
    let cases: [Vec<&str>; 5] = [
        vec!["eval", &ckpt, "--data", &pipe, "--input-scale", "1"],
        vec!["predict", &ckpt, "--input", &pipe, "--output", &out],
        vec!["import", &pipe, "--covar", "diag", "--out", &out],
        vec!["convert", &pipe, "--covar", "diag", "--out", &out],
        vec!["eval", &pipe],
    ];
    for args in cases {
        let line = run_err(&args)?;
        assert!(
            line.contains("FIFO") && line.contains("pipe"),
            "{args:?}: {line}"
        );
    }
    assert!(!Path::new(&out).exists());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn outputs_never_replace_devices_fifos_or_inputs() -> Result<()> {
    let dir = temp_dir("outputs")?;
    // A device: refused before training (as root, /dev/null would have been replaced).
    let line = run_err(&["train", "--epochs", "1", "--out", "/dev/null"])?;
    assert!(line.contains("a device"), "{line}");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata("/dev/null")?.file_type().is_char_device());
    let pipe = dir.join("out-pipe");
    if mkfifo(&pipe) {
        let line = run_err(&[
            "train",
            "--epochs",
            "1",
            "--out",
            &pipe.display().to_string(),
        ])?;
        assert!(line.contains("FIFO"), "{line}");
        assert!(std::fs::symlink_metadata(&pipe)?.file_type().is_fifo());
    }
    // A directory path (a new one, ending in a separator): refused before training, naming it.
    let newdir = format!("{}/ckpts/", dir.display());
    let line = run_err(&["train", "--epochs", "1", "--out", &newdir])?;
    assert!(
        line.contains(&newdir) && line.contains("does not name a file"),
        "{line}"
    );
    // predict --output equal to the checkpoint or the input (also spelled differently).
    let ckpt = checkpoint(&dir, "f64")?;
    let before = std::fs::read(&ckpt)?;
    let x = save(
        &dir.join("x.safetensors"),
        vec![("x", Tensor::zeros((2, 64), DType::F32, &Device::Cpu)?)],
    )?;
    let dotted = dir
        .join(".")
        .join("net-f64.safetensors")
        .display()
        .to_string();
    for output in [&ckpt, &dotted, &x] {
        let line = run_err(&["predict", &ckpt, "--input", &x, "--output", output])?;
        assert!(line.contains("refusing to overwrite an input"), "{line}");
    }
    let line = run_err(&["import", &ckpt, "--covar", "diag", "--out", &ckpt])?;
    assert!(line.contains("refusing to overwrite an input"), "{line}");
    assert_eq!(std::fs::read(&ckpt)?, before, "the checkpoint is intact");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn sizes_that_cannot_fit_end_at_once_with_one_line() -> Result<()> {
    let cases: [&[&str]; 5] = [
        &[
            "train",
            "--fgn-only",
            "--epochs",
            "1",
            "--hidden",
            "4611686018427387904",
        ],
        &["train", "--epochs", "1", "--hidden", "1000000000"],
        &["train", "--epochs", "1", "--hidden", "1099511627776"],
        &[
            "train", "--epochs", "1", "--hidden", "300000", "--param", "cholesky",
        ],
        &[
            "train", "--epochs", "1", "--param", "lowrank", "--rank", "1000",
        ],
    ];
    for args in cases {
        let mut args = args.to_vec();
        let dir = temp_dir("sizes")?;
        let out = dir.join("n.safetensors").display().to_string();
        args.extend(["--out", &out]);
        let line = run_err(&args)?;
        assert!(
            line.contains("overflow") || line.contains("needs about") || line.contains("rank <="),
            "{args:?}: {line}"
        );
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

#[test]
fn values_that_overflow_after_scaling_or_casting_are_refused() -> Result<()> {
    let dir = temp_dir("overflow")?;
    let ckpt32 = checkpoint(&dir, "f32")?;
    let out = dir.join("y.safetensors").display().to_string();
    // predict: f64 x of 1e300 into an f32 checkpoint.
    let mut big = vec![0.5f64; 64];
    big[3] = 1e300;
    let x = save(
        &dir.join("big.safetensors"),
        vec![("x", Tensor::from_vec(big, (1, 64), &Device::Cpu)?)],
    )?;
    let line = run_err(&["predict", &ckpt32, "--input", &x, "--output", &out])?;
    assert!(
        line.contains("overflows F32") && line.contains("column 3"),
        "{line}"
    );
    // eval: u8 images divided by 1e-300; f64 images of 1e300.
    let labels = Tensor::new(&[0u8], &Device::Cpu)?;
    let u8_images = save(
        &dir.join("u8.safetensors"),
        vec![
            ("images", Tensor::ones((1, 64), DType::U8, &Device::Cpu)?),
            ("labels", labels.clone()),
        ],
    )?;
    let line = run_err(&[
        "eval",
        &ckpt32,
        "--data",
        &u8_images,
        "--input-scale",
        "1e-300",
    ])?;
    assert!(line.contains("after scaling"), "{line}");
    let f64_images = save(
        &dir.join("f64.safetensors"),
        vec![
            ("images", Tensor::full(1e300f64, (1, 64), &Device::Cpu)?),
            ("labels", labels),
        ],
    )?;
    let line = run_err(&["eval", &ckpt32, "--data", &f64_images, "--input-scale", "1"])?;
    assert!(line.contains("overflows F32"), "{line}");
    // A checkpoint whose metadata records input_scale = 1e-40: eval and predict refuse the
    // scaled values instead of running on ∞.
    let loaded = gauss_layer::checkpoint::load(&ckpt32, &Device::Cpu, None)?;
    let tiny = dir.join("tiny-scale.safetensors");
    let meta = BTreeMap::from([("input_scale".to_string(), "1e-40".to_string())]);
    gauss_layer::checkpoint::save_with_metadata(&loaded.net, &tiny, &meta)?;
    let tiny = tiny.display().to_string();
    let line = run_err(&["eval", &tiny, "--data", &u8_images])?;
    assert!(line.contains("after scaling"), "{line}");
    // Integer `x`, which predict divides by the recorded scale (float `x` would need
    // --input-scale with a scale other than 1).
    let u8_ones = save(
        &dir.join("u8-ones.safetensors"),
        vec![("x", Tensor::ones((1, 64), DType::U8, &Device::Cpu)?)],
    )?;
    let line = run_err(&["predict", &tiny, "--input", &u8_ones, "--output", &out])?;
    assert!(line.contains("after scaling"), "{line}");
    let ones = save(
        &dir.join("ones.safetensors"),
        vec![("x", Tensor::ones((1, 64), DType::F32, &Device::Cpu)?)],
    )?;
    let line = run_err(&[
        "predict",
        &tiny,
        "--input",
        &ones,
        "--output",
        &out,
        "--input-scale",
        "1e-40",
    ])?;
    assert!(line.contains("after scaling"), "{line}");
    // The valid run of the same input: finite outputs.
    let json = run_ok(&["predict", &ckpt32, "--input", &ones, "--output", &out])?;
    assert_eq!(json["rows"], 1);
    let y = candle_core::safetensors::load(&out, &Device::Cpu)?;
    let values = y["output"].flatten_all()?.to_vec1::<f32>()?;
    assert!(values.iter().all(|v| v.is_finite()), "{values:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn an_extreme_finite_precision_is_refused_at_load() -> Result<()> {
    let dir = temp_dir("extreme")?;
    let ckpt = checkpoint(&dir, "f32")?;
    let mut loaded = gauss_layer::checkpoint::load(&ckpt, &Device::Cpu, None)?;
    let name = "layers.0.precision_log_diag";
    let raw = loaded.varmap.data().lock().unwrap()[name]
        .as_tensor()
        .clone();
    let mut values = raw.flatten_all()?.to_vec1::<f32>()?;
    values[0] = 1e38;
    loaded
        .varmap
        .set_one(name, Tensor::from_vec(values, raw.dims(), &Device::Cpu)?)?;
    let edited = dir.join("edited.safetensors");
    gauss_layer::checkpoint::save(&loaded.net, &edited)?;
    let edited = edited.display().to_string();
    let x = save(
        &dir.join("x.safetensors"),
        vec![("x", Tensor::ones((1, 64), DType::F32, &Device::Cpu)?)],
    )?;
    let out = dir.join("y.safetensors").display().to_string();
    for args in [
        vec!["predict", &edited, "--input", &x, "--output", &out],
        vec!["eval", &edited],
    ] {
        let line = run_err(&args)?;
        assert!(
            line.contains("precision_log_diag") && line.contains("[0, 0]"),
            "{line}"
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn the_next_write_removes_a_killed_writers_temporary_file() -> Result<()> {
    let dir = temp_dir("debris")?;
    let ckpt = checkpoint(&dir, "f64")?;
    let x = save(
        &dir.join("x.safetensors"),
        vec![("x", Tensor::zeros((2, 64), DType::F32, &Device::Cpu)?)],
    )?;
    // What a predict killed mid-write leaves: the atomic write's pattern, a pid not running,
    // unmodified for longer than the staleness age.
    let debris = dir.join(".y.safetensors.gauss-tmp.4294967290.0.7");
    std::fs::write(&debris, vec![0u8; 4096])?;
    std::fs::File::options()
        .write(true)
        .open(&debris)?
        .set_modified(
            std::time::SystemTime::now()
                - gauss_layer::checkpoint::STALE_TEMP_AGE
                - std::time::Duration::from_secs(60),
        )?;
    // The same, freshly written: possibly a save in progress in another PID namespace or on
    // another host (its pid means nothing here), so it is kept.
    let fresh = dir.join(".y.safetensors.gauss-tmp.4294967290.0.8");
    std::fs::write(&fresh, vec![0u8; 4096])?;
    let out = dir.join("y.safetensors").display().to_string();
    run_ok(&["predict", &ckpt, "--input", &x, "--output", &out])?;
    assert!(!debris.exists(), "debris left");
    assert!(fresh.exists(), "a fresh temporary file was removed");
    std::fs::remove_file(&fresh)?;
    let names: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A standard output that cannot be written (a full disk here; a closed pipe alike) ends in
/// the one-line error and exit status 1: `println!` panicked with exit status 101.
#[cfg(target_os = "linux")]
#[test]
fn an_unwritable_stdout_is_a_one_line_error() -> Result<()> {
    let dir = temp_dir("stdout-full")?;
    let checkpoint = dir.join("imported.safetensors");
    let checkpoint = checkpoint.display().to_string();
    run_ok(&[
        "import",
        &fixture("net_diag_base"),
        "--covar",
        "diag",
        "--out",
        &checkpoint,
    ])?;
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full")?;
    let output = Command::new(env!("CARGO_BIN_EXE_fgn-classifier"))
        .args(["eval", &checkpoint])
        .stdout(full)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.starts_with("error: cannot write to standard output") && stderr.lines().count() == 1,
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
