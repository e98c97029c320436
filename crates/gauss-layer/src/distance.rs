//! Squared Mahalanobis distances `m2[b, z] = (x_b - c_z)ᵀ P_z (x_b - c_z)` for B inputs ×
//! Z neurons × d dims: the functional core's hot path.
//!
//! Three forms, all pure tensor ops (every device, differentiable):
//! - [`mahalanobis_sq_naive`]: the (B, Z, d) broadcast, a test oracle;
//! - [`mahalanobis_sq_projected`]: one GEMM against the stacked factors (DESIGN §4);
//! - [`mahalanobis_sq_diagonal`]: diagonal precisions in matmul form.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::distance;
//! let x = Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?;
//! let center = Tensor::new(&[[0.0f64, 0.0]], &Device::Cpu)?;
//! let p = Tensor::new(&[[2.0f64, 3.0]], &Device::Cpu)?;
//! // 2·1² + 3·2² = 14
//! let m2 = distance::mahalanobis_sq_diagonal(&x, &center, &p)?;
//! assert!((m2.to_vec2::<f64>()?[0][0] - 14.0).abs() < 1e-12);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{Tensor, D};

use crate::error::{GaussError, Result};
use crate::linalg;

/// Checks `x` (B, d) and `center` (Z, d); returns (B, Z, d).
fn check_inputs(x: &Tensor, center: &Tensor) -> Result<(usize, usize, usize)> {
    let (xd, cd) = (x.dims(), center.dims());
    if cd.len() != 2 {
        return Err(GaussError::shape("center", "(Z, d)", cd));
    }
    if xd.len() != 2 || xd[1] != cd[1] {
        return Err(GaussError::shape("input x", format!("(B, {})", cd[1]), xd));
    }
    Ok((xd[0], cd[0], cd[1]))
}

fn check_matrices(what: &str, t: &Tensor, z: usize, d: usize) -> Result<()> {
    if t.dims() != [z, d, d] {
        return Err(GaussError::shape(
            what,
            format!("({z}, {d}, {d})"),
            t.dims(),
        ));
    }
    Ok(())
}

/// Broadcast form over a (B, Z, d) difference tensor. Slow and memory hungry: a test oracle.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `precision`: (Z, d, d) → (B, Z)
pub fn mahalanobis_sq_naive(x: &Tensor, center: &Tensor, precision: &Tensor) -> Result<Tensor> {
    let (_, z, d) = check_inputs(x, center)?;
    check_matrices("precision", precision, z, d)?;
    // (Z, B, d): the difference of every input to every center, neuron-major.
    let diff = x.unsqueeze(0)?.broadcast_sub(&center.unsqueeze(1)?)?;
    let weighted = linalg::matmul(&diff, precision)?;
    Ok((weighted * diff)?.sum(D::Minus1)?.t()?)
}

/// Projected form: `m2 = |F_zᵀ x_b - F_zᵀ c_z|²` with one GEMM of `x` against the factors
/// stacked side by side, for any factor with `P_z = F_z F_zᵀ`.
///
/// No (B, Z, d) difference tensor is built; the GEMM's (B, Z·d) output is the only large
/// intermediate.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `factor`: (Z, d, d) → (B, Z)
pub fn mahalanobis_sq_projected(x: &Tensor, center: &Tensor, factor: &Tensor) -> Result<Tensor> {
    let (b, z, d) = check_inputs(x, center)?;
    check_matrices("factor", factor, z, d)?;
    // stacked[i, z·d + k] = F_z[i, k], so (x · stacked)[b, z·d + k] = (F_zᵀ x_b)_k.
    let stacked = factor.permute((1, 0, 2))?.reshape((d, z * d))?;
    let projected = x.contiguous()?.matmul(&stacked)?.reshape((b, z, d))?;
    // (F_zᵀ c_z)ᵀ = c_zᵀ F_z, one small batched matmul.
    let projected_center = linalg::matmul(&center.unsqueeze(1)?, factor)?.squeeze(1)?;
    Ok(projected
        .broadcast_sub(&projected_center.unsqueeze(0)?)?
        .sqr()?
        .sum(D::Minus1)?)
}

/// Diagonal precision: `m2 = Σ_i p_zi (x_bi - c_zi)²` in B·Z·d work, no (B, Z, d) tensor:
/// `(x∘x) pᵀ − 2 x (p∘c)ᵀ + Σ_i p_zi c_zi²`, clamped at 0 against cancellation.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `diagonal`: (Z, d) → (B, Z)
pub fn mahalanobis_sq_diagonal(x: &Tensor, center: &Tensor, diagonal: &Tensor) -> Result<Tensor> {
    let (_, z, d) = check_inputs(x, center)?;
    if diagonal.dims() != [z, d] {
        return Err(GaussError::shape(
            "diagonal precision",
            format!("({z}, {d})"),
            diagonal.dims(),
        ));
    }
    let x = x.contiguous()?;
    let weighted_center = (diagonal * center)?;
    let quadratic = x.sqr()?.matmul(&diagonal.t()?)?;
    let cross = x.matmul(&weighted_center.t()?)?;
    let constant = (weighted_center * center)?.sum(D::Minus1)?.unsqueeze(0)?;
    Ok((quadratic - (cross * 2.0)?)?
        .broadcast_add(&constant)?
        .relu()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::relative_error;
    use candle_core::{DType, Device};

    #[test]
    fn the_three_forms_agree() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (6, 4), &dev).unwrap();
        let center = Tensor::randn(0f64, 1.0, (3, 4), &dev).unwrap();
        let raw = Tensor::randn(0f64, 1.0, (3, 4, 4), &dev).unwrap();
        let factor = linalg::tril(&raw).unwrap();
        let precision = linalg::gram(&factor).unwrap();
        let naive = mahalanobis_sq_naive(&x, &center, &precision).unwrap();
        let projected = mahalanobis_sq_projected(&x, &center, &factor).unwrap();
        assert!(relative_error(&projected, &naive).unwrap() < 1e-12);

        let p = raw
            .narrow(2, 0, 1)
            .unwrap()
            .squeeze(2)
            .unwrap()
            .exp()
            .unwrap();
        let diag = mahalanobis_sq_diagonal(&x, &center, &p).unwrap();
        let naive = mahalanobis_sq_naive(&x, &center, &linalg::diag_embed(&p).unwrap()).unwrap();
        assert!(relative_error(&diag, &naive).unwrap() < 1e-12);
    }

    #[test]
    fn wrong_width_is_a_shape_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        let center = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let p = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let err = mahalanobis_sq_diagonal(&x, &center, &p).unwrap_err();
        assert!(err.to_string().contains("(B, 4)"), "{err}");
    }
}
