//! Distance kernels and the automatic choice between them (DESIGN §4).
//!
//! SKELETON: a first dispatcher; the fused CPU kernels and the automatic choice land here.

use candle_core::Tensor;

use crate::config::DistanceKernel;
use crate::distance;
use crate::error::Result;
use crate::precision::Precision;

/// Squared Mahalanobis distances of `x` to every neuron, through the requested kernel.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d) → (B, Z)
pub fn mahalanobis_sq(
    x: &Tensor,
    center: &Tensor,
    precision: &Precision,
    kernel: DistanceKernel,
) -> Result<Tensor> {
    if let Some(diagonal) = precision.diagonal_precision()? {
        return distance::mahalanobis_sq_diagonal(x, center, &diagonal);
    }
    match (kernel, precision.factor()?) {
        (DistanceKernel::Naive, _) | (_, None) => {
            distance::mahalanobis_sq_naive(x, center, &precision.precision_matrix()?)
        }
        (_, Some(factor)) => distance::mahalanobis_sq_projected(x, center, &factor),
    }
}
