//! Host-side linear algebra in f64 with `faer`: symmetric eigendecompositions and Cholesky
//! factorizations of single d×d blocks, and the moves of (Z, d, d) batches between a device
//! and the host.
//!
//! Everything here runs on the CPU. Tensors on another device are copied to the CPU *first*
//! and only then widened to f64 (Metal has no f64), and results are rounded to the working
//! dtype on the CPU before they move back, so every device receives the same bits.

use candle_core::{DType, Device, Tensor};
use faer::{Mat, Side};

use crate::error::{GaussError, Result};

/// Copies a (Z, d, d) tensor to the host as f64, returning (Z, d, row-major values).
pub(crate) fn to_host_matrices(matrices: &Tensor, what: &str) -> Result<(usize, usize, Vec<f64>)> {
    let dims = matrices.dims();
    if dims.len() != 3 || dims[1] != dims[2] {
        return Err(GaussError::shape(what, "(Z, d, d)", dims));
    }
    Ok((dims[0], dims[1], to_host_values(matrices)?))
}

/// The elements of any float tensor, row-major, as f64 on the host.
pub(crate) fn to_host_values(tensor: &Tensor) -> Result<Vec<f64>> {
    super::record_host_read("to_host_values", tensor);
    Ok(tensor
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

/// Builds a tensor of `dtype` on `device` from host f64 values (rounded on the CPU).
pub(crate) fn from_host(
    values: Vec<f64>,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// The symmetric part of one row-major d×d block as a faer matrix.
pub(crate) fn symmetric_block(values: &[f64], d: usize) -> Mat<f64> {
    Mat::from_fn(d, d, |i, j| 0.5 * (values[i * d + j] + values[j * d + i]))
}

/// The eigenvalues of a symmetric matrix, without eigenvectors (a fraction of the cost),
/// with the same checks as [`symmetric_eigen`].
pub(crate) fn symmetric_eigenvalues(matrix: &Mat<f64>) -> Result<Vec<f64>> {
    if !(0..matrix.nrows()).all(|i| (0..matrix.ncols()).all(|j| matrix[(i, j)].is_finite())) {
        return Err(GaussError::Numerical {
            what: "symmetric eigenvalues".into(),
            reason: "the matrix holds NaN or infinite entries".into(),
        });
    }
    matrix
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| GaussError::Numerical {
            what: "symmetric eigenvalues".into(),
            reason: format!("faer did not converge: {e:?}"),
        })
}

/// Eigenvalues (ascending) and eigenvectors (columns) of a symmetric matrix.
pub(crate) fn symmetric_eigen(matrix: &Mat<f64>) -> Result<(Vec<f64>, Mat<f64>)> {
    if !(0..matrix.nrows()).all(|i| (0..matrix.ncols()).all(|j| matrix[(i, j)].is_finite())) {
        return Err(GaussError::Numerical {
            what: "symmetric eigendecomposition".into(),
            reason: "the matrix holds NaN or infinite entries".into(),
        });
    }
    let evd = matrix
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| GaussError::Numerical {
            what: "symmetric eigendecomposition".into(),
            reason: format!("faer did not converge: {e:?}"),
        })?;
    let s = evd.S().column_vector();
    let values = (0..matrix.nrows()).map(|i| s[i]).collect();
    Ok((values, evd.U().to_owned()))
}

/// `U diag(f(λ)) Uᵀ` as row-major values.
pub(crate) fn from_eigen(
    eigenvalues: &[f64],
    eigenvectors: &Mat<f64>,
    map: impl Fn(f64) -> f64,
) -> Vec<f64> {
    let d = eigenvalues.len();
    let mapped: Vec<f64> = eigenvalues.iter().map(|&l| map(l)).collect();
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let v: f64 = (0..d)
                .map(|k| eigenvectors[(i, k)] * mapped[k] * eigenvectors[(j, k)])
                .sum();
            out[i * d + j] = v;
            out[j * d + i] = v;
        }
    }
    out
}

/// The lower Cholesky factor of a symmetric block (row-major), or `None` when it is not
/// positive definite.
pub(crate) fn cholesky_lower(block: &[f64], d: usize) -> Option<Vec<f64>> {
    let llt = symmetric_block(block, d).llt(Side::Lower).ok()?;
    let l = llt.L();
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            out[i * d + j] = l[(i, j)];
        }
    }
    Some(out)
}

/// The smallest eigenvalue of a symmetric matrix (NaN for an empty one).
pub(crate) fn smallest_eigenvalue(matrix: &Mat<f64>) -> Result<f64> {
    Ok(symmetric_eigenvalues(matrix)?
        .first()
        .copied()
        .unwrap_or(f64::NAN))
}

/// The inverse of a symmetric positive-definite matrix through its Cholesky factor
/// (symmetrized), or `None` when the factorization fails.
pub(crate) fn spd_inverse(matrix: &Mat<f64>) -> Option<Mat<f64>> {
    use faer::linalg::solvers::DenseSolveCore;
    let inverse = matrix.llt(Side::Lower).ok()?.inverse();
    let d = matrix.nrows();
    Some(Mat::from_fn(d, d, |i, j| {
        0.5 * (inverse[(i, j)] + inverse[(j, i)])
    }))
}

/// The diagonal of the lower Cholesky factor of a symmetric matrix, or `None` when it is not
/// positive definite.
pub(crate) fn cholesky_diagonal(matrix: &Mat<f64>) -> Option<Vec<f64>> {
    let llt = matrix.llt(Side::Lower).ok()?;
    let l = llt.L();
    Some((0..matrix.nrows()).map(|i| l[(i, i)]).collect())
}

/// `U diag(max(λ, lowest)) Uᵀ` of a symmetric matrix: its eigenvalues raised to `lowest`.
///
/// # Errors
/// [`GaussError::Numerical`] for a non-finite matrix or a failed eigendecomposition.
pub(crate) fn raise_eigenvalues(matrix: &Mat<f64>, lowest: f64) -> Result<Mat<f64>> {
    let d = matrix.nrows();
    let (values, vectors) = symmetric_eigen(matrix)?;
    let raised = from_eigen(&values, &vectors, |l| l.max(lowest));
    Ok(Mat::from_fn(d, d, |i, j| raised[i * d + j]))
}
