//! Gaussian activations and the FGN output, as pure functions over tensors.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::activation;
//! let m2 = Tensor::new(&[[0.0f64, 2.0]], &Device::Cpu)?;
//! let g = activation::gaussian(&m2)?.to_vec2::<f64>()?;
//! assert!((g[0][1] - (-1.0f64).exp()).abs() < 1e-15);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{Tensor, D};

use crate::error::{GaussError, Result};

/// `g = exp(-m2/2)`.
///
/// # Shapes
/// `mahalanobis_sq`: (B, Z) → (B, Z)
pub fn gaussian(mahalanobis_sq: &Tensor) -> Result<Tensor> {
    Ok((mahalanobis_sq * -0.5)?.exp()?)
}

/// Gating by the previous layer: `g · max_k prev_g[b, k]`.
///
/// # Shapes
/// `gaussian`: (B, Z), `prev_gaussian`: (B, K) → (B, Z)
pub fn gate(gaussian: &Tensor, prev_gaussian: &Tensor) -> Result<Tensor> {
    let (gd, pd) = (gaussian.dims(), prev_gaussian.dims());
    if gd.len() != 2 {
        return Err(GaussError::shape("gaussian", "(B, Z)", gd));
    }
    if pd.len() != 2 || pd[0] != gd[0] || pd[1] == 0 {
        return Err(GaussError::shape(
            "prev_g",
            format!("({}, K) with K >= 1", gd[0]),
            pd,
        ));
    }
    let strongest = prev_gaussian.max_keepdim(D::Minus1)?;
    Ok(gaussian.broadcast_mul(&strongest)?)
}
