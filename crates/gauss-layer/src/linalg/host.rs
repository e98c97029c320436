//! Host-side linear algebra in f64 with `faer`: symmetric eigendecompositions and Cholesky
//! factorizations of single d×d blocks, and the moves of (Z, d, d) batches between a device
//! and the host.
//!
//! Everything here runs on the CPU. Tensors on another device are copied to the CPU *first*
//! and only then widened to f64 (Metal has no f64), and results are rounded to the working
//! dtype on the CPU before they move back, so every device receives the same bits.

use candle_core::{DType, Device, Tensor};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use rayon::prelude::*;

use crate::error::{GaussError, Result};

/// One d×d block on the host, f64 (the type the density and mixture code hold blocks in, so
/// that faer is named only here).
pub(crate) type HostMatrix = Mat<f64>;

/// Copies a (Z, d, d) float tensor to the host as f64, returning (Z, d, row-major values).
pub(crate) fn to_host_matrices(matrices: &Tensor, what: &str) -> Result<(usize, usize, Vec<f64>)> {
    let dims = matrices.dims();
    if dims.len() != 3 || dims[1] != dims[2] {
        return Err(GaussError::shape(what, "(Z, d, d)", dims));
    }
    // Every caller takes precision or covariance matrices: an integer tensor is a mistake
    // the f64 read would hide.
    crate::error::check_float_dtype(what, matrices.dtype())?;
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

/// A failure of the eigensolver on `neuron`'s matrix, typed as faer types its own.
fn eigen_failure(what: &str, neuron: usize, reason: String) -> GaussError {
    GaussError::Numerical {
        what: format!("neuron {neuron}: {what}"),
        reason,
    }
}

/// Refuses a matrix with NaN or infinite entries (faer's eigensolvers would loop or return
/// garbage on them).
fn check_finite_matrix(matrix: &Mat<f64>, what: &str, neuron: usize) -> Result<()> {
    if (0..matrix.nrows()).all(|i| (0..matrix.ncols()).all(|j| matrix[(i, j)].is_finite())) {
        return Ok(());
    }
    Err(eigen_failure(
        what,
        neuron,
        "the matrix holds NaN or infinite entries".into(),
    ))
}

/// The eigenvalues of `neuron`'s symmetric matrix, without eigenvectors (a fraction of the
/// cost), with the same checks as [`symmetric_eigen`]; ascending.
pub(crate) fn symmetric_eigenvalues(matrix: &Mat<f64>, neuron: usize) -> Result<Vec<f64>> {
    let what = "symmetric eigenvalues";
    check_finite_matrix(matrix, what, neuron)?;
    if matrix.nrows() == 2 {
        return Ok(symmetric_eigen_2x2(matrix).0.to_vec());
    }
    matrix
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| eigen_failure(what, neuron, format!("faer did not converge: {e:?}")))
}

/// Eigenvalues (ascending) and eigenvectors (columns) of `neuron`'s symmetric matrix; a
/// failure ([`GaussError::Numerical`]) names the neuron.
///
/// 2×2 matrices take the closed form of [`symmetric_eigen_2x2`]: faer 0.24 loses the small
/// eigenvalue of a 2×2 block to the large one's rounding (0 for diag(1e-17, 1), 1.0000334e-12
/// for diag(1e-12, 1)), which its 3×3 path does not, so valid 2-D covariances were refused as
/// singular and the eigenvalue-based parameterizations (expm, lowrank) lost digits in d = 2
/// only.
pub(crate) fn symmetric_eigen(matrix: &Mat<f64>, neuron: usize) -> Result<(Vec<f64>, Mat<f64>)> {
    let what = "symmetric eigendecomposition";
    check_finite_matrix(matrix, what, neuron)?;
    if matrix.nrows() == 2 {
        let (values, vectors) = symmetric_eigen_2x2(matrix);
        return Ok((values.to_vec(), Mat::from_fn(2, 2, |i, j| vectors[i][j])));
    }
    let evd = matrix
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| eigen_failure(what, neuron, format!("faer did not converge: {e:?}")))?;
    let s = evd.S().column_vector();
    let values = (0..matrix.nrows()).map(|i| s[i]).collect();
    Ok((values, evd.U().to_owned()))
}

/// `2^e` for `e` in [-1022, 1023], exactly (built from its bits).
fn power_of_two(e: i32) -> f64 {
    f64::from_bits(((1023 + e) as u64) << 52)
}

/// Eigenvalues (ascending) and unit eigenvectors (`vectors[i][j]`: row i of column j, the
/// column of eigenvalue j) of the symmetric 2×2 matrix `[[a, b], [b, c]]` (its lower
/// triangle is read), accurate where faer's are not (see [`symmetric_eigen`]); the entries
/// must be finite.
///
/// LAPACK's `dlaev2`: the eigenvalue of larger magnitude is `(a + c ± √((a − c)² + 4b²)) / 2`
/// with the sign of `a + c` (no cancellation), the rotation is built from the better
/// conditioned of its two formulas. The other eigenvalue is `det / rt1`, with the
/// determinant `a·c − b²` by Kahan's fused difference of products: accurate to a few ulps
/// even where `a·c` and `b²` agree to many digits (a rotated ill-conditioned block), where
/// `dlaev2`'s own `(a/rt1)·c − (b/rt1)·b` loses them all. The matrix is first scaled by a
/// power of two (exact) so that its largest entry is near 1, so that neither `a·c` nor
/// `b²` overflows or underflows before the eigenvalues themselves would.
pub(crate) fn symmetric_eigen_2x2(matrix: &Mat<f64>) -> ([f64; 2], [[f64; 2]; 2]) {
    let (a, b, c) = (matrix[(0, 0)], matrix[(1, 0)], matrix[(1, 1)]);
    if b == 0.0 {
        // Diagonal (the zero matrix too): the spectrum is the diagonal itself, exactly.
        return if a <= c {
            ([a, c], [[1.0, 0.0], [0.0, 1.0]])
        } else {
            ([c, a], [[0.0, 1.0], [1.0, 0.0]])
        };
    }
    let largest = a.abs().max(b.abs()).max(c.abs());
    // The binary exponent of `largest`, kept where both 2^-e and 2^e are normal numbers.
    let exponent = (largest.log2().floor() as i32).clamp(-1000, 1000);
    let (down, up) = (power_of_two(-exponent), power_of_two(exponent));
    let (a, b, c) = (a * down, b * down, c * down);

    let sum = a + c;
    let difference = a - c;
    let two_b = b + b;
    // √((a − c)² + 4b²) without overflow (the entries are at most 2 in magnitude now).
    let root = difference.hypot(two_b);
    let rt1 = if sum < 0.0 {
        0.5 * (sum - root)
    } else {
        0.5 * (sum + root)
    };
    // |rt1| ≥ |b| > 0.
    let products = b * b;
    let product_error = b.mul_add(-b, products); // b² − products, exactly
    let determinant = a.mul_add(c, -products) + product_error;
    let rt2 = determinant / rt1;

    // The unit eigenvector (cs, sn) of rt1, as dlaev2 builds it.
    let (ratio_term, sgn2) = if difference >= 0.0 {
        (difference + root, 1.0)
    } else {
        (difference - root, -1.0)
    };
    let (mut cs, mut sn) = if ratio_term.abs() > two_b.abs() {
        let ct = -two_b / ratio_term;
        let sn = 1.0 / ct.mul_add(ct, 1.0).sqrt();
        (ct * sn, sn)
    } else if two_b == 0.0 {
        (1.0, 0.0)
    } else {
        let tn = -ratio_term / two_b;
        let cs = 1.0 / tn.mul_add(tn, 1.0).sqrt();
        (cs, tn * cs)
    };
    let sgn1 = if sum < 0.0 { -1.0 } else { 1.0 };
    if sgn1 == sgn2 {
        (cs, sn) = (-sn, cs);
    }
    // (cs, sn) belongs to rt1 and (−sn, cs) to rt2.
    let (rt1, rt2) = (rt1 * up, rt2 * up);
    if rt2 <= rt1 {
        ([rt2, rt1], [[-sn, cs], [cs, sn]])
    } else {
        ([rt1, rt2], [[cs, -sn], [sn, cs]])
    }
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

/// Row-major `a · b` of d×d blocks, by faer's blocked SIMD matmul (sequential: the callers
/// are parallel over neurons already).
pub(crate) fn product(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(&mut out, d, d),
        Accum::Replace,
        MatRef::from_row_major_slice(a, d, d),
        MatRef::from_row_major_slice(b, d, d),
        1.0,
        Par::Seq,
    );
    out
}

/// Row-major transpose of a d×d block.
pub(crate) fn transpose(a: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            out[j * d + i] = a[i * d + j];
        }
    }
    out
}

/// The inverse of a lower-triangular block with nonzero diagonal (row-major in and out; the
/// strict upper triangle of the result is zero), by faer's blocked triangular inverse.
pub(crate) fn lower_inverse(lower: &[f64], d: usize) -> Vec<f64> {
    let mut inverse = vec![0f64; d * d];
    lower_inverse_into(&mut inverse, lower, d);
    inverse
}

/// [`lower_inverse`] into `inverse` (row-major d×d), in the block's own dtype (the fused
/// `tril_inverse` op runs f32 blocks in f32). The strict upper triangle of `lower` is never
/// read; that of `inverse` is written 0.
pub(crate) fn lower_inverse_into<T: faer::traits::ComplexField + Copy>(
    inverse: &mut [T],
    lower: &[T],
    d: usize,
) {
    faer::linalg::triangular_inverse::invert_lower_triangular(
        MatMut::from_row_major_slice_mut(inverse, d, d),
        MatRef::from_row_major_slice(lower, d, d),
        Par::Seq,
    );
    // faer leaves the strict upper triangle of the destination untouched.
    for i in 0..d {
        for j in i + 1..d {
            inverse[i * d + j] = T::zero_impl();
        }
    }
}

/// [`lower_inverse_into`] for each of `neurons` row-major d×d blocks, in parallel over
/// the blocks.
pub(crate) fn lower_inverse_batch<T: faer::traits::ComplexField + Copy + Send + Sync>(
    lower: &[T],
    neurons: usize,
    d: usize,
) -> Vec<T> {
    let block = d * d;
    let mut out = vec![T::zero_impl(); neurons * block];
    if block == 0 {
        return out;
    }
    out.par_chunks_mut(block)
        .enumerate()
        .for_each(|(n, inverse)| {
            lower_inverse_into(inverse, &lower[n * block..(n + 1) * block], d)
        });
    out
}

/// Solves `L X = B` in place for a lower-triangular `L` (row-major d×d, its strict upper
/// triangle never read) and `B` (row-major d×k, overwritten by `X`).
pub(crate) fn solve_lower_in_place(lower: &[f64], rhs: &mut [f64], d: usize, k: usize) {
    faer::linalg::triangular_solve::solve_lower_triangular_in_place(
        MatRef::from_row_major_slice(lower, d, d),
        MatMut::from_row_major_slice_mut(rhs, d, k),
        Par::Seq,
    );
}

/// Solves `Lᵀ X = B` in place for the same `L` as [`solve_lower_in_place`] (`Lᵀ` is the
/// upper-triangular transpose view, nothing is copied).
pub(crate) fn solve_lower_transpose_in_place(lower: &[f64], rhs: &mut [f64], d: usize, k: usize) {
    faer::linalg::triangular_solve::solve_upper_triangular_in_place(
        MatRef::from_row_major_slice(lower, d, d).transpose(),
        MatMut::from_row_major_slice_mut(rhs, d, k),
        Par::Seq,
    );
}

/// `scale · A Bᵀ` (row-major d×d) of two row-major d×k blocks.
pub(crate) fn scaled_outer_product(
    a: &[f64],
    b: &[f64],
    d: usize,
    k: usize,
    scale: f64,
) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(&mut out, d, d),
        Accum::Replace,
        MatRef::from_row_major_slice(a, d, k),
        MatRef::from_row_major_slice(b, d, k).transpose(),
        scale,
        Par::Seq,
    );
    out
}

/// `tril(Mᵀ M Mᵀ)` of a lower-triangular block `M = L⁻¹` (row-major in and out; the strict
/// upper triangle of the result is zero): `−½ ∂‖L⁻¹‖²_F / ∂L`, the λ-loss's `tr Σ` gradient.
/// Both products keep to the triangles they need (`Σ = Mᵀ M` by its lower half, then the
/// lower half of `Σ Mᵀ` with `Mᵀ` upper triangular): about `d³/3` multiply-adds where two dense
/// products take `2d³`.
pub(crate) fn tril_covariance_times_inverse_transpose(m: &[f64], d: usize) -> Vec<f64> {
    let inverse = MatRef::from_row_major_slice(m, d, d);
    let mut covariance = Mat::<f64>::zeros(d, d);
    triangular::matmul(
        covariance.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        inverse.transpose(),
        BlockStructure::TriangularUpper,
        inverse,
        BlockStructure::TriangularLower,
        1.0,
        Par::Seq,
    );
    for j in 0..d {
        for i in 0..j {
            covariance[(i, j)] = covariance[(j, i)];
        }
    }
    let mut out = vec![0f64; d * d];
    triangular::matmul(
        MatMut::from_row_major_slice_mut(&mut out, d, d),
        BlockStructure::TriangularLower,
        Accum::Replace,
        covariance.as_ref(),
        BlockStructure::Rectangular,
        inverse.transpose(),
        BlockStructure::TriangularUpper,
        1.0,
        Par::Seq,
    );
    out
}

/// The smallest eigenvalue of a symmetric matrix (NaN for an empty one).
pub(crate) fn smallest_eigenvalue(matrix: &Mat<f64>, neuron: usize) -> Result<f64> {
    Ok(symmetric_eigenvalues(matrix, neuron)?
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
pub(crate) fn raise_eigenvalues(matrix: &Mat<f64>, lowest: f64, neuron: usize) -> Result<Mat<f64>> {
    let d = matrix.nrows();
    let (values, vectors) = symmetric_eigen(matrix, neuron)?;
    let raised = from_eigen(&values, &vectors, |l| l.max(lowest));
    Ok(Mat::from_fn(d, d, |i, j| raised[i * d + j]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix faer must not see (a NaN entry) is a typed failure naming the neuron, from
    /// both eigensolvers and the helpers over them.
    #[test]
    fn eigen_failures_name_the_neuron() {
        let mut values = vec![2.0, 0.0, 0.0, 2.0];
        values[1] = f64::NAN;
        let matrix = symmetric_block(&values, 2);
        let failures = [
            symmetric_eigen(&matrix, 3).map(|_| ()),
            symmetric_eigenvalues(&matrix, 3).map(|_| ()),
            smallest_eigenvalue(&matrix, 3).map(|_| ()),
            raise_eigenvalues(&matrix, 1.0, 3).map(|_| ()),
        ];
        for failure in failures {
            match failure {
                Err(GaussError::Numerical { what, reason }) => {
                    assert!(what.starts_with("neuron 3: "), "{what}");
                    assert!(reason.contains("NaN"), "{reason}");
                }
                other => panic!("expected a Numerical error naming neuron 3, got {other:?}"),
            }
        }
        // The same matrix without the NaN passes.
        let fine = symmetric_block(&[2.0, 0.0, 0.0, 2.0], 2);
        assert_eq!(symmetric_eigenvalues(&fine, 3).unwrap(), vec![2.0, 2.0]);
    }

    /// Relative error of `got` against `expected`.
    fn relative(got: f64, expected: f64) -> f64 {
        ((got - expected) / expected).abs()
    }

    /// Diagonal 2×2 blocks have their diagonal as spectrum, exactly, and the axes as
    /// eigenvectors, at every condition number, in either order and of either sign; faer
    /// 0.24 gave 0 for diag(1e-17, 1) and 1.0000334e-12 for diag(1e-12, 1).
    #[test]
    fn two_by_two_diagonal_spectra_are_exact() {
        for small in [1e-8, 1e-12, 1e-17, 1e-20, 3e-300, -1e-17] {
            for (big, scale) in [(1.0, 1.0), (7e9, 1.0), (1.0, 1e250), (1.0, 1e-250)] {
                let (small, big) = (small * scale, big * scale);
                for diagonal in [[small, big], [big, small]] {
                    let matrix = symmetric_block(&[diagonal[0], 0.0, 0.0, diagonal[1]], 2);
                    let (values, vectors) = symmetric_eigen(&matrix, 0).unwrap();
                    let mut expected = diagonal;
                    expected.sort_by(f64::total_cmp);
                    assert_eq!(values, expected, "diag{diagonal:?}");
                    assert_eq!(symmetric_eigenvalues(&matrix, 0).unwrap(), expected);
                    assert_eq!(smallest_eigenvalue(&matrix, 0).unwrap(), expected[0]);
                    // Column j is the axis of eigenvalue j, up to its sign.
                    for (j, value) in expected.iter().enumerate() {
                        let axis = diagonal.iter().position(|v| v == value).unwrap();
                        assert_eq!(vectors[(axis, j)].abs(), 1.0, "diag{diagonal:?}");
                        assert_eq!(vectors[(1 - axis, j)], 0.0, "diag{diagonal:?}");
                    }
                }
            }
        }
    }

    /// Rotated ill-conditioned 2×2 blocks with exactly known spectra: the Fibonacci powers
    /// `Q^k = [[F(k+1), F(k)], [F(k), F(k−1)]]` of `Q = [[1, 1], [1, 0]]` hold integers (exact
    /// in f64 up to k = 78), have determinant (−1)^k (Cassini's identity) and eigenvalues
    /// φ^k and ψ^k (ψ = −1/φ), with `Q`'s eigenvectors (φ, 1) and (1, −φ). For even k the
    /// spectrum is {1/λ, λ}, λ = (L + √(L² − 4))/2 with L = F(k+1) + F(k−1) the trace: the
    /// condition number λ² reaches 7.9e20 at k = 50 and 1.3e29 at k = 70. faer's small
    /// eigenvalue erred by about 1e-16·λ (absolute), so relatively by up to 1e13 there.
    #[test]
    fn two_by_two_rotated_spectra_match_the_fibonacci_closed_form() {
        let phi = (1.0 + 5f64.sqrt()) / 2.0;
        let mut fibonacci = vec![0f64, 1.0];
        while fibonacci.len() < 80 {
            let n = fibonacci.len();
            fibonacci.push(fibonacci[n - 1] + fibonacci[n - 2]);
        }
        for k in [2usize, 10, 20, 30, 40, 50, 60, 70] {
            // Powers of two keep the entries exact and scale the spectrum exactly.
            for scale in [1.0, 2f64.powi(-60), 2f64.powi(80)] {
                let (a, b, c) = (fibonacci[k + 1], fibonacci[k], fibonacci[k - 1]);
                let block = [a * scale, b * scale, b * scale, c * scale];
                let matrix = symmetric_block(&block, 2);
                let (values, vectors) = symmetric_eigen(&matrix, 0).unwrap();
                let trace = a + c;
                let big = 0.5 * (trace + (trace * trace - 4.0).sqrt());
                let expected = [scale / big, scale * big];
                for j in 0..2 {
                    let error = relative(values[j], expected[j]);
                    assert!(
                        error < 4e-16,
                        "k {k}, scale {scale:e}: eigenvalue {j} {} vs {}, relative error {error:e}",
                        values[j],
                        expected[j]
                    );
                }
                assert_eq!(symmetric_eigenvalues(&matrix, 0).unwrap(), values);
                // Eigenvectors: unit, orthogonal, and along (1, −φ) and (φ, 1).
                let norm = (1.0 + phi * phi).sqrt();
                let exact = [[1.0 / norm, -phi / norm], [phi / norm, 1.0 / norm]];
                for (j, direction) in exact.iter().enumerate() {
                    let (x, y) = (vectors[(0, j)], vectors[(1, j)]);
                    assert!(
                        (x.hypot(y) - 1.0).abs() < 4e-16,
                        "k {k}: column {j} not unit"
                    );
                    let cosine = (x * direction[0] + y * direction[1]).abs();
                    assert!(
                        1.0 - cosine < 4e-16,
                        "k {k}: column {j} off by {:e}",
                        1.0 - cosine
                    );
                }
                let dot = vectors[(0, 0)] * vectors[(0, 1)] + vectors[(1, 0)] * vectors[(1, 1)];
                assert!(dot.abs() < 4e-16, "k {k}: columns not orthogonal ({dot:e})");
            }
        }
    }

    /// Indefinite and negative 2×2 blocks keep the ascending order, and a block with both
    /// eigenvalues equal (a multiple of the identity, or zero) gives the axes.
    #[test]
    fn two_by_two_signs_and_ties() {
        // [[1, 2], [2, −2]]: eigenvalues −3 and 2 (trace −1, determinant −6).
        let (values, _) = symmetric_eigen(&symmetric_block(&[1.0, 2.0, 2.0, -2.0], 2), 0).unwrap();
        assert!(
            relative(values[0], -3.0) < 4e-16 && relative(values[1], 2.0) < 4e-16,
            "{values:?}"
        );
        // [[−5, 0], [0, −1e-17]].
        let (values, _) =
            symmetric_eigen(&symmetric_block(&[-5.0, 0.0, 0.0, -1e-17], 2), 0).unwrap();
        assert_eq!(values, vec![-5.0, -1e-17]);
        for diagonal in [3.0, 0.0] {
            let block = symmetric_block(&[diagonal, 0.0, 0.0, diagonal], 2);
            let (values, vectors) = symmetric_eigen(&block, 0).unwrap();
            assert_eq!(values, vec![diagonal, diagonal]);
            assert_eq!(vectors[(0, 0)].abs() + vectors[(1, 1)].abs(), 2.0);
        }
    }

    /// The triangular products against the dense definition `tril(Mᵀ M Mᵀ)`, summed term by
    /// term here, at sizes below, at and above faer's blocking thresholds.
    #[test]
    fn tril_covariance_times_inverse_transpose_matches_the_dense_products() {
        for d in [1usize, 2, 5, 16, 33, 64, 97] {
            let m: Vec<f64> = (0..d * d)
                .map(|k| {
                    let (i, j) = (k / d, k % d);
                    if j > i {
                        0.0
                    } else if i == j {
                        1.0 + 0.1 * (i % 7) as f64
                    } else {
                        ((k * 7919) % 211) as f64 / 211.0 - 0.5
                    }
                })
                .collect();
            let got = tril_covariance_times_inverse_transpose(&m, d);
            let at = |i: usize, j: usize| m[i * d + j];
            let mut worst = 0f64;
            for i in 0..d {
                for j in 0..d {
                    let expected = if j > i {
                        0.0
                    } else {
                        // (Mᵀ M Mᵀ)_ij = Σ_k Σ_l M_ki M_kl M_jl
                        let mut sum = 0.0;
                        for k in 0..d {
                            for l in 0..d {
                                sum += at(k, i) * at(k, l) * at(j, l);
                            }
                        }
                        sum
                    };
                    worst = worst.max((got[i * d + j] - expected).abs() / (1.0 + expected.abs()));
                }
            }
            assert!(worst < 1e-12, "d {d}: relative error {worst:e}");
        }
    }
}
