//! Issue 17 ("Hardening II") through the built `fit-gaussian`: nonsense options, hostile
//! files, sizes that cannot fit and degenerate data all end in one line on stderr within
//! 10 s under a 3 GB address-space limit, never in `null` fields with exit status 0; a failed
//! save leaves no temporary file.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use gauss_tests::temp_dir;

/// Runs the binary under the shared limits (`gauss_tests::run_limited`).
fn run(args: &[&str]) -> Result<(bool, String, String)> {
    gauss_tests::run_limited(env!("CARGO_BIN_EXE_fit-gaussian"), args)
}

fn run_err(args: &[&str]) -> Result<String> {
    let (ok, stdout, stderr) = run(args)?;
    if ok {
        bail!("{args:?} should have failed, printed {stdout}");
    }
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected, got {stderr}");
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    Ok(lines[0].to_string())
}

fn save_x(dir: &Path, name: &str, rows: Vec<[f64; 3]>) -> Result<String> {
    let n = rows.len();
    let flat: Vec<f64> = rows.into_iter().flatten().collect();
    let path = dir.join(format!("{name}.safetensors"));
    let x = Tensor::from_vec(flat, (n, 3), &Device::Cpu)?;
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), x)]), &path)?;
    Ok(path.display().to_string())
}

#[test]
fn nonsense_options_and_sizes_get_one_line() -> Result<()> {
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--lr", "nan"], "--lr"),
        (vec!["--lr", "inf"], "--lr"),
        (vec!["--lr=-1"], "--lr"),
        (vec!["--lr", "0"], "--lr"),
        (vec!["--lr", "1e30"], "--lr"),
        (vec!["--grad-tol", "nan"], "--grad-tol"),
        (vec!["--grad-tol=-1"], "--grad-tol"),
        (vec!["--min-eigenvalue=-1"], "--min-eigenvalue"),
        (vec!["--param", "lowrank", "--rank", "100"], "rank"),
        (
            vec!["--components", "2", "--refine-lr", "1e30"],
            "--refine-lr",
        ),
        (
            vec![
                "--dim",
                "4611686018427387904",
                "--samples",
                "4611686018427387905",
            ],
            "overflows",
        ),
        (
            vec!["--dim", "100000", "--samples", "100001"],
            "needs about",
        ),
        (vec!["--samples", "1000000000000"], "needs about"),
        (
            vec![
                "--samples",
                "288230376151711744",
                "--dim",
                "1",
                "--components",
                "4",
            ],
            "overflows",
        ),
    ];
    for (args, needle) in cases {
        let line = run_err(&args)?;
        assert!(line.contains(needle), "{args:?}: {line}");
    }
    Ok(())
}

/// A negative number after an option is its value: `--reg-covar -1` met clap's "unexpected
/// argument '-1' found" (only `--reg-covar=-1` reached the program's check); now both
/// spellings get the check that names the option and what it takes, and an integer option
/// gets clap's message naming it.
#[test]
fn negative_values_reach_the_option_checks() -> Result<()> {
    let cases: [(&[&str], &str); 8] = [
        (
            &["--lr", "-inf"],
            "--lr must be a finite number in (0, 1], got -inf",
        ),
        (
            &["--reg-covar", "-1"],
            "--reg-covar must be a finite number >= 0, got -1",
        ),
        (
            &["--lr", "-1"],
            "--lr must be a finite number in (0, 1], got -1",
        ),
        (
            &["--grad-tol", "-1"],
            "--grad-tol must be a finite number >= 0, got -1",
        ),
        (
            &["--tol", "-1e-3"],
            "--tol must be a finite number > 0, got -0.001",
        ),
        (
            &["--refine-lr", "-1"],
            "--refine-lr must be a finite number in (0, 1], got -1",
        ),
        (
            &["--param", "direct", "--min-eigenvalue", "-1"],
            "--min-eigenvalue must be a finite number > 0, got -1",
        ),
        (
            &["--components", "2", "--reg-covar", "-0.5"],
            "--reg-covar must be a finite number >= 0, got -0.5",
        ),
    ];
    for (args, needle) in cases {
        let line = run_err(args)?;
        assert!(line.contains(needle), "{args:?}: {line}");
        let joined = format!("{}={}", args[args.len() - 2], args[args.len() - 1]);
        let mut equals: Vec<&str> = args[..args.len() - 2].to_vec();
        equals.push(&joined);
        let line = run_err(&equals)?;
        assert!(line.contains(needle), "{equals:?}: {line}");
    }
    for option in ["--seed", "--steps", "--dim"] {
        let (ok, _, stderr) = run(&[option, "-1"])?;
        assert!(!ok, "{option} -1 was accepted");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("error: invalid value '-1' for '{option} ")),
            "{option}: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn hostile_files_and_degenerate_data_get_one_line() -> Result<()> {
    let dir = temp_dir("data")?;
    let pipe = dir.join("pipe");
    if Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .is_ok_and(|s| s.success())
    {
        let line = run_err(&["--data", &pipe.display().to_string()])?;
        assert!(line.contains("FIFO"), "{line}");
    }
    let line = run_err(&["--data", &dir.display().to_string()])?;
    assert!(line.contains("a directory"), "{line}");
    let identical = save_x(&dir, "identical", vec![[1.0, 2.0, 3.0]; 10])?;
    let collinear = save_x(
        &dir,
        "collinear",
        (0..10)
            .map(|i| [i as f64, 2.0 * i as f64, -(i as f64)])
            .collect(),
    )?;
    let constant = save_x(
        &dir,
        "constant",
        (0..10).map(|i| [i as f64, (i * i) as f64, 5.0]).collect(),
    )?;
    let huge = save_x(
        &dir,
        "huge",
        (0..10)
            .map(|i| [1e200 * i as f64, -1e200, 1e200 * ((i * i) % 7) as f64])
            .collect(),
    )?;
    for (data, params) in [
        (&identical, &["cholesky", "diag", "sphere", "lowrank"][..]),
        (&collinear, &["cholesky", "expm", "lowrank"][..]),
        (&constant, &["cholesky", "diag", "lowrank"][..]),
        (&huge, &["cholesky", "diag", "lowrank"][..]),
    ] {
        for param in params {
            let mut args = vec!["--data", data, "--param", param, "--steps", "20"];
            if *param == "lowrank" {
                args.extend(["--rank", "1"]);
            }
            let line = run_err(&args)?;
            assert!(
                line.contains("singular or not finite"),
                "{data} {param}: {line}"
            );
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_mixture_saved_over_a_directory_fails_first_and_leaves_nothing() -> Result<()> {
    let dir = temp_dir("mixture-out")?;
    let target = dir.join("existing-dir");
    std::fs::create_dir(&target)?;
    let target = target.display().to_string();
    let line = run_err(&["--components", "2", "--samples", "200", "--out", &target])?;
    assert!(line.contains("a directory"), "{line}");
    let names: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["existing-dir".to_string()]);
    // The valid run writes its file, and its JSON line has no null.
    let out = dir.join("mix.safetensors").display().to_string();
    let (ok, stdout, stderr) = run(&[
        "--components",
        "2",
        "--samples",
        "200",
        "--n-init",
        "1",
        "--out",
        &out,
    ])?;
    assert!(ok, "{stderr}");
    assert!(!stdout.contains("null"), "{stdout}");
    let saved = candle_core::safetensors::load(&out, &Device::Cpu)?;
    assert!(saved.contains_key("mixture_logits"), "{:?}", saved.keys());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// An output directory that takes no new files is refused before the fit, not after it: a
/// directory without write permission (not for root, whom permissions do not stop) and, on
/// Linux, procfs (which refuses root too).
#[test]
fn an_unwritable_output_directory_is_refused_before_fitting() -> Result<()> {
    let mut outs = Vec::new();
    let dir = temp_dir("read-only-out")?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555))?;
        if std::fs::File::create(dir.join("probe")).is_err() {
            outs.push(dir.join("g.safetensors").display().to_string());
        }
    }
    if cfg!(target_os = "linux") {
        outs.push("/proc/g.safetensors".to_string());
    }
    for out in &outs {
        for extra in [&[][..], &["--components", "2", "--samples", "200"][..]] {
            let mut args = vec!["--out", out.as_str()];
            args.extend(extra);
            let line = run_err(&args)?;
            assert!(
                line.contains("cannot create files in the directory"),
                "{line}"
            );
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
