//! Batched linear algebra built only from Candle tensor ops (matmul, elementwise, narrow,
//! cat), so it runs and differentiates on CPU, CUDA and Metal alike.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::linalg;
//! let lower = Tensor::new(&[[[2.0f64, 0.0], [1.0, 4.0]]], &Device::Cpu)?;
//! let inverse = linalg::tril_inverse(&lower)?;
//! // [[1/2, 0], [-1/8, 1/4]]
//! assert_eq!(inverse.to_vec3::<f64>()?, vec![vec![vec![0.5, 0.0], vec![-0.125, 0.25]]]);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Device, Tensor, D};

use crate::error::{GaussError, Result};

/// Checks that `matrices` is (..., d, d) with a batch rank given by `rank` (None: any) and
/// returns d.
fn square_dim(matrices: &Tensor, what: &str, rank: Option<usize>) -> Result<usize> {
    let dims = matrices.dims();
    let ok_rank = match rank {
        Some(r) => dims.len() == r,
        None => dims.len() >= 2,
    };
    if !ok_rank || dims[dims.len() - 2] != dims[dims.len() - 1] {
        let expected = match rank {
            Some(3) => "(Z, d, d)".to_string(),
            _ => "(..., d, d)".to_string(),
        };
        return Err(GaussError::shape(what, expected, dims));
    }
    Ok(dims[dims.len() - 1])
}

/// Swaps the last two dimensions (a batched transpose).
///
/// # Shapes
/// `matrices`: (..., m, n) → (..., n, m)
pub fn transpose(matrices: &Tensor) -> Result<Tensor> {
    Ok(matrices.transpose(D::Minus2, D::Minus1)?)
}

/// Identity matrix of size d in the dtype and on the device of `like`.
///
/// # Shapes
/// `like`: any → (d, d)
pub fn eye_like(d: usize, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::eye(d, like.dtype(), like.device())?)
}

fn tril_mask(d: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::tril2(d, dtype, device)?)
}

/// Lower triangle (diagonal included) of a batch of square matrices.
///
/// # Shapes
/// `matrices`: (..., d, d) → (..., d, d)
pub fn tril(matrices: &Tensor) -> Result<Tensor> {
    let d = square_dim(matrices, "tril: matrices", None)?;
    let mask = tril_mask(d, matrices.dtype(), matrices.device())?;
    Ok(matrices.broadcast_mul(&mask)?)
}

/// Strictly lower triangle (diagonal excluded) of a batch of square matrices.
///
/// # Shapes
/// `matrices`: (..., d, d) → (..., d, d)
pub fn strict_tril(matrices: &Tensor) -> Result<Tensor> {
    let d = square_dim(matrices, "strict_tril: matrices", None)?;
    let mask = (tril_mask(d, matrices.dtype(), matrices.device())? - eye_like(d, matrices)?)?;
    Ok(matrices.broadcast_mul(&mask)?)
}

/// `(A + Aᵀ)/2` for a batch of square matrices.
///
/// # Shapes
/// `matrices`: (..., d, d) → (..., d, d)
pub fn symmetrize(matrices: &Tensor) -> Result<Tensor> {
    square_dim(matrices, "symmetrize: matrices", None)?;
    Ok(((matrices + transpose(matrices)?)? * 0.5)?)
}

/// Diagonals of a batch of square matrices.
///
/// # Shapes
/// `matrices`: (Z, d, d) → (Z, d)
pub fn diagonal(matrices: &Tensor) -> Result<Tensor> {
    let d = square_dim(matrices, "diagonal: matrices", None)?;
    Ok(matrices
        .broadcast_mul(&eye_like(d, matrices)?)?
        .sum(D::Minus1)?)
}

/// Batch of diagonal matrices from their diagonals.
///
/// # Shapes
/// `diagonals`: (Z, d) → (Z, d, d)
pub fn diag_embed(diagonals: &Tensor) -> Result<Tensor> {
    let d = diagonals.dim(D::Minus1)?;
    Ok(diagonals
        .unsqueeze(D::Minus1)?
        .broadcast_mul(&eye_like(d, diagonals)?)?)
}

/// Traces of a batch of square matrices.
///
/// # Shapes
/// `matrices`: (Z, d, d) → (Z)
pub fn trace(matrices: &Tensor) -> Result<Tensor> {
    Ok(diagonal(matrices)?.sum(D::Minus1)?)
}

/// Batched `A B` with both operands made contiguous first (cuBLAS and Metal accept fewer
/// stride patterns than the CPU backend).
///
/// # Shapes
/// `a`: (..., m, k), `b`: (..., k, n) → (..., m, n)
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.contiguous()?.matmul(&b.contiguous()?)?)
}

/// Batched `A Aᵀ`.
///
/// # Shapes
/// `a`: (Z, m, n) → (Z, m, m)
pub fn gram(a: &Tensor) -> Result<Tensor> {
    matmul(a, &transpose(a)?)
}

/// Size up to which [`tril_inverse`] inverts a diagonal block directly.
const TRIL_INVERSE_BLOCK: usize = 8;

/// Inverse of a batch of lower-triangular matrices with nonzero diagonal, in matmuls and
/// elementwise ops only: differentiable on every device.
///
/// Recursive 2×2 block inversion `[[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹ C A⁻¹, D⁻¹]]` down
/// to blocks of size ≤ 8, each inverted directly: with `T = diag(δ)(I − N)`, `N` strictly
/// lower triangular and so nilpotent, `T⁻¹ = (I + N)(I + N²)(I + N⁴) diag(δ)⁻¹`, exact after
/// ⌈log₂ b⌉ factors. About a dozen ops per 8×8 block instead of recursing to 1×1 blocks
/// (which costs ops per row). The upper triangle of `lower` is ignored (masked, so it must
/// be finite).
///
/// # Shapes
/// `lower`: (Z, d, d) → (Z, d, d)
pub fn tril_inverse(lower: &Tensor) -> Result<Tensor> {
    let d = square_dim(lower, "tril_inverse: lower", Some(3))?;
    tril_inverse_rec(lower, d)
}

fn tril_inverse_rec(lower: &Tensor, d: usize) -> Result<Tensor> {
    if d <= TRIL_INVERSE_BLOCK {
        return small_tril_inverse(lower, d);
    }
    let h = d / 2;
    let top = lower.narrow(1, 0, h)?.narrow(2, 0, h)?;
    let bottom_left = lower.narrow(1, h, d - h)?.narrow(2, 0, h)?;
    let bottom = lower.narrow(1, h, d - h)?.narrow(2, h, d - h)?;
    let top_inv = tril_inverse_rec(&top, h)?;
    let bottom_inv = tril_inverse_rec(&bottom, d - h)?;
    let corner = matmul(&matmul(&bottom_inv, &bottom_left)?, &top_inv)?.neg()?;
    let z = top.dim(0)?;
    let zeros = Tensor::zeros((z, h, d - h), lower.dtype(), lower.device())?;
    let upper_rows = Tensor::cat(&[&top_inv, &zeros], 2)?;
    let lower_rows = Tensor::cat(&[&corner, &bottom_inv], 2)?;
    Ok(Tensor::cat(&[&upper_rows, &lower_rows], 1)?)
}

/// Inverse of small lower-triangular blocks by the nilpotent doubling product (see
/// [`tril_inverse`]).
///
/// # Shapes
/// `lower`: (Z, b, b) → (Z, b, b)
fn small_tril_inverse(lower: &Tensor, b: usize) -> Result<Tensor> {
    let (dtype, device) = (lower.dtype(), lower.device());
    let eye = Tensor::eye(b, dtype, device)?;
    if b == 1 {
        return Ok(lower.recip()?);
    }
    let strict_lower = (Tensor::tril2(b, dtype, device)? - &eye)?;
    let delta = lower.broadcast_mul(&eye)?.sum_keepdim(2)?; // (Z, b, 1)
    let nilpotent = lower
        .broadcast_mul(&strict_lower)?
        .broadcast_div(&delta)?
        .neg()?;
    let mut product = nilpotent.broadcast_add(&eye)?;
    let mut power = nilpotent;
    let mut reach = 2;
    while reach < b {
        power = matmul(&power, &power)?;
        product = matmul(&product, &power.broadcast_add(&eye)?)?;
        reach *= 2;
    }
    Ok(product.broadcast_div(&delta.transpose(1, 2)?)?)
}

/// Cholesky factor `L` (lower, positive diagonal) of a batch of SPD matrices, column by
/// column in tensor ops: differentiable on every device. O(d) sequential steps.
///
/// Only the lower triangle of `spd` is read (it is assumed symmetric). A matrix that is not
/// positive definite gives NaN in its factor (the square root of a non-positive pivot);
/// check with [`crate::repair::check_positive_definite`] when that can happen.
///
/// # Shapes
/// `spd`: (Z, d, d) → (Z, d, d)
pub fn cholesky(spd: &Tensor) -> Result<Tensor> {
    let d = square_dim(spd, "cholesky: spd", Some(3))?;
    let (dtype, device) = (spd.dtype(), spd.device());
    let rows = Tensor::arange(0u32, d as u32, device)?;
    let mut columns: Vec<Tensor> = Vec::with_capacity(d);
    for j in 0..d {
        // v_i = A_ij - Σ_{k<j} L_ik L_jk for all rows i: the Schur complement column.
        let a_col = spd.narrow(2, j, 1)?; // (Z, d, 1)
        let v = if j == 0 {
            a_col
        } else {
            let done = Tensor::cat(&columns, 2)?; // (Z, d, j)
            let row_j = done.narrow(1, j, 1)?; // (Z, 1, j)
            (a_col - matmul(&done, &transpose(&row_j)?)?)?
        };
        let pivot = v.narrow(1, j, 1)?.sqrt()?; // (Z, 1, 1)
        let below = rows.ge(j as u32)?.to_dtype(dtype)?.reshape((1, d, 1))?;
        columns.push(v.broadcast_div(&pivot)?.broadcast_mul(&below)?);
    }
    Ok(Tensor::cat(&columns, 2)?)
}

/// Largest norm of the scaled argument of the Taylor polynomial in [`expm_symmetric`]:
/// keeps the cancellation between alternating terms (a factor of at most `e^{2θ}`) small.
const EXPM_MAX_SCALED_NORM: f64 = 1.0;

/// Unit roundoff of a floating dtype: the Taylor truncation error is pushed below it.
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-8),
    }
}

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
/// batch (one device synchronization); the Taylor degree is the smallest whose truncation
/// error is below the dtype's unit roundoff, evaluated by Paterson–Stockmeyer. Accurate to
/// about 1e-13 relative in f64 for moderate norms.
///
/// # Shapes
/// `symmetric`: (Z, d, d) → (Z, d, d)
pub fn expm_symmetric(symmetric: &Tensor) -> Result<Tensor> {
    let (mut acc, squarings, shift) = scaled_expm(symmetric, "expm_symmetric: symmetric")?;
    for _ in 0..squarings {
        acc = matmul(&acc, &acc)?;
    }
    Ok(acc.broadcast_mul(&shift.exp()?)?)
}

/// `tr expm(A)` of a batch of symmetric matrices, as [`expm_symmetric`] but with the last
/// squaring replaced by `tr(E²) = ‖E‖²_F` (E symmetric): one matmul fewer.
///
/// # Shapes
/// `symmetric`: (Z, d, d) → (Z)
pub fn trace_expm_symmetric(symmetric: &Tensor) -> Result<Tensor> {
    let (mut acc, squarings, shift) = scaled_expm(symmetric, "trace_expm_symmetric: symmetric")?;
    let trace = if squarings == 0 {
        trace(&acc)?
    } else {
        for _ in 1..squarings {
            acc = matmul(&acc, &acc)?;
        }
        acc.sqr()?.sum((1, 2))?
    };
    Ok((trace * shift.flatten_all()?.exp()?)?)
}

/// `(expm((A − μI)/2ˢ), s, μ)` with μ = tr(A)/d of shape (Z, 1, 1): see [`expm_symmetric`].
///
/// Errors, naming the first offending neuron, when an entry is not finite or when the result
/// could overflow the dtype (instead of returning ∞ or NaN): with `C = A − μI`, every
/// intermediate power and the result are bounded by `e^{max(μ, 0) + g}` times `d` (traces),
/// where `g ≥ λ_max(C)` is the Gershgorin bound `max_i (c_ii + Σ_{j≠i} |c_ij|)`, exact for
/// diagonal matrices. The check asks `max(μ, 0) + g + ln d + 1 ≤ ln(largest finite value)`
/// (about 88.7 in f32, 709.8 in f64), so P's largest eigenvalue stays at least a factor
/// `e·d` below the largest finite value.
fn scaled_expm(symmetric: &Tensor, what: &str) -> Result<(Tensor, i32, Tensor)> {
    let d = square_dim(symmetric, what, Some(3))?;
    let z = symmetric.dim(0)?;
    let eye = eye_like(d, symmetric)?;
    let shift = (trace(symmetric)? / d as f64)?.reshape((z, 1, 1))?;
    let centered = symmetric.broadcast_sub(&eye.broadcast_mul(&shift)?)?;
    // Per neuron, reduced on the device and read on the host (one synchronization): ‖C‖_F,
    // the Gershgorin bound on λ_max(C), and μ.
    let frobenius = centered.sqr()?.sum((1, 2))?.sqrt()?;
    let diag = centered.broadcast_mul(&eye)?.sum(2)?;
    let gershgorin = ((centered.abs()?.sum(2)? - diag.abs()?)? + diag)?.max(1)?;
    let stats = Tensor::stack(&[frobenius, gershgorin, shift.flatten_all()?], 0)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let dtype = symmetric.dtype();
    let log_max = match dtype {
        DType::F16 => half::f16::MAX.to_f64().ln(),
        DType::BF16 => half::bf16::MAX.to_f64().ln(),
        DType::F32 => f64::from(f32::MAX).ln(),
        _ => f64::MAX.ln(),
    };
    let mut norm = 0f64;
    let [frobenius, gershgorin, mu] = &stats[..] else {
        return Err(GaussError::config("expm argument", "internal: statistics"));
    };
    for (neuron, ((&frob, &g), &mu)) in frobenius.iter().zip(gershgorin).zip(mu).enumerate() {
        if !(frob.is_finite() && g.is_finite() && mu.is_finite()) {
            return Err(GaussError::config(
                "expm argument",
                format!(
                    "must be finite, got neuron {neuron} with mean diagonal {mu} and Frobenius norm {frob} about it (non-finite or too large for {dtype:?})"
                ),
            ));
        }
        let top = mu.max(0.0) + g;
        if top + (d as f64).ln() + 1.0 > log_max {
            return Err(GaussError::config(
                "expm argument",
                format!(
                    "overflows {dtype:?} at neuron {neuron}: its largest eigenvalue may reach e^{top:.4e} (mean diagonal {mu:.4e} + spread bound {g:.4e}), beyond the dtype's e^{log_max:.1}"
                ),
            ));
        }
        norm = norm.max(frob);
    }
    let squarings = if norm > EXPM_MAX_SCALED_NORM {
        (norm / EXPM_MAX_SCALED_NORM).log2().ceil() as i32
    } else {
        0
    };
    let scale = 2f64.powi(squarings);
    let degree = taylor_degree(norm / scale, unit_roundoff(dtype));
    let acc = taylor_polynomial(&(centered / scale)?, degree, &eye)?;
    Ok((acc, squarings, shift))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_abs(&(a - b).unwrap()).unwrap()
    }

    fn random_lower(z: usize, d: usize, seed: u64) -> Tensor {
        // Deterministic pseudo-random entries; diagonal kept away from zero.
        let mut state = seed;
        let mut values = Vec::with_capacity(z * d * d);
        for _ in 0..z * d * d {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            values.push(((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5);
        }
        let t = Tensor::from_vec(values, (z, d, d), &Device::Cpu).unwrap();
        let eye = Tensor::eye(d, DType::F64, &Device::Cpu).unwrap();
        tril(&t)
            .unwrap()
            .broadcast_add(&(eye * 1.5).unwrap())
            .unwrap()
    }

    #[test]
    fn tril_inverse_is_the_inverse() {
        // Sizes around the direct-block size and several recursion levels above it.
        for d in [1, 2, 3, 5, 8, 9, 13, 40, 64] {
            let lower = random_lower(3, d, d as u64);
            let inverse = tril_inverse(&lower).unwrap();
            let eye = Tensor::eye(d, DType::F64, &Device::Cpu).unwrap();
            let product = lower.matmul(&inverse).unwrap();
            assert!(max_abs_diff(&product, &eye.broadcast_as((3, d, d)).unwrap()) < 1e-12);
            // The inverse of a lower-triangular matrix is lower triangular.
            assert!(max_abs_diff(&tril(&inverse).unwrap(), &inverse) == 0.0);
        }
    }

    #[test]
    fn cholesky_recovers_the_factor() {
        for d in [1, 2, 4, 7, 12] {
            let lower = random_lower(2, d, 100 + d as u64);
            let spd = gram(&lower).unwrap();
            let factor = cholesky(&spd).unwrap();
            assert!(max_abs_diff(&factor, &lower) < 1e-12, "d = {d}");
        }
    }

    #[test]
    fn cholesky_matches_faer() {
        let lower = random_lower(1, 6, 7);
        let spd = gram(&lower).unwrap();
        let values = spd.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mat = faer::Mat::<f64>::from_fn(6, 6, |i, j| values[i * 6 + j]);
        let llt = mat.llt(faer::Side::Lower).unwrap();
        let l = llt.L();
        let ours = cholesky(&spd).unwrap().to_vec3::<f64>().unwrap();
        for i in 0..6 {
            for j in 0..=i {
                assert!((ours[0][i][j] - l[(i, j)]).abs() < 1e-12);
            }
        }
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
        let noise = random_lower(2, d, 31);
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
                let block = crate::repair::symmetric_block(&values[n * d * d..(n + 1) * d * d], d);
                let (l, u) = crate::repair::symmetric_eigen(&block).unwrap();
                expected.extend(crate::repair::from_eigen(&l, &u, f64::exp));
            }
            let expected = Tensor::from_vec(expected, (2, d, d), &Device::Cpu).unwrap();
            let rel = max_abs_diff(&ours, &expected) / max_abs(&expected).unwrap();
            assert!(
                rel < 1e-12,
                "scale {scale} shift {shift}: relative error {rel}"
            );
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
    fn trace_diagonal_symmetrize() {
        let m = Tensor::new(&[[[1.0f64, 2.0], [4.0, 3.0]]], &Device::Cpu).unwrap();
        assert_eq!(trace(&m).unwrap().to_vec1::<f64>().unwrap(), vec![4.0]);
        assert_eq!(
            diagonal(&m).unwrap().to_vec2::<f64>().unwrap(),
            vec![vec![1.0, 3.0]]
        );
        assert_eq!(
            symmetrize(&m).unwrap().to_vec3::<f64>().unwrap(),
            vec![vec![vec![1.0, 3.0], vec![3.0, 3.0]]]
        );
        assert!(tril_inverse(&Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap()).is_err());
    }
}
