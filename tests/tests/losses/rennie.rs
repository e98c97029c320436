//! The covariance-factor NLL's autograd gradients equal J. Rennie's closed forms
//! (docs/design.md §2; "Gradient Calculations for the Mean, Covariance Matrix Parameterization of the
//! Multivariate Normal", eqs. 7, 9, 14) on random data:
//! `dJ/dμ = −Σ_a S⁻¹(x_a − μ)`, `dJ/dΛ = n S⁻¹Λ − S⁻¹RᵀRS⁻¹Λ`, `J = Σ_a nll(x_a)`,
//! `R` the centered data. The expected values are computed on the host in plain f64 with a
//! Gauss-Jordan inverse, independently of the crate's triangular inverse, from the values
//! the device holds (so f32 runs compare f32 arithmetic with exact closed forms of the same
//! rounded inputs). Every test runs on each enabled device, in each float dtype it has.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gauss_layer::testing::{float_dtypes, tolerance};
use gauss_losses::{nll_covariance_factor, nll_precision_factor, Reduction};
use rand::{Rng, SeedableRng};

use gauss_tests::{
    cholesky, host_matrix, host_values, inverse, matmul, on_device, transpose, Matrix,
};

fn assert_close(got: &Matrix, expected: &Matrix, tol: f64, what: &str) {
    let scale = expected
        .iter()
        .flatten()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-300);
    for (i, (g, e)) in got
        .iter()
        .flatten()
        .zip(expected.iter().flatten())
        .enumerate()
    {
        assert!(
            (g - e).abs() <= tol * scale,
            "{what}[{i}]: got {g}, expected {e}"
        );
    }
}

/// (x (n, d), mean (d), Λ (d, d) lower triangular) in `dtype` on `device`.
fn random_case(
    seed: u64,
    n: usize,
    d: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let x: Vec<f64> = (0..n * d).map(|_| rng.random_range(-2.0..2.0)).collect();
    let mean: Vec<f64> = (0..d).map(|_| rng.random_range(-0.5..0.5)).collect();
    let mut lam = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            lam[i * d + j] = if i == j {
                rng.random_range(0.5..1.5)
            } else {
                rng.random_range(-0.5..0.5)
            };
        }
    }
    let dev = Device::Cpu;
    Ok((
        on_device(&Tensor::from_vec(x, (n, d), &dev)?, dtype, device)?,
        on_device(&Tensor::from_vec(mean, d, &dev)?, dtype, device)?,
        on_device(&Tensor::from_vec(lam, (d, d), &dev)?, dtype, device)?,
    ))
}

gauss_layer::test_device_dtypes!(
    covariance_factor_gradients_match_rennie_closed_forms,
    rennie_gradients
);

fn rennie_gradients(dtype: DType, device: &Device) -> Result<()> {
    let tol = tolerance(dtype);
    for (seed, n, d) in [(1u64, 40usize, 3usize), (2, 25, 5), (3, 60, 7)] {
        let (x, mean, lam) = random_case(seed, n, d, dtype, device)?;
        let mean_var = Var::from_tensor(&mean)?;
        let lam_var = Var::from_tensor(&lam)?;
        let loss = nll_covariance_factor(&x, &mean_var, &lam_var, Reduction::Sum)?;
        let grads = loss.backward()?;
        let grad_mean = grads.get(&mean_var).expect("mean has a gradient");
        let grad_lam = grads.get(&lam_var).expect("scale_tril has a gradient");

        let lam_m = host_matrix(&lam)?;
        let s_inv = inverse(&matmul(&lam_m, &transpose(&lam_m)));
        // Centered on the host in f64, from the values the device holds.
        let (x_m, mean_v) = (host_matrix(&x)?, host_values(&mean)?);
        let centered: Matrix = x_m
            .iter()
            .map(|row| row.iter().zip(&mean_v).map(|(v, m)| v - m).collect())
            .collect();
        // dJ/dμ = −S⁻¹ Σ_a (x_a − μ)
        let col_sum: Matrix = (0..d)
            .map(|j| vec![centered.iter().map(|r| r[j]).sum::<f64>()])
            .collect();
        let expected_mean: Vec<f64> = matmul(&s_inv, &col_sum).iter().map(|r| -r[0]).collect();
        let what = format!("{dtype:?} (n, d) = ({n}, {d})");
        assert_close(
            &vec![host_values(grad_mean)?],
            &vec![expected_mean],
            tol,
            &format!("{what} dJ/dmu"),
        );
        // dJ/dΛ = n S⁻¹Λ − S⁻¹RᵀRS⁻¹Λ; autograd sees only the lower triangle of Λ.
        let s_inv_lam = matmul(&s_inv, &lam_m);
        let scatter = matmul(&transpose(&centered), &centered);
        let second = matmul(&matmul(&s_inv, &scatter), &s_inv_lam);
        let expected_lam: Matrix = (0..d)
            .map(|i| {
                (0..d)
                    .map(|j| {
                        if j <= i {
                            n as f64 * s_inv_lam[i][j] - second[i][j]
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        assert_close(
            &host_matrix(grad_lam)?,
            &expected_lam,
            tol,
            &format!("{what} dJ/dLambda"),
        );
    }
    Ok(())
}

/// The two parameterizations describe the same Gaussian when `L = chol(S⁻¹)`; here `S⁻¹`
/// and its factor are built on the host, so both NLLs must agree to rounding.
fn covariance_and_precision_factor_nll_agree(device: &Device) -> Result<()> {
    for dtype in float_dtypes(device) {
        let (x, mean, lam) = random_case(7, 30, 4, dtype, device)?;
        let lam_m = host_matrix(&lam)?;
        let p = inverse(&matmul(&lam_m, &transpose(&lam_m)));
        let tril = on_device(&Tensor::new(cholesky(&p), &Device::Cpu)?, dtype, device)?;
        let by_cov = host_values(&nll_covariance_factor(&x, &mean, &lam, Reduction::None)?)?;
        let by_prec = host_values(&nll_precision_factor(&x, &mean, &tril, Reduction::None)?)?;
        for (a, b) in by_cov.iter().zip(&by_prec) {
            assert!(
                (a - b).abs() <= tolerance(dtype) * b.abs().max(1.0),
                "{dtype:?}: {a} vs {b}"
            );
        }
    }
    Ok(())
}
gauss_layer::test_device!(covariance_and_precision_factor_nll_agree);
