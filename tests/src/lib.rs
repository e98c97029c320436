//! Helpers shared by the workspace's cross-crate tests (`tests/tests/*.rs`, one binary per
//! subject): host matrix math in plain f64 for closed-form expected values, random tensors,
//! temporary directories, small networks, and reading one gradient.
//!
//! Tensor comparisons live in `gauss_layer::testing` (feature `testing`); the conformance
//! runner has its own helpers in `tests/conformance/common.rs`.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::{GaussLayerConfig, GaussNet, GaussNetConfig, Parameterization};

/// A dense matrix on the host, row-major.
pub type Matrix = Vec<Vec<f64>>;

/// `a · b`.
pub fn matmul(a: &Matrix, b: &Matrix) -> Matrix {
    let (n, k, m) = (a.len(), b.len(), b[0].len());
    (0..n)
        .map(|i| {
            (0..m)
                .map(|j| (0..k).map(|l| a[i][l] * b[l][j]).sum())
                .collect()
        })
        .collect()
}

/// `aᵀ`.
pub fn transpose(a: &Matrix) -> Matrix {
    (0..a[0].len())
        .map(|j| a.iter().map(|row| row[j]).collect())
        .collect()
}

/// Gauss-Jordan inverse with partial pivoting, independent of the crates' own inverses; the
/// test matrices are well conditioned.
pub fn inverse(a: &Matrix) -> Matrix {
    let d = a.len();
    let mut aug: Matrix = a
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let mut r = row.clone();
            r.extend((0..d).map(|j| if i == j { 1.0 } else { 0.0 }));
            r
        })
        .collect();
    for col in 0..d {
        let pivot = (col..d)
            .max_by(|&p, &q| aug[p][col].abs().total_cmp(&aug[q][col].abs()))
            .unwrap_or(col);
        aug.swap(col, pivot);
        let p = aug[col][col];
        for v in aug[col].iter_mut() {
            *v /= p;
        }
        let pivot_row = aug[col].clone();
        for (row, values) in aug.iter_mut().enumerate() {
            if row != col {
                let f = values[col];
                for (v, p) in values.iter_mut().zip(&pivot_row) {
                    *v -= f * p;
                }
            }
        }
    }
    aug.into_iter().map(|r| r[d..].to_vec()).collect()
}

/// The lower Cholesky factor `L` of a symmetric positive-definite `a = L Lᵀ`.
pub fn cholesky(a: &Matrix) -> Matrix {
    let d = a.len();
    let mut l = vec![vec![0.0; d]; d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            l[i][j] = if i == j {
                (a[i][i] - s).sqrt()
            } else {
                (a[i][j] - s) / l[j][j]
            };
        }
    }
    l
}

/// `log |a|` of a symmetric positive-definite `a`, through its Cholesky factor.
pub fn log_det_spd(a: &Matrix) -> f64 {
    cholesky(a)
        .iter()
        .enumerate()
        .map(|(i, row)| 2.0 * row[i].ln())
        .sum()
}

/// A host tensor in `dtype` on `device`: cast on the CPU first, then moved (Metal has no f64,
/// so nothing is created or cast in f64 on the device unless `dtype` is f64).
pub fn on_device(tensor: &Tensor, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(tensor
        .to_device(&Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// The elements of any float tensor, row-major, as f64 on the host (moved to the CPU first,
/// then widened there).
pub fn host_values(tensor: &Tensor) -> Result<Vec<f64>> {
    Ok(tensor
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

/// A one-element tensor's value as f64 on the host.
pub fn host_scalar(tensor: &Tensor) -> Result<f64> {
    match host_values(tensor)?.as_slice() {
        [value] => Ok(*value),
        values => anyhow::bail!("expected one element, got {}", values.len()),
    }
}

/// A 2-D tensor as a host [`Matrix`] of f64.
pub fn host_matrix(tensor: &Tensor) -> Result<Matrix> {
    let (rows, cols) = tensor.dims2()?;
    let values = host_values(tensor)?;
    Ok((0..rows)
        .map(|i| values[i * cols..(i + 1) * cols].to_vec())
        .collect())
}

/// Normal f64 samples with mean 0 and standard deviation `std`, on the CPU.
pub fn randn(shape: &[usize], std: f64) -> Result<Tensor> {
    Ok(Tensor::randn(0f64, std, shape, &Device::Cpu)?)
}

/// The gradient of `loss` with respect to `var`, or an error when none reached it.
pub fn gradient_of(loss: &Tensor, var: &Var) -> Result<Tensor> {
    loss.backward()?
        .get(var)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no gradient reached the variable"))
}

/// A fresh directory `gauss-tests-{name}-{pid}-{call}` under the system temporary directory.
pub fn temp_dir(name: &str) -> Result<PathBuf> {
    // Unique per call, so device variants of one test (run in parallel) never share files.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("gauss-tests-{name}-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A network on the CPU in `dtype`, with the `VarMap` holding its variables.
pub fn new_net(config: GaussNetConfig, dtype: DType) -> Result<(GaussNet, VarMap)> {
    let varmap = VarMap::new();
    let net = GaussNet::new(
        config,
        VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu),
    )?;
    Ok((net, varmap))
}

/// A small network config: 3 inputs, one hidden layer of 4 diag neurons, 2 outputs.
pub fn small_diag_net_config() -> GaussNetConfig {
    GaussNetConfig {
        in_features: 3,
        hidden: vec![4],
        out_features: 2,
        layer: GaussLayerConfig::with_parameterization(Parameterization::Diag),
        ..Default::default()
    }
}

/// The time a command-line test lets a binary run before it counts as a hang.
pub const RUN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `bin` with `args` under `ulimit -v 3000000` (through `sh`, on Linux) with no standard
/// input, and kills it after [`RUN_LIMIT`]; returns (success, stdout, stderr). A run past the
/// limit (a hang) or ended by a signal (a panic=abort or an allocation failure) is an error.
pub fn run_limited(bin: &str, args: &[&str]) -> Result<(bool, String, String)> {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut command = if cfg!(target_os = "linux") {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("ulimit -v 3000000 && exec \"$0\" \"$@\"")
            .arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{args:?} ran longer than {RUN_LIMIT:?} (hang?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    if out.status.code().is_none() {
        anyhow::bail!("{args:?} was killed by a signal (abort?): {:?}", out.status);
    }
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}
