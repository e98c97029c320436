//! The broadcast form over a (B, Z, d) difference tensor, in tensor ops: slow and memory
//! hungry, exact to rounding for any symmetric `P`. The test oracle, and what `direct` runs
//! where the expanded form would lose digits.

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::linalg;

/// `m2[b, z] = (x_b − c_z)ᵀ P_z (x_b − c_z)`, clamped at 0 like every other form (so a
/// precision that is not positive definite gives `g = 1`, never `g > 1`, in every kernel).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `precision`: (Z, d, d) → (B, Z)
pub(crate) fn portable(x: &Tensor, center: &Tensor, precision: &Tensor) -> Result<Tensor> {
    // (Z, B, d): the difference of every input to every center, neuron-major.
    let diff = x.unsqueeze(0)?.broadcast_sub(&center.unsqueeze(1)?)?;
    let weighted = linalg::matmul(&diff, precision)?;
    super::clamp_at_zero(&(weighted * diff)?.sum(D::Minus1)?.t()?)
}
