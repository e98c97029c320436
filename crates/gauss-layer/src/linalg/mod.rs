//! Batched linear algebra that runs and differentiates on CPU, CUDA and Metal alike: Candle
//! tensor ops (matmul, elementwise, narrow, cat), except the triangular inverse, a Candle op
//! (`tril_inverse_op`: faer on the CPU, the project's kernel on CUDA, one closed-form
//! backward) with the tensor-op recursion as its portable form. The host side
//! (eigendecompositions with `faer`, in f64 on the CPU) lives in `host`.
//!
//! Crate-private: the four helpers the losses build on (`tril`, `tril_inverse`, `diagonal`,
//! `log_sum_exp`) are public as [`crate::ops`]'s, [`HostReadLog`] at the crate root; the
//! integration tests reach the rest through `gauss_layer::testing::linalg` (the `testing`
//! feature).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::ops;
//! let lower = Tensor::new(&[[[2.0f64, 0.0], [1.0, 4.0]]], &Device::Cpu)?;
//! let inverse = ops::tril_inverse(&lower)?;
//! // [[1/2, 0], [-1/8, 1/4]]
//! assert_eq!(inverse.to_vec3::<f64>()?, vec![vec![vec![0.5, 0.0], vec![-0.125, 0.25]]]);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Tensor, D};

use crate::error::{check_float_dtype, GaussError, Result};
use crate::route::{backend, Backend};

mod expm;
pub(crate) mod host;
mod host_reads;
pub(crate) mod lanes;
mod tril_inverse_op;

pub use expm::{expm_symmetric, trace_expm_symmetric};
pub(crate) use host_reads::record as record_host_read;
pub use host_reads::{HostRead, HostReadLog};

/// A 0-dimensional tensor's value on the host, read in its own dtype (no cast to f64 on the
/// device: Metal has no f64) and widened to f64 on the host.
pub(crate) fn read_scalar(scalar: &Tensor) -> Result<f64> {
    record_host_read("read_scalar", scalar);
    Ok(match scalar.dtype() {
        DType::F64 => scalar.to_scalar::<f64>()?,
        DType::F32 => scalar.to_scalar::<f32>()? as f64,
        DType::F16 => scalar.to_scalar::<half::f16>()?.to_f64(),
        DType::BF16 => scalar.to_scalar::<half::bf16>()?.to_f64(),
        other => {
            return Err(GaussError::dtype(
                "scalar read back from the device",
                crate::error::FLOAT_DTYPES,
                other,
            ))
        }
    })
}

/// The largest finite magnitude of a float dtype (f64's for any other dtype): the bound the
/// checkpoint loader, the data-file reader and the raw-precision bounds check values against.
pub(crate) fn max_finite(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => half::f16::MAX.to_f64(),
        DType::BF16 => half::bf16::MAX.to_f64(),
        DType::F32 => f32::MAX as f64,
        _ => f64::MAX,
    }
}

/// The smallest positive normal number of a float dtype (f64's for any other dtype): below it
/// a value loses precision, and a small enough one rounds to 0.
pub(crate) fn min_positive_normal(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => half::f16::MIN_POSITIVE.to_f64(),
        DType::BF16 => half::bf16::MIN_POSITIVE.to_f64(),
        DType::F32 => f32::MIN_POSITIVE as f64,
        _ => f64::MIN_POSITIVE,
    }
}

/// Unit roundoff of a float dtype (bf16's for any other dtype): the relative error of
/// rounding a value to it. expm pushes its Taylor truncation error below it; the eigenvalue
/// repair keeps its floor clear of it.
pub(crate) fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-8),
    }
}

/// Checks that `matrices` is (..., d, d) with a batch rank given by `rank` (None: any) and
/// returns d.
pub(crate) fn square_dim(matrices: &Tensor, what: &str, rank: Option<usize>) -> Result<usize> {
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
///
/// # Errors
/// Shapes the operation cannot take (a Candle error).
pub fn transpose(matrices: &Tensor) -> Result<Tensor> {
    Ok(matrices.transpose(D::Minus2, D::Minus1)?)
}

/// Identity matrix of size d in the dtype and on the device of `like`.
///
/// # Shapes
/// `like`: any → (d, d)
///
/// # Errors
/// Shapes the operation cannot take (a Candle error).
pub fn eye_like(d: usize, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::eye(d, like.dtype(), like.device())?)
}

/// Keeps the entries of each (d, d) matrix where `keep(row, col)` holds and writes exact zeros
/// elsewhere: a select, not a product with a 0/1 mask, so a NaN or ∞ in the dropped part does
/// not spread (`0·NaN` is NaN; "only the lower triangle is read" must hold for any upper one).
fn select_entries(
    matrices: &Tensor,
    d: usize,
    keep: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let index = Tensor::arange(0u32, d as u32, matrices.device())?;
    let rows = index.reshape((d, 1))?.broadcast_as((d, d))?;
    let cols = index.reshape((1, d))?.broadcast_as((d, d))?;
    let mask = keep(&rows, &cols)?.broadcast_as(matrices.shape())?;
    Ok(mask.where_cond(matrices, &matrices.zeros_like()?)?)
}

/// Lower triangle (diagonal included) of a batch of square matrices.
///
/// # Shapes
/// `matrices`: (..., d, d) → (..., d, d)
///
/// # Errors
/// A tensor that is not a batch of square matrices of the documented rank.
pub fn tril(matrices: &Tensor) -> Result<Tensor> {
    let d = square_dim(matrices, "tril: matrices", None)?;
    select_entries(matrices, d, |rows, cols| rows.ge(cols))
}

/// Strictly lower triangle (diagonal excluded) of a batch of square matrices.
///
/// # Shapes
/// `matrices`: (..., d, d) → (..., d, d)
///
/// # Errors
/// A tensor that is not a batch of square matrices of the documented rank.
pub fn strict_tril(matrices: &Tensor) -> Result<Tensor> {
    let d = square_dim(matrices, "strict_tril: matrices", None)?;
    select_entries(matrices, d, |rows, cols| rows.gt(cols))
}

/// `(A + Aᵀ)/2` for a batch of square matrices.
///
/// # Shapes
/// `matrices`: (..., d, d) → (..., d, d)
///
/// # Errors
/// A tensor that is not a batch of square matrices of the documented rank.
pub fn symmetrize(matrices: &Tensor) -> Result<Tensor> {
    square_dim(matrices, "symmetrize: matrices", None)?;
    Ok(((matrices + transpose(matrices)?)? * 0.5)?)
}

/// Diagonals of a batch of square matrices.
///
/// # Shapes
/// `matrices`: (Z, d, d) → (Z, d)
///
/// # Errors
/// A tensor that is not a batch of square matrices of the documented rank.
pub fn diagonal(matrices: &Tensor) -> Result<Tensor> {
    let d = square_dim(matrices, "diagonal: matrices", None)?;
    // Entries i·(d + 1) of each flattened matrix: d reads, and the off-diagonal entries
    // (NaN or ∞ included) take no part.
    let positions = Tensor::arange_step(0u32, (d * d) as u32, (d + 1) as u32, matrices.device())?;
    Ok(matrices
        .flatten_from(D::Minus2)?
        .index_select(&positions, D::Minus1)?)
}

/// Batch of diagonal matrices from their diagonals.
///
/// # Shapes
/// `diagonals`: (Z, d) → (Z, d, d)
///
/// # Errors
/// Shapes the operation cannot take (a Candle error).
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
///
/// # Errors
/// Shapes the operation cannot take (a Candle error).
pub fn trace(matrices: &Tensor) -> Result<Tensor> {
    sum_accumulated(&diagonal(matrices)?, D::Minus1)
}

/// `t.sum(dims)` accumulated in f32 when `t` is f16 or bf16 (the result rounded back to
/// `t`'s dtype); other dtypes as they are, with no extra op. Candle's CPU sum accumulates in
/// the tensor's dtype, and a running sum in 11 (f16) or 8 (bf16) significant bits loses most
/// digits over d terms: bf16 `log det P` of 256 entries near −5.5 came out −1352 instead of
/// −1416. The casts are differentiable, and f32 exists on every device.
pub(crate) fn sum_accumulated<D: candle_core::shape::Dims>(t: &Tensor, dims: D) -> Result<Tensor> {
    match accumulation_dtype(t.dtype()) {
        dtype if dtype != t.dtype() => Ok(t.to_dtype(dtype)?.sum(dims)?.to_dtype(t.dtype())?),
        _ => Ok(t.sum(dims)?),
    }
}

/// The dtype sums over a tensor of `dtype` run in: f32 for f16 and bf16 (see
/// [`sum_accumulated`]: a bf16 sum of ones stops growing at 256, an f16 sum of squares
/// overflows past 65504), `dtype` itself otherwise.
pub(crate) fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// `log Σ exp(t)` over dimension `dim`, shifted by each slice's largest entry so that no
/// `exp` overflows: the one log-sum-exp of this crate and `gauss-losses` (mixture densities,
/// their NLL, the E-step).
///
/// Unlike Candle's `log_sum_exp`, a slice whose entries are all −∞ (a sample so far away that
/// every component's log-density overflowed to −∞, or a sample at infinity) gives −∞, the
/// log of an empty sum, as SciPy's `logsumexp` does: Candle shifts by that −∞ itself and
/// `−∞ − (−∞)` is NaN. Here the shift is the slice's maximum clamped to the dtype's finite
/// range, so it is finite whatever the slice holds (a +∞ entry gives +∞, as SciPy too). The
/// result does not depend on the shift, so it is held constant in the backward pass: the
/// gradient is exactly the slice's softmax (undefined, NaN, only for a slice of −∞ alone).
///
/// # Shapes
/// `t`: (…, n, …) → the same without dimension `dim` (−∞ where n = 0)
///
/// # Errors
/// A `dim` out of range; [`GaussError::DType`] for a tensor of an integer dtype.
pub fn log_sum_exp<T: candle_core::shape::Dim>(t: &Tensor, dim: T) -> Result<Tensor> {
    check_float_dtype("log_sum_exp: t", t.dtype())?;
    let dim = dim.to_index(t.shape(), "log_sum_exp")?;
    if t.elem_count() == 0 {
        // Candle refuses a max over an empty tensor; the sum of no terms is 0, its log −∞.
        let mut dims = t.dims().to_vec();
        dims.remove(dim);
        return Ok(Tensor::zeros(dims, t.dtype(), t.device())?.log()?);
    }
    // The clamp bounds are f64 scalars that Candle makes on the host and casts there to
    // `t`'s dtype before moving them.
    let bound = max_finite(t.dtype());
    let shift = t.max_keepdim(dim)?.detach().clamp(-bound, bound)?;
    // Summed in f32 for f16 and bf16 (see `sum_accumulated`).
    let sum = sum_accumulated(&t.broadcast_sub(&shift)?.exp()?, dim)?;
    Ok((sum.log()? + shift.squeeze(dim)?)?)
}

/// Batched `A B` with both operands made contiguous first (cuBLAS and Metal accept fewer
/// stride patterns than the CPU backend).
///
/// # Shapes
/// `a`: (..., m, k), `b`: (..., k, n) → (..., m, n)
///
/// # Errors
/// Shapes the operation cannot take (a Candle error).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.contiguous()?.matmul(&b.contiguous()?)?)
}

/// Batched `A Aᵀ`.
///
/// # Shapes
/// `a`: (Z, m, n) → (Z, m, m)
///
/// # Errors
/// A tensor that is not a batch of square matrices of the documented rank.
pub fn gram(a: &Tensor) -> Result<Tensor> {
    matmul(a, &transpose(a)?)
}

/// Size up to which [`tril_inverse`] inverts a diagonal block directly.
const TRIL_INVERSE_BLOCK: usize = 8;

/// Inverse of a batch of lower-triangular matrices with nonzero diagonal, differentiable on
/// every device. The upper triangle of `lower` is ignored (it must be finite).
///
/// Where it runs (the crate's one routing decision): on the CPU (f32, f64) faer's blocked
/// inverse per matrix, on CUDA the project's `tril_inverse` kernel (one thread per column), both with the
/// closed-form backward `∂L = tril(−Mᵀ Ḡ Mᵀ)`, `M = L⁻¹`; elsewhere (Metal, f16, bf16) the
/// portable form in matmuls and elementwise ops: recursive 2×2 block inversion
/// `[[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹ C A⁻¹, D⁻¹]]` down to blocks of size ≤ 8, each
/// inverted directly: with `T = diag(δ)(I − N)`, `N` strictly lower triangular and so
/// nilpotent, `T⁻¹ = (I + N)(I + N²)(I + N⁴) diag(δ)⁻¹`, exact after ⌈log₂ b⌉ factors.
///
/// # Shapes
/// `lower`: (Z, d, d) → (Z, d, d)
///
/// # Errors
/// A tensor that is not a batch of square matrices of the documented rank.
pub fn tril_inverse(lower: &Tensor) -> Result<Tensor> {
    tril_inverse_routed(lower, false)
}

/// [`tril_inverse`], with `portable: true` forcing the tensor-op form on every device (what
/// a layer configured `portable` runs).
///
/// # Shapes
/// `lower`: (Z, d, d) → (Z, d, d)
pub(crate) fn tril_inverse_routed(lower: &Tensor, portable: bool) -> Result<Tensor> {
    let d = square_dim(lower, "tril_inverse: lower", Some(3))?;
    match backend(lower.device(), lower.dtype(), portable) {
        Backend::Portable => tril_inverse_rec(lower, d),
        Backend::CpuFused | Backend::Cuda => Ok(lower.apply_op1(tril_inverse_op::TrilInverse)?),
    }
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

/// Size up to which [`cholesky`] factors a diagonal block column by column.
const CHOLESKY_BLOCK: usize = 8;

/// Cholesky factor `L` (lower, positive diagonal) of a batch of SPD matrices, in tensor ops:
/// differentiable on every device.
///
/// Recursive 2×2 blocks `A = [[A₁₁, ·], [A₂₁, A₂₂]]`: `L₁₁ = chol(A₁₁)`,
/// `L₂₁ = A₂₁ L₁₁⁻ᵀ` ([`tril_inverse`]), `L₂₂ = chol(A₂₂ − L₂₁ L₂₁ᵀ)`, down to blocks of
/// size ≤ 8 factored column by column. Every level keeps tensors of O(Z·d²) elements for the
/// backward pass, and the levels shrink geometrically, so the memory autograd holds is
/// O(Z·d²) (a column-by-column factorization keeps O(Z·d³)).
///
/// Only the lower triangle of `spd` is read (it is assumed symmetric). A matrix that is not
/// positive definite gives NaN in its factor (the square root of a non-positive pivot);
/// check with [`crate::repair::check_positive_definite`] when that can happen.
///
/// # Shapes
/// `spd`: (Z, d, d) → (Z, d, d)
///
/// # Errors
/// A tensor that is not a batch of square matrices.
pub fn cholesky(spd: &Tensor) -> Result<Tensor> {
    cholesky_routed(spd, false)
}

/// [`cholesky`], with `portable: true` sending its triangular inverses to the tensor-op form
/// on every device (what a layer configured `portable` runs).
///
/// # Shapes
/// `spd`: (Z, d, d) → (Z, d, d)
pub(crate) fn cholesky_routed(spd: &Tensor, portable: bool) -> Result<Tensor> {
    let d = square_dim(spd, "cholesky: spd", Some(3))?;
    cholesky_rec(spd, d, portable)
}

fn cholesky_rec(spd: &Tensor, d: usize, portable: bool) -> Result<Tensor> {
    if d <= CHOLESKY_BLOCK {
        return small_cholesky(spd, d);
    }
    let h = d / 2;
    let top = spd.narrow(1, 0, h)?.narrow(2, 0, h)?;
    let bottom_left = spd.narrow(1, h, d - h)?.narrow(2, 0, h)?;
    let bottom = spd.narrow(1, h, d - h)?.narrow(2, h, d - h)?;
    let top_factor = cholesky_rec(&top, h, portable)?;
    let corner = matmul(
        &bottom_left,
        &transpose(&tril_inverse_routed(&top_factor, portable)?)?,
    )?;
    let schur = (bottom - gram(&corner)?)?;
    let bottom_factor = cholesky_rec(&schur, d - h, portable)?;
    let z = spd.dim(0)?;
    let zeros = Tensor::zeros((z, h, d - h), spd.dtype(), spd.device())?;
    let upper_rows = Tensor::cat(&[&top_factor, &zeros], 2)?;
    let lower_rows = Tensor::cat(&[&corner, &bottom_factor], 2)?;
    Ok(Tensor::cat(&[&upper_rows, &lower_rows], 1)?)
}

/// Column-by-column Cholesky of small blocks (b ≤ [`CHOLESKY_BLOCK`]).
fn small_cholesky(spd: &Tensor, b: usize) -> Result<Tensor> {
    let (dtype, device) = (spd.dtype(), spd.device());
    let rows = Tensor::arange(0u32, b as u32, device)?;
    let mut columns: Vec<Tensor> = Vec::with_capacity(b);
    for j in 0..b {
        // v_i = A_ij - Σ_{k<j} L_ik L_jk for all rows i: the Schur complement column.
        let a_col = spd.narrow(2, j, 1)?; // (Z, b, 1)
        let v = if j == 0 {
            a_col
        } else {
            let done = Tensor::cat(&columns, 2)?; // (Z, b, j)
            let row_j = done.narrow(1, j, 1)?; // (Z, 1, j)
            (a_col - matmul(&done, &transpose(&row_j)?)?)?
        };
        let pivot = v.narrow(1, j, 1)?.sqrt()?; // (Z, 1, 1)
        let below = rows.ge(j as u32)?.to_dtype(dtype)?.reshape((1, b, 1))?;
        columns.push(v.broadcast_div(&pivot)?.broadcast_mul(&below)?);
    }
    Ok(Tensor::cat(&columns, 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs;
    use candle_core::{Device, Var};

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
        // Sizes below, at and above the direct block size, and two recursion levels.
        for d in [1, 2, 4, 7, 8, 9, 12, 33] {
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
        let l = host::cholesky_lower(&values, 6).unwrap();
        let ours = cholesky(&spd).unwrap().to_vec3::<f64>().unwrap();
        for i in 0..6 {
            for j in 0..=i {
                assert!((ours[0][i][j] - l[i * 6 + j]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn cholesky_gradient_matches_central_differences() {
        // f(A) = Σ W ∘ chol(A) against central differences of f (only the lower triangle of
        // A is read, so each lower entry is perturbed alone); d = 11 crosses one recursion
        // level of the blocked factorization.
        let d = 11;
        let lower = random_lower(1, d, 5);
        let spd = gram(&lower).unwrap();
        let weights = random_lower(1, d, 6);
        let var = Var::from_tensor(&spd).unwrap();
        let loss = (cholesky(var.as_tensor()).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap();
        let grad = loss.backward().unwrap();
        let grad = grad.get(var.as_tensor()).unwrap().to_vec3::<f64>().unwrap();
        let value = |a: &Tensor| -> f64 {
            (cholesky(a).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let base = spd.to_vec3::<f64>().unwrap();
        let h = 1e-6;
        for (i, j) in [(0, 0), (5, 2), (10, 10), (10, 3), (7, 7)] {
            // Only the lower triangle is read: perturb A_ij (i ≥ j) alone.
            let mut plus = base.clone();
            let mut minus = base.clone();
            plus[0][i][j] += h;
            minus[0][i][j] -= h;
            let numeric = (value(&Tensor::new(plus, &Device::Cpu).unwrap())
                - value(&Tensor::new(minus, &Device::Cpu).unwrap()))
                / (2.0 * h);
            let analytic = grad[0][i][j];
            assert!(
                (numeric - analytic).abs() < 1e-6 * (1.0 + numeric.abs()),
                "({i}, {j}): {analytic} vs {numeric}"
            );
        }
    }

    #[test]
    fn read_scalar_keeps_the_working_dtype() {
        let x = Tensor::new(0.1f32, &Device::Cpu).unwrap();
        assert_eq!(read_scalar(&x).unwrap(), 0.1f32 as f64);
        let x = Tensor::new(0.1f64, &Device::Cpu).unwrap();
        assert_eq!(read_scalar(&x).unwrap(), 0.1);
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

    /// The triangle and diagonal selections read only what they keep: a NaN or ∞ elsewhere
    /// (an unused upper triangle) neither reaches the values (a 0/1 mask product made the
    /// dropped entries NaN, and the diagonal's row sums NaN) nor the gradients, which are 1 on
    /// the kept entries and exactly 0 on the others. Ranks 2, 3 and 4 (leading batch dims).
    #[test]
    fn selections_ignore_non_finite_entries_they_drop() {
        let values = [
            [2.0f32, f32::NAN, f32::INFINITY],
            [0.5, -3.0, f32::NEG_INFINITY],
            [1.5, 0.25, 4.0],
        ];
        for leading in [vec![], vec![2], vec![2, 1]] {
            let mut shape = leading.clone();
            shape.extend([3, 3]);
            let copies: usize = leading.iter().product();
            let m = Var::from_tensor(
                &Tensor::new(&values, &Device::Cpu)
                    .unwrap()
                    .broadcast_as(shape.as_slice())
                    .unwrap()
                    .contiguous()
                    .unwrap(),
            )
            .unwrap();
            let lower = tril(&m)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let strict = strict_tril(&m)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let diag = diagonal(&m)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let expect_lower = [2.0, 0.0, 0.0, 0.5, -3.0, 0.0, 1.5, 0.25, 4.0];
            let expect_strict = [0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 1.5, 0.25, 0.0];
            assert_eq!(lower, expect_lower.repeat(copies), "{shape:?}");
            assert_eq!(strict, expect_strict.repeat(copies), "{shape:?}");
            assert_eq!(diag, [2.0, -3.0, 4.0].repeat(copies), "{shape:?}");
            let loss = ((tril(&m).unwrap().sum_all().unwrap()
                + strict_tril(&m).unwrap().sum_all().unwrap())
            .unwrap()
                + diagonal(&m).unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            let grad = grads
                .get(&m)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // tril + strict_tril + diagonal: 2 on the diagonal, 2 below, 0 above.
            let expect_grad = [2.0, 0.0, 0.0, 2.0, 2.0, 0.0, 2.0, 2.0, 2.0];
            assert_eq!(grad, expect_grad.repeat(copies), "{shape:?}");
        }
    }

    /// Candle's `log_sum_exp` shifts by the slice's maximum, so a slice of −∞ alone gave
    /// `log Σ exp(−∞ − (−∞))` = NaN (a mixture's log-density of a far-away sample);
    /// [`log_sum_exp`] gives −∞ there, as SciPy's `logsumexp`, and +∞ for a slice holding
    /// +∞. Expected values in closed form: `log(1 + 3) = ln 4`, `log(e^1000 + 3e^1000) =
    /// 1000 + ln 4`; the gradient of a finite row is its softmax, `(1/4, 3/4, 0)`.
    fn log_sum_exp_of_minus_infinity_is_minus_infinity(device: &Device) -> Result<()> {
        let (inf, ln3, ln4) = (f64::INFINITY, 3f64.ln(), 4f64.ln());
        let rows = [
            [-inf, -inf, -inf],
            [0.0, ln3, -inf],
            [1000.0, 1000.0 + ln3, -inf],
            [inf, 0.0, -inf],
        ];
        let expected = [-inf, ln4, 1000.0 + ln4, inf];
        let dtypes = crate::testing::float_dtypes(device)
            .into_iter()
            .chain([DType::F16, DType::BF16]);
        for dtype in dtypes {
            // f64: host values, cast on the CPU to `dtype` before moving to `device`.
            let t = Tensor::new(&rows, &Device::Cpu)?.to_dtype(dtype)?;
            let t = Var::from_tensor(&t.to_device(device)?)?;
            let got = log_sum_exp(t.as_tensor(), 1)?;
            assert_eq!(got.dtype(), dtype);
            // f64: read back to the host first, widened there.
            let got = got
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            // Rows 1 and 2 in f16 and bf16: 1000 + ln 3 rounds to a few units of 1000's ulp.
            let tol = match dtype {
                DType::F64 => 1e-12,
                DType::F32 => 1e-4,
                _ => 4.0,
            };
            for (row, (g, e)) in got.iter().zip(expected).enumerate() {
                if e.is_infinite() {
                    assert_eq!(*g, e, "{dtype:?} row {row}");
                } else {
                    assert!((g - e).abs() <= tol, "{dtype:?} row {row}: {g} vs {e}");
                }
            }
            // The gradient of the finite rows (row 0's is undefined, NaN; row 3's too); row 2
            // only where 1000 + ln 3 is not rounded to 1000 (bf16's ulp there is 4).
            let finite = if matches!(dtype, DType::F16 | DType::BF16) {
                1
            } else {
                2
            };
            let loss = log_sum_exp(t.as_tensor(), 1)?
                .narrow(0, 1, finite)?
                .sum_all()?;
            let grads = loss.backward()?;
            let grad = grads
                .get(t.as_tensor())
                .ok_or_else(|| GaussError::data("log_sum_exp test", "no gradient for t"))?
                .narrow(0, 1, finite)?
                .to_device(&Device::Cpu)?
                // f64: cast on the host.
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?;
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-2 };
            for row in grad {
                for (g, e) in row.iter().zip([0.25, 0.75, 0.0]) {
                    assert!((g - e).abs() <= tol, "{dtype:?} gradient {g} vs {e}");
                }
            }
        }
        Ok(())
    }
    crate::test_device!(log_sum_exp_of_minus_infinity_is_minus_infinity);
}
