//! Gaussian activations and the FGN output, as pure functions over tensors.
//!
//! SKELETON: signatures are the contract other modules build on; bodies are being filled in.

use candle_core::Tensor;

use crate::error::Result;

/// `g = exp(-m2/2)`.
///
/// # Shapes
/// `mahalanobis_sq`: (B, Z) → (B, Z)
pub fn gaussian(mahalanobis_sq: &Tensor) -> Result<Tensor> {
    let _ = mahalanobis_sq;
    todo!()
}

/// Gating by the previous layer: `g · max_k prev_g[b, k]`.
///
/// # Shapes
/// `gaussian`: (B, Z), `prev_gaussian`: (B, K) → (B, Z)
pub fn gate(gaussian: &Tensor, prev_gaussian: &Tensor) -> Result<Tensor> {
    let _ = (gaussian, prev_gaussian);
    todo!()
}
