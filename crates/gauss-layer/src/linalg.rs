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

/// Inverse of a batch of lower-triangular matrices with nonzero diagonal, by recursive 2×2
/// block inversion (matmuls only): differentiable on every device.
///
/// `[[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹ C A⁻¹, D⁻¹]]`; log₂ d levels of recursion.
/// The upper triangle of `lower` is ignored.
///
/// # Shapes
/// `lower`: (Z, d, d) → (Z, d, d)
pub fn tril_inverse(lower: &Tensor) -> Result<Tensor> {
    let d = square_dim(lower, "tril_inverse: lower", Some(3))?;
    tril_inverse_rec(lower, d)
}

fn tril_inverse_rec(lower: &Tensor, d: usize) -> Result<Tensor> {
    if d == 1 {
        return Ok(lower.recip()?);
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

/// Taylor degree used by [`expm_symmetric`] after scaling to norm ≤ 1/2: the truncation
/// error `0.5¹⁹/19!` is far below f64 rounding.
const EXPM_TAYLOR_DEGREE: usize = 18;

/// Matrix exponential of a batch of symmetric matrices (scaling and squaring with a Taylor
/// polynomial, matmuls only): differentiable on every device.
///
/// The number of squarings `s` is picked from the largest Frobenius norm in the batch (read
/// once to the host, one device synchronization) so that `‖A‖/2ˢ ≤ 1/2`; then a degree-18
/// Taylor polynomial (Horner form) and `s` squarings. Accurate to about 1e-13 relative in
/// f64 for moderate norms.
///
/// # Shapes
/// `symmetric`: (Z, d, d) → (Z, d, d)
pub fn expm_symmetric(symmetric: &Tensor) -> Result<Tensor> {
    let d = square_dim(symmetric, "expm_symmetric: symmetric", Some(3))?;
    let norm = symmetric
        .sqr()?
        .sum((1, 2))?
        .max(0)?
        .sqrt()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if !norm.is_finite() {
        return Err(GaussError::config(
            "expm argument",
            format!("must be finite, got Frobenius norm {norm}"),
        ));
    }
    let squarings = if norm > 0.5 {
        (norm / 0.5).log2().ceil() as i32
    } else {
        0
    };
    let scaled = (symmetric / 2f64.powi(squarings))?;
    let eye = eye_like(d, symmetric)?;
    // Horner: I + X/1 (I + X/2 (I + ... (I + X/m))).
    let mut acc = eye.broadcast_as(symmetric.shape())?.contiguous()?;
    for k in (1..=EXPM_TAYLOR_DEGREE).rev() {
        acc = (matmul(&scaled, &acc)? / k as f64)?.broadcast_add(&eye)?;
    }
    for _ in 0..squarings {
        acc = matmul(&acc, &acc)?;
    }
    Ok(acc)
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
        for d in [1, 2, 3, 5, 8, 13] {
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
