//! The JSON line of the built `fit-gaussian`: stdout is that one line and nothing else (the
//! human summary goes to stderr), lowrank's rank is part of `param`, so runs of two ranks
//! stay apart, and a one-Gaussian run says which maximum-likelihood reference it was
//! compared with.

use anyhow::{Context, Result};
use serde_json::Value;

/// The stdout of a successful run, which must be exactly one JSON line, parsed.
fn json_line(args: &[&str]) -> Result<Value> {
    let (ok, stdout, stderr) = gauss_tests::run_limited(env!("CARGO_BIN_EXE_fit-gaussian"), args)?;
    assert!(ok, "{args:?}: {stderr}");
    assert_eq!(stdout.lines().count(), 1, "{args:?}: stdout {stdout}");
    let line = stdout.lines().next().context("no stdout")?;
    Ok(serde_json::from_str(line)?)
}

/// As `fit-gaussian ... | python3 -c 'import json,sys; json.load(sys.stdin)'` reads it: the
/// whole stdout is one JSON document, for a synthetic Gaussian (which also prints the true
/// mean), the bundled data and a save; the human summary is on stderr.
#[test]
fn one_gaussian_stdout_is_one_json_document() -> Result<()> {
    let dir = gauss_tests::temp_dir("one-json")?;
    let out = dir.join("g.safetensors").display().to_string();
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/reference/nll_1.safetensors"
    );
    for args in [
        vec!["--steps", "20"],
        vec![
            "--data", data, "--param", "cholesky", "--steps", "20", "--out", &out,
        ],
    ] {
        let (ok, stdout, stderr) =
            gauss_tests::run_limited(env!("CARGO_BIN_EXE_fit-gaussian"), &args)?;
        assert!(ok, "{args:?}: {stderr}");
        let whole: Value = serde_json::from_str(&stdout)?;
        assert!(whole["nll"].is_number(), "{whole}");
        assert!(stderr.contains("mean NLL:"), "{args:?}: {stderr}");
    }
    assert!(std::fs::metadata(&out)?.is_file());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn lowrank_param_carries_its_rank() -> Result<()> {
    let one = json_line(&["--param", "lowrank", "--rank", "1", "--steps", "20"])?;
    assert_eq!(one["param"], "lowrank:1", "{one}");
    assert_eq!(one["mle_method"], "EM within the family", "{one}");
    let full = json_line(&["--param", "cholesky", "--steps", "20"])?;
    assert_eq!(full["param"], "cholesky", "{full}");
    assert_eq!(full["mle_method"], "closed form", "{full}");
    Ok(())
}

#[test]
fn lowrank_mixture_param_carries_its_rank() -> Result<()> {
    let mixture = json_line(&[
        "--param",
        "lowrank",
        "--rank",
        "2",
        "--components",
        "2",
        "--samples",
        "200",
        "--n-init",
        "1",
    ])?;
    assert_eq!(mixture["param"], "lowrank:2", "{mixture}");
    Ok(())
}

/// A fit that stops before its gradient test is met says so on stderr, in one line with what
/// to try, besides `"converged": false` in the JSON; the exit status stays 0. A converged fit
/// (here: a gradient tolerance met at the first check) has no such line.
#[test]
fn an_unconverged_fit_warns_on_stderr() -> Result<()> {
    let bin = env!("CARGO_BIN_EXE_fit-gaussian");
    let (ok, stdout, stderr) = gauss_tests::run_limited(bin, &["--steps", "20"])?;
    assert!(ok, "{stderr}");
    let json: Value = serde_json::from_str(&stdout)?;
    assert_eq!(json["converged"], false, "{json}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    for needle in [
        "did not converge in 20 steps",
        "raise --steps",
        "standardize the data",
    ] {
        assert!(warnings[0].contains(needle), "{}", warnings[0]);
    }
    let (ok, stdout, stderr) =
        gauss_tests::run_limited(bin, &["--steps", "20", "--grad-tol", "1e9"])?;
    assert!(ok, "{stderr}");
    let json: Value = serde_json::from_str(&stdout)?;
    assert_eq!(json["converged"], true, "{json}");
    assert!(!stderr.contains("warning:"), "{stderr}");
    Ok(())
}
