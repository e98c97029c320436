//! The JSON line of the built `fit-gaussian`: lowrank's rank is part of `param`, so runs of
//! two ranks stay apart, and a one-Gaussian run says which maximum-likelihood reference it
//! was compared with.

use anyhow::{Context, Result};
use serde_json::Value;

/// The last stdout line of a successful run, parsed.
fn json_line(args: &[&str]) -> Result<Value> {
    let (ok, stdout, stderr) = gauss_tests::run_limited(env!("CARGO_BIN_EXE_fit-gaussian"), args)?;
    assert!(ok, "{args:?}: {stderr}");
    let line = stdout.lines().last().context("no stdout")?;
    Ok(serde_json::from_str(line)?)
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
