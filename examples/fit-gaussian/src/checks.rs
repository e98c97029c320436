//! Checks of the command line and of the results: a bad value stops the program before any
//! work with one line naming the option, what came and what would be accepted; sizes that
//! cannot fit are refused before anything is allocated; a result that is not finite is an
//! error, never a JSON `null` with exit status 0.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use gauss_layer::{memory, Parameterization};
use serde_json::Value;

/// The options of one run that must hold before it starts.
pub struct Options {
    pub parameterization: Parameterization,
    pub lr: f64,
    pub grad_tol: f64,
    pub min_eigenvalue: Option<f64>,
    pub refine_lr: f64,
    pub tol: f64,
    pub reg_covar: f64,
}

/// A learning rate of AdamW: finite, > 0 and at most 1 (Adam moves each parameter by about
/// the learning rate per step, so anything larger only diverges).
fn learning_rate(option: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0 && value <= 1.0) {
        bail!("{option} must be a finite number in (0, 1], got {value}");
    }
    Ok(())
}

fn finite_non_negative(option: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value >= 0.0) {
        bail!("{option} must be a finite number >= 0, got {value}");
    }
    Ok(())
}

/// Every check of the options (see the module docs).
pub fn options(o: &Options) -> Result<()> {
    learning_rate("--lr", o.lr)?;
    learning_rate("--refine-lr", o.refine_lr)?;
    finite_non_negative("--grad-tol", o.grad_tol)?;
    // EM stops once the change is below `tol`: 0 could never be met (the library refuses it).
    if !(o.tol.is_finite() && o.tol > 0.0) {
        bail!("--tol must be a finite number > 0, got {}", o.tol);
    }
    finite_non_negative("--reg-covar", o.reg_covar)?;
    if let Some(floor) = o.min_eigenvalue {
        if o.parameterization != Parameterization::Direct {
            bail!(
                "--min-eigenvalue applies only to --param direct (the floor of its repair), got --param {}",
                o.parameterization.name()
            );
        }
        if !(floor.is_finite() && floor > 0.0) {
            bail!("--min-eigenvalue must be a finite number > 0, got {floor}");
        }
    }
    Ok(())
}

/// Refuses `samples` × `dim` (× `components`) whose memory cannot fit: the samples (f64) and
/// the few (N, d) tensors a fit keeps, and a dozen (d, d) matrices per component
/// (covariance, factors, gradients, Adam's moments).
pub fn sizes(samples: usize, dim: usize, components: usize) -> Result<()> {
    let (n, d, k) = (samples as u64, dim as u64, components as u64);
    let estimate = n
        .checked_mul(d)
        .and_then(|nd| nd.checked_mul(8 * 4))
        .and_then(|x| {
            d.checked_mul(d)
                .and_then(|dd| dd.checked_mul(8 * 12))
                .and_then(|m| m.checked_mul(k))
                .and_then(|m| x.checked_add(m))
        })
        .and_then(|b| {
            n.checked_mul(k)
                .and_then(|nk| nk.checked_mul(8 * 4))
                .and_then(|r| b.checked_add(r))
        });
    memory::check_fits(
        &format!("fitting {components} Gaussian(s) to {samples} samples in {dim} dimensions"),
        estimate,
    )?;
    Ok(())
}

/// Checks, before any work, that the directory `out` is saved to accepts new files: the save
/// writes a temporary file there and renames it over `out`, so a read-only directory (or
/// file system) would fail only after the whole fit. Creates and removes an empty probe file;
/// [`gauss_layer::files::check_output`] has already refused a missing directory.
pub fn writable_dir(out: &Path) -> Result<()> {
    // Through a symbolic link the link's target is written.
    let target = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    examples_support::check_dir_writable(&dir, &format!("--out {}", out.display()))
}

/// The path (`covariance[1][2]`) of the first `null` in `value`: serde_json writes a
/// non-finite number as `null`.
fn first_null(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::Null => Some(path.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| first_null(v, &format!("{path}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            let child = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            first_null(v, &child)
        }),
        _ => None,
    }
}

/// Every number of the summary is finite; otherwise the fit failed numerically.
pub fn finite_summary(summary: &Value) -> Result<()> {
    if let Some(field) = first_null(summary, "") {
        bail!(
            "numerical failure: the fit's `{field}` is not finite (NaN or infinite); nothing is reported (check the data's scale and the learning rates)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Options {
        Options {
            parameterization: Parameterization::Cholesky,
            lr: 0.05,
            grad_tol: 1e-7,
            min_eigenvalue: None,
            refine_lr: 1e-3,
            tol: 1e-6,
            reg_covar: 1e-6,
        }
    }

    #[test]
    fn nonsense_options_are_refused_naming_the_option() {
        options(&base()).unwrap();
        for lr in [f64::NAN, f64::INFINITY, -1.0, 0.0, 1e30] {
            let e = options(&Options { lr, ..base() }).unwrap_err().to_string();
            assert!(e.contains("--lr"), "{e}");
            let e = options(&Options {
                refine_lr: lr,
                ..base()
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("--refine-lr"), "{e}");
        }
        for grad_tol in [f64::NAN, -1.0] {
            let e = options(&Options { grad_tol, ..base() })
                .unwrap_err()
                .to_string();
            assert!(e.contains("--grad-tol"), "{e}");
        }
        for tol in [f64::NAN, -1.0, 0.0] {
            let e = options(&Options { tol, ..base() }).unwrap_err().to_string();
            assert!(e.contains("--tol must be a finite number > 0"), "{e}");
        }
        // Ignored for cholesky: refused rather than silently dropped.
        let e = options(&Options {
            min_eigenvalue: Some(0.1),
            ..base()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--param direct"), "{e}");
        let direct = |floor| Options {
            parameterization: Parameterization::Direct,
            min_eigenvalue: Some(floor),
            ..base()
        };
        assert!(options(&direct(-1.0)).is_err());
        options(&direct(0.1)).unwrap();
    }

    #[test]
    fn sizes_that_overflow_or_cannot_fit_are_refused() {
        sizes(1000, 3, 1).unwrap();
        for (n, d) in [
            (4611686018427387905usize, 4611686018427387904usize),
            (100_001, 100_000),
            (1_000_000_000_000, 3),
        ] {
            let e = sizes(n, d, 1).unwrap_err().to_string();
            assert!(e.contains("overflows") || e.contains("needs about"), "{e}");
        }
        // N·d·32 and K·d²·96 fit in u64 but the (N, K) term N·K·32 does not.
        let e = sizes(1 << 58, 1, 4).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
    }

    #[test]
    fn an_output_directory_is_probed_and_left_as_it_was() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("fit-gaussian-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        writable_dir(&dir.join("g.safetensors"))?;
        assert_eq!(
            std::fs::read_dir(&dir)?.count(),
            0,
            "the probe was left behind"
        );
        std::fs::remove_dir_all(&dir)?;
        // procfs takes no new files, even from root (a read-only directory does not stop root).
        #[cfg(target_os = "linux")]
        {
            let e = writable_dir(Path::new("/proc/g.safetensors"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--out /proc/g.safetensors: cannot create files"),
                "{e}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_null_in_the_summary_is_an_error_naming_it() {
        let ok = serde_json::json!({"mean": [1.0, 2.0], "nll": 0.5});
        finite_summary(&ok).unwrap();
        let bad = serde_json::json!({"mean": [1.0, f64::NAN], "nll": 0.5});
        let e = finite_summary(&bad).unwrap_err().to_string();
        assert!(e.contains("mean[1]"), "{e}");
    }
}
