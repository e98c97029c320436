//! Squared Mahalanobis distances `m2[b, z] = (x_b - c_z)ᵀ P_z (x_b - c_z)` for B inputs ×
//! Z neurons × d dims: the functional core's hot path.
//!
//! SKELETON: signatures are the contract other modules build on; bodies are being filled in.

use candle_core::Tensor;

use crate::error::Result;

/// Broadcast form over a (B, Z, d) difference tensor. Slow and memory hungry: a test oracle.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `precision`: (Z, d, d) → (B, Z)
pub fn mahalanobis_sq_naive(x: &Tensor, center: &Tensor, precision: &Tensor) -> Result<Tensor> {
    let _ = (x, center, precision);
    todo!()
}

/// Projected form: `m2 = |F_zᵀ x_b - F_zᵀ c_z|²` with one GEMM of `x` against the factors
/// stacked side by side, for any factor with `P_z = F_z F_zᵀ`.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `factor`: (Z, d, d) → (B, Z)
pub fn mahalanobis_sq_projected(x: &Tensor, center: &Tensor, factor: &Tensor) -> Result<Tensor> {
    let _ = (x, center, factor);
    todo!()
}

/// Diagonal precision: `m2 = Σ_i p_zi (x_bi - c_zi)²` in B·Z·d work, no (B, Z, d) tensor.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `diagonal`: (Z, d) → (B, Z)
pub fn mahalanobis_sq_diagonal(x: &Tensor, center: &Tensor, diagonal: &Tensor) -> Result<Tensor> {
    let _ = (x, center, diagonal);
    todo!()
}
