//! Matrix exponential of batches of symmetric matrices in tensor ops (shift, scaling and
//! squaring with a Paterson–Stockmeyer Taylor polynomial): differentiable on every device.

use candle_core::{DType, Tensor};

use super::{eye_like, matmul, read_scalar, square_dim, sum_accumulated, trace, unit_roundoff};
use crate::error::{GaussError, Result};

/// Largest norm of the scaled argument of the Taylor polynomial in [`expm_symmetric`]:
/// keeps the cancellation between alternating terms (a factor of at most `e^{2θ}`) small.
const EXPM_MAX_SCALED_NORM: f64 = 1.0;

/// The smallest Taylor degree m whose truncation error for `‖X‖ ≤ norm`, relative to
/// `‖expm(X)‖ ≥ e^{−norm}`, is below `tolerance`: the tail `Σ_{k>m} normᵏ/k!` is at most
/// `norm^{m+1}/(m+1)! · e^{norm}`.
fn taylor_degree(norm: f64, tolerance: f64) -> usize {
    let mut term = 1.0; // norm^k / k!
    let mut degree = 0;
    while degree < 40 {
        term *= norm / (degree + 1) as f64;
        if term * (2.0 * norm).exp() < tolerance {
            break;
        }
        degree += 1;
    }
    degree.max(1)
}

/// Matmuls of the Paterson–Stockmeyer evaluation of a degree-m polynomial with block size q.
fn paterson_stockmeyer_cost(degree: usize, block: usize) -> usize {
    (block - 1) + (degree + 1).div_ceil(block) - 1
}

/// `Σ_{k≤m} Xᵏ/k!` by Paterson–Stockmeyer: the powers `X, …, X^q` once, then Horner in `X^q`
/// over blocks of q terms (about 2√m matmuls instead of m).
fn taylor_polynomial(x: &Tensor, degree: usize, eye: &Tensor) -> Result<Tensor> {
    let block = (1..=degree + 1)
        .min_by_key(|&q| paterson_stockmeyer_cost(degree, q))
        .unwrap_or(1);
    let mut powers = vec![x.clone()]; // powers[i] = X^{i+1}
    for _ in 1..block {
        let next = matmul(powers.last().unwrap_or(x), x)?;
        powers.push(next);
    }
    let mut coefficients = vec![1.0f64];
    for k in 1..=degree {
        coefficients.push(coefficients[k - 1] / k as f64);
    }
    // B_j = Σ_{i<q} c_{jq+i} X^i (X^0 = I; the last block may be shorter).
    let block_sum = |j: usize| -> Result<Tensor> {
        let mut acc = (eye * coefficients[j * block])?.broadcast_as(x.shape())?;
        for i in 1..block.min(degree + 1 - j * block) {
            acc = (acc + (&powers[i - 1] * coefficients[j * block + i])?)?;
        }
        Ok(acc)
    };
    let blocks = (degree + 1).div_ceil(block);
    let mut acc = block_sum(blocks - 1)?;
    if blocks > 1 {
        let power_q = &powers[block - 1];
        for j in (0..blocks - 1).rev() {
            acc = (matmul(&acc, power_q)? + block_sum(j)?)?;
        }
    }
    Ok(acc)
}

/// Matrix exponential of a batch of symmetric matrices (shift, scaling and squaring with a
/// Taylor polynomial, matmuls only): differentiable on every device.
///
/// `expm(A) = e^μ expm(A − μI)` with `μ = tr(A)/d` (exact: `μI` commutes with `A`) removes
/// the multiple of the identity that dominates typical precisions. The number of squarings
/// `s` is the fewest with `‖A − μI‖_F/2ˢ ≤ 1`, read from the largest Frobenius norm in the
/// batch (one device read, in the working dtype); the Taylor degree is the smallest whose truncation
/// error is below the dtype's unit roundoff, evaluated by Paterson–Stockmeyer. Accurate to
/// about 1e-13 relative in f64 for moderate norms.
///
/// # Shapes
/// `symmetric`: (Z, d, d) → (Z, d, d)
///
/// # Errors
/// A non-finite input, or a result that overflows the dtype
/// ([`GaussError::Numerical`], naming the neuron).
pub fn expm_symmetric(symmetric: &Tensor) -> Result<Tensor> {
    if !crate::route::host_reads_are_free(symmetric.device()) {
        return expm_without_reads(symmetric);
    }
    let what = "expm_symmetric: symmetric";
    let (mut acc, squarings, shift, may_overflow) = scaled_expm(symmetric, what)?;
    for _ in 0..squarings {
        acc = matmul(&acc, &acc)?;
    }
    let result = acc.broadcast_mul(&shift.exp()?)?;
    if may_overflow {
        check_finite(&result, symmetric, what)?;
    }
    Ok(result)
}

/// `tr expm(A)` of a batch of symmetric matrices, as [`expm_symmetric`] but with the last
/// squaring replaced by `tr(E²) = ‖E‖²_F` (E symmetric): one matmul fewer.
///
/// # Shapes
/// `symmetric`: (Z, d, d) → (Z)
///
/// # Errors
/// As [`expm_symmetric`].
pub fn trace_expm_symmetric(symmetric: &Tensor) -> Result<Tensor> {
    if !crate::route::host_reads_are_free(symmetric.device()) {
        return trace(&expm_without_reads(symmetric)?);
    }
    let what = "trace_expm_symmetric: symmetric";
    let (mut acc, squarings, shift, may_overflow) = scaled_expm(symmetric, what)?;
    let trace = if squarings == 0 {
        trace(&acc)?
    } else {
        for _ in 1..squarings {
            acc = matmul(&acc, &acc)?;
        }
        sum_accumulated(&acc.sqr()?, (1, 2))?
    };
    let result = (trace * shift.flatten_all()?.exp()?)?;
    if may_overflow {
        check_finite(&result, symmetric, what)?;
    }
    Ok(result)
}

/// [`expm_symmetric`] without reading anything back from the device (what GPUs run: a read
/// would stall the device once per call, four times per expm layer and training step).
///
/// Each neuron gets its own number of squarings `s_z = ⌈log₂ ‖A_z − μ_z I‖_F⌉` (clamped at 0),
/// computed on the device; the Taylor degree is the one for a scaled norm of 1, and the loop
/// runs a fixed `s_max` squarings, each applied only to the neurons that need it (a mask), so
/// the work is known without looking at the data. `s_max` covers every matrix whose
/// exponential the dtype can hold (Frobenius norm up to `√d · ln(max value)`); a neuron beyond
/// it, or with non-finite input, comes out NaN (there is no read to raise an error with: the
/// training loop's periodic finiteness check reports it), and an overflowing exponential comes
/// out infinite rather than as the CPU's error.
///
/// # Shapes
/// `symmetric`: (Z, d, d) → (Z, d, d)
///
/// # Errors
/// Shapes the operation cannot take.
pub(crate) fn expm_without_reads(symmetric: &Tensor) -> Result<Tensor> {
    let what = "expm_symmetric: symmetric";
    let d = square_dim(symmetric, what, Some(3))?;
    let z = symmetric.dim(0)?;
    let dtype = symmetric.dtype();
    let eye = eye_like(d, symmetric)?;
    let shift = (trace(symmetric)? / d as f64)?.reshape((z, 1, 1))?;
    let centered = symmetric.broadcast_sub(&eye.broadcast_mul(&shift)?)?;
    let norms = centered.sqr()?.sum_keepdim((1, 2))?.sqrt()?; // (Z, 1, 1)
    let max_squarings = ((d as f64).sqrt() * expm_overflow_limit(dtype) / EXPM_MAX_SCALED_NORM)
        .log2()
        .ceil()
        .max(0.0) as usize;
    // s_z = clamp(⌈log₂(max(‖·‖, 1))⌉, 0, s_max), as a float tensor.
    let squarings = (norms.maximum(EXPM_MAX_SCALED_NORM)? / EXPM_MAX_SCALED_NORM)?
        .log()?
        .affine(1.0 / std::f64::consts::LN_2, 0.0)?
        .ceil()?
        .clamp(0.0, max_squarings as f64)?;
    let scaled =
        centered.broadcast_mul(&(squarings.affine(-std::f64::consts::LN_2, 0.0)?.exp()?))?;
    let degree = taylor_degree(EXPM_MAX_SCALED_NORM, unit_roundoff(dtype));
    let mut acc = taylor_polynomial(&scaled, degree, &eye)?;
    for step in 0..max_squarings {
        let needed = squarings
            .gt(step as f64)?
            .broadcast_as(acc.shape())?
            .contiguous()?;
        acc = needed.where_cond(&matmul(&acc, &acc)?, &acc)?;
    }
    let result = acc.broadcast_mul(&shift.exp()?)?;
    // Out of range (or NaN: NaN compares false) → NaN, never a silently wrong matrix.
    let in_range = norms
        .le(2f64.powi(max_squarings as i32) * EXPM_MAX_SCALED_NORM)?
        .broadcast_as(result.shape())?
        .contiguous()?;
    let nan = (result.zeros_like()? + f64::NAN)?;
    Ok(in_range.where_cond(&result, &nan)?)
}

/// Largest eigenvalue whose exponential the dtype holds: `ln(max finite value)`.
pub(crate) fn expm_overflow_limit(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MAX.ln(),
        DType::F32 => (f32::MAX as f64).ln(),
        DType::F16 => 65504f64.ln(),
        _ => 3.38e38f64.ln(),
    }
}

/// `(expm((A − μI)/2ˢ), s, μ)` with μ = tr(A)/d of shape (Z, 1, 1): see [`expm_symmetric`].
///
/// One device read: the largest `‖A − μI‖_F` and the largest `μ + ‖A − μI‖_F` (an upper
/// bound of the largest eigenvalue), both in the working dtype. When that bound says the
/// exponential could overflow, the caller checks the result ([`check_finite`]).
fn scaled_expm(symmetric: &Tensor, what: &str) -> Result<(Tensor, i32, Tensor, bool)> {
    let d = square_dim(symmetric, what, Some(3))?;
    let z = symmetric.dim(0)?;
    let eye = eye_like(d, symmetric)?;
    let shift = (trace(symmetric)? / d as f64)?.reshape((z, 1, 1))?;
    let centered = symmetric.broadcast_sub(&eye.broadcast_mul(&shift)?)?;
    let norms = centered.sqr()?.sum((1, 2))?.sqrt()?; // (Z)
    let bounds = (&norms + shift.flatten_all()?)?;
    let both = Tensor::stack(&[norms.max(0)?, bounds.max(0)?], 0)?;
    let norm = read_scalar(&both.get(0)?)?;
    let eigenvalue_bound = read_scalar(&both.get(1)?)?;
    if !norm.is_finite() || !eigenvalue_bound.is_finite() {
        return Err(GaussError::Numerical {
            what: what.to_string(),
            reason: format!(
                "the matrices must be finite, got Frobenius norm {norm} (a raw precision parameter is NaN or infinite)"
            ),
        });
    }
    let squarings = if norm > EXPM_MAX_SCALED_NORM {
        (norm / EXPM_MAX_SCALED_NORM).log2().ceil() as i32
    } else {
        0
    };
    let scale = 2f64.powi(squarings);
    let degree = taylor_degree(norm / scale, unit_roundoff(symmetric.dtype()));
    let acc = taylor_polynomial(&(centered / scale)?, degree, &eye)?;
    let may_overflow = eigenvalue_bound > expm_overflow_limit(symmetric.dtype());
    Ok((acc, squarings, shift, may_overflow))
}

/// Errors when `result` holds a non-finite value: the exponential overflowed the dtype.
fn check_finite(result: &Tensor, symmetric: &Tensor, what: &str) -> Result<()> {
    let total = read_scalar(&result.abs()?.sum_all()?)?;
    if total.is_finite() {
        return Ok(());
    }
    // Name the first neuron whose exponential (or its trace) is not finite, with its
    // largest diagonal entry (a lower bound of λ_max). The largest diagonal entry alone
    // does not find it: off-diagonal entries raise λ_max too.
    let per_neuron = if result.rank() == 1 {
        result.clone()
    } else {
        result.abs()?.flatten_from(1)?.sum(1)?
    };
    let per_neuron = per_neuron
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let worst = per_neuron.iter().position(|v| !v.is_finite()).unwrap_or(0);
    let value = super::diagonal(&symmetric.get(worst)?.unsqueeze(0)?)?
        .max_all()?
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Err(GaussError::Numerical {
        what: what.to_string(),
        reason: format!(
            "the exponential overflows {:?} (largest eigenvalue above {:.1}) for neuron {worst} (its largest diagonal entry is {value:e}); keep the raw expm parameter smaller or use f64",
            symmetric.dtype(),
            expm_overflow_limit(symmetric.dtype())
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{diag_embed, host, symmetrize, tril};
    use super::*;
    use crate::testing::max_abs;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_abs(&(a - b).unwrap()).unwrap()
    }

    fn noise(z: usize, d: usize, seed: u64) -> Tensor {
        let mut state = seed;
        let values: Vec<f64> = (0..z * d * d)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect();
        tril(&Tensor::from_vec(values, (z, d, d), &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn expm_of_diagonal_is_elementwise_exp() {
        // Closed form: expm(diag(a)) = diag(exp(a)), for norms that need squarings.
        let a = Tensor::new(&[[-3.0f64, 0.5, 2.0, 7.0]], &Device::Cpu).unwrap();
        let e = expm_symmetric(&diag_embed(&a).unwrap()).unwrap();
        let expected = diag_embed(&a.exp().unwrap()).unwrap();
        let rel = max_abs_diff(&e, &expected) / 7f64.exp();
        assert!(rel < 1e-12, "relative error {rel}");
    }

    #[test]
    fn expm_of_rotation_generator_and_symmetric_2x2() {
        // Closed form for the symmetric [[a, b], [b, a]]: eigenvalues a ± b with
        // eigenvectors (1, ±1)/√2, so expm = e^a [[cosh b, sinh b], [sinh b, cosh b]].
        let (a, b) = (0.3f64, 2.5f64);
        let m = Tensor::new(&[[[a, b], [b, a]]], &Device::Cpu).unwrap();
        let e = expm_symmetric(&m).unwrap().to_vec3::<f64>().unwrap();
        let expected = [
            [a.exp() * b.cosh(), a.exp() * b.sinh()],
            [a.exp() * b.sinh(), a.exp() * b.cosh()],
        ];
        for i in 0..2 {
            for j in 0..2 {
                let rel = (e[0][i][j] - expected[i][j]).abs() / expected[i][j].abs();
                assert!(rel < 1e-12, "relative error {rel}");
            }
        }
    }

    #[test]
    fn expm_matches_the_eigendecomposition() {
        // Reference: U diag(exp λ) Uᵀ from faer's symmetric eigendecomposition, for
        // matrices with a large identity part (the shift) and norms needing squarings.
        let d = 9;
        let noise = noise(2, d, 31);
        let eye = Tensor::eye(d, DType::F64, &Device::Cpu).unwrap();
        for (scale, shift) in [(0.1, -4.0), (1.5, 2.0), (6.0, 0.0)] {
            let m = ((symmetrize(&noise).unwrap() * scale).unwrap()
                + (eye.clone() * shift)
                    .unwrap()
                    .broadcast_as((2, d, d))
                    .unwrap())
            .unwrap();
            let ours = expm_symmetric(&m).unwrap();
            let values = m.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let mut expected = Vec::new();
            for n in 0..2 {
                let block = host::symmetric_block(&values[n * d * d..(n + 1) * d * d], d);
                let (l, u) = host::symmetric_eigen(&block, n).unwrap();
                expected.extend(host::from_eigen(&l, &u, f64::exp));
            }
            let expected = Tensor::from_vec(expected, (2, d, d), &Device::Cpu).unwrap();
            let rel = max_abs_diff(&ours, &expected) / max_abs(&expected).unwrap();
            assert!(
                rel < 1e-12,
                "scale {scale} shift {shift}: relative error {rel}"
            );
            // f64: a unit test on Device::Cpu (the matrices above are built there)
            // f32 picks a lower Taylor degree; still accurate to f32 rounding.
            let ours32 = expm_symmetric(&m.to_dtype(DType::F32).unwrap())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let rel32 = max_abs_diff(&ours32, &expected) / max_abs(&expected).unwrap();
            assert!(rel32 < 1e-5, "f32 scale {scale}: relative error {rel32}");
            // The trace shortcut against the trace of the full exponential.
            let traces = trace_expm_symmetric(&m).unwrap();
            let expected_traces = trace(&expected).unwrap();
            let rel = max_abs_diff(&traces, &expected_traces) / max_abs(&expected_traces).unwrap();
            assert!(rel < 1e-12, "trace: relative error {rel}");
        }
    }

    #[test]
    fn read_free_expm_matches_the_reading_one_and_reads_nothing() {
        // The GPU form against the CPU form, on norms from below 1 to several hundred
        // (0 to 9 squarings), f64 and f32; and no host read at all.
        let d = 9;
        let noise = noise(3, d, 7);
        let eye = Tensor::eye(d, DType::F64, &Device::Cpu).unwrap();
        for (scale, shift) in [(0.05, 0.0), (1.5, -3.0), (20.0, 1.0), (60.0, -2.0)] {
            let m = ((symmetrize(&noise).unwrap() * scale).unwrap()
                + (eye.clone() * shift)
                    .unwrap()
                    .broadcast_as((3, d, d))
                    .unwrap())
            .unwrap();
            // f64: a unit test on Device::Cpu (the matrices above are built there)
            for dtype in [DType::F64, DType::F32] {
                let m = m.to_dtype(dtype).unwrap();
                let expected = expm_symmetric(&m).unwrap();
                let log = super::super::HostReadLog::start();
                let ours = expm_without_reads(&m).unwrap();
                assert!(log.reads().is_empty(), "{:?}", log.reads());
                let rel = max_abs_diff(&ours, &expected) / max_abs(&expected).unwrap();
                let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                assert!(
                    rel < tolerance,
                    "{dtype:?} scale {scale}: relative error {rel}"
                );
            }
        }
        // Beyond the squaring range, and NaN input: NaN, not a wrong matrix.
        let huge = Tensor::new(&[[[1e6f32, 0.0], [0.0, -1e6]]], &Device::Cpu).unwrap();
        let out = expm_without_reads(&huge).unwrap().flatten_all().unwrap();
        assert!(out.to_vec1::<f32>().unwrap().iter().all(|v| v.is_nan()));
        let nan = Tensor::new(&[[[f64::NAN, 0.0], [0.0, 1.0]]], &Device::Cpu).unwrap();
        let out = expm_without_reads(&nan).unwrap().flatten_all().unwrap();
        assert!(out.to_vec1::<f64>().unwrap().iter().all(|v| v.is_nan()));
    }

    #[test]
    fn taylor_degree_meets_the_tolerance() {
        // The tail bound norm^{m+1}/(m+1)! e^{2 norm} is below the tolerance at the chosen
        // degree and not at the one below.
        let tail = |norm: f64, m: usize| {
            (1..=m + 1).fold(1.0, |t, k| t * norm / k as f64) * (2.0 * norm).exp()
        };
        for norm in [0.01, 0.3, 1.0] {
            for dtype in [DType::F32, DType::F64] {
                let tolerance = unit_roundoff(dtype);
                let m = taylor_degree(norm, tolerance);
                assert!(tail(norm, m) < tolerance);
                assert!(m == 1 || tail(norm, m - 1) >= tolerance);
            }
        }
    }

    #[test]
    fn overflowing_exponentials_are_errors_not_nan() {
        // e^800 overflows f32 (limit ln(3.4e38) ≈ 88.7) and f64 (≈ 709.8); e^1e5 overflows both.
        for (dtype, diagonal) in [(DType::F32, 800.0), (DType::F64, 1e5)] {
            let a = Tensor::new(&[[diagonal, 0.0f64], [0.0, 1.0]], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let err = expm_symmetric(&a).unwrap_err();
            assert!(
                matches!(err, GaussError::Numerical { .. }) && err.to_string().contains("neuron 0"),
                "{dtype:?}: {err}"
            );
            assert!(trace_expm_symmetric(&a).is_err(), "{dtype:?}: trace");
        }
        // Near the limit but representable: e^80 in f32 is finite.
        let a = Tensor::new(&[[[80.0f32, 0.0], [0.0, -80.0]]], &Device::Cpu).unwrap();
        let e = expm_symmetric(&a).unwrap().to_vec3::<f32>().unwrap();
        assert!((e[0][0][0] as f64 / 80f64.exp() - 1.0).abs() < 1e-5);
        // A NaN input is an error too.
        let a = Tensor::new(&[[[f64::NAN, 0.0], [0.0, 1.0]]], &Device::Cpu).unwrap();
        assert!(expm_symmetric(&a).is_err());
    }

    #[test]
    fn overflow_errors_name_the_overflowing_neuron() {
        // Neuron 0 = diag(40, 40): e^40 ≈ 2.4e17 is finite in f32. Neuron 1 = [[0, 89],
        // [89, 0]] has eigenvalues ±89 and e^89 ≈ 4.5e38 overflows f32 (max 3.4e38). The
        // largest diagonal entry is neuron 0's, but neuron 1 overflows.
        let a = Tensor::new(
            &[[[40.0f32, 0.0], [0.0, 40.0]], [[0.0, 89.0], [89.0, 0.0]]],
            &Device::Cpu,
        )
        .unwrap();
        for (what, err) in [
            ("expm", expm_symmetric(&a).map(|_| ()).unwrap_err()),
            ("trace", trace_expm_symmetric(&a).map(|_| ()).unwrap_err()),
        ] {
            let text = err.to_string();
            assert!(
                matches!(err, GaussError::Numerical { .. }) && text.contains("neuron 1 "),
                "{what}: {text}"
            );
        }
    }
}
