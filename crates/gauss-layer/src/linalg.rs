//! Batched linear algebra built only from Candle tensor ops (matmul, elementwise, narrow,
//! cat), so it runs and differentiates on CPU, CUDA and Metal alike.
//!
//! SKELETON: signatures are the contract other modules build on; bodies are being filled in.

use candle_core::Tensor;

use crate::error::Result;

/// Lower triangle (diagonal included) of a batch of square matrices.
///
/// # Shapes
/// `matrices`: (..., d, d) → (..., d, d)
pub fn tril(matrices: &Tensor) -> Result<Tensor> {
    let _ = matrices;
    todo!()
}

/// `(A + Aᵀ)/2` for a batch of square matrices.
///
/// # Shapes
/// `matrices`: (..., d, d) → (..., d, d)
pub fn symmetrize(matrices: &Tensor) -> Result<Tensor> {
    let _ = matrices;
    todo!()
}

/// Diagonals of a batch of square matrices.
///
/// # Shapes
/// `matrices`: (Z, d, d) → (Z, d)
pub fn diagonal(matrices: &Tensor) -> Result<Tensor> {
    let _ = matrices;
    todo!()
}

/// Traces of a batch of square matrices.
///
/// # Shapes
/// `matrices`: (Z, d, d) → (Z)
pub fn trace(matrices: &Tensor) -> Result<Tensor> {
    let _ = matrices;
    todo!()
}

/// Inverse of a batch of lower-triangular matrices with nonzero diagonal, by recursive 2×2
/// block inversion (matmuls only): differentiable on every device.
///
/// # Shapes
/// `lower`: (Z, d, d) → (Z, d, d)
pub fn tril_inverse(lower: &Tensor) -> Result<Tensor> {
    let _ = lower;
    todo!()
}

/// Cholesky factor `L` (lower, positive diagonal) of a batch of SPD matrices, column by
/// column in tensor ops: differentiable on every device. O(d) sequential steps.
///
/// # Shapes
/// `spd`: (Z, d, d) → (Z, d, d)
pub fn cholesky(spd: &Tensor) -> Result<Tensor> {
    let _ = spd;
    todo!()
}

/// Matrix exponential of a batch of symmetric matrices (scaling and squaring with a Taylor
/// polynomial, matmuls only): differentiable on every device.
///
/// # Shapes
/// `symmetric`: (Z, d, d) → (Z, d, d)
pub fn expm_symmetric(symmetric: &Tensor) -> Result<Tensor> {
    let _ = symmetric;
    todo!()
}
