//! Expanded symmetric form `m2 = <x⊗x, P_z> - 2 x·(P_z c_z) + c_zᵀ P_z c_z` over the
//! d(d+1)/2 distinct products of a symmetric `P` (DESIGN §4), as Candle tensor ops (every
//! device, autograd for free).
//!
//! Half the multiply-adds of the projected form and no (B, Z, d) intermediate, but the three
//! terms cancel when the inputs and centers sit far from each other's scale: inputs and
//! centers are shifted by the mean center first and `m2` is clamped at 0.
//! [`expanded_is_accurate`] is the cheap check the automatic choice uses.

use candle_core::{DType, Tensor, D};

use crate::error::{GaussError, Result};

fn check_shapes(x: &Tensor, center: &Tensor, precision: &Tensor) -> Result<(usize, usize)> {
    let &[_, dim] = x.dims() else {
        return Err(GaussError::shape("input x", "(batch, d)", x.dims()));
    };
    let &[neurons, center_dim] = center.dims() else {
        return Err(GaussError::shape("center", "(Z, d)", center.dims()));
    };
    if center_dim != dim {
        return Err(GaussError::shape(
            "center",
            format!("({neurons}, {dim})"),
            center.dims(),
        ));
    }
    if precision.dims() != [neurons, dim, dim] {
        return Err(GaussError::shape(
            "precision",
            format!("({neurons}, {dim}, {dim})"),
            precision.dims(),
        ));
    }
    Ok((neurons, dim))
}

/// Indices of the upper triangle `i <= j` of a (d, d) matrix: rows, columns, the flat index
/// `i·d + j` and the transposed flat index `j·d + i`.
fn upper_triangle(dim: usize) -> [Vec<u32>; 4] {
    let mut out: [Vec<u32>; 4] = Default::default();
    for i in 0..dim {
        for j in i..dim {
            out[0].push(i as u32);
            out[1].push(j as u32);
            out[2].push((i * dim + j) as u32);
            out[3].push((j * dim + i) as u32);
        }
    }
    out
}

/// Squared Mahalanobis distances in the expanded symmetric form, clamped at 0.
///
/// `precision` need not be exactly symmetric: its symmetric part is used.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `precision`: (Z, d, d) → (B, Z)
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gauss_layer::kernels::expanded::mahalanobis_sq_expanded;
/// let x = Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?;
/// let c = Tensor::new(&[[0.0f64, 0.0]], &Device::Cpu)?;
/// let p = Tensor::new(&[[[2.0f64, 0.0], [0.0, 1.0]]], &Device::Cpu)?;
/// let m2 = mahalanobis_sq_expanded(&x, &c, &p)?.to_vec2::<f64>()?;
/// assert!((m2[0][0] - 6.0).abs() < 1e-12); // 2·1² + 1·2²
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn mahalanobis_sq_expanded(x: &Tensor, center: &Tensor, precision: &Tensor) -> Result<Tensor> {
    let (neurons, dim) = check_shapes(x, center, precision)?;
    let device = x.device();
    // m2 does not change when x and c move together; the shift only reduces cancellation,
    // so it carries no gradient.
    let shift = center.detach().mean_keepdim(0)?;
    let xs = x.broadcast_sub(&shift)?;
    let cs = center.broadcast_sub(&shift)?;
    let [rows, cols, flat, flat_t] = upper_triangle(dim);
    let count = rows.len();
    let rows = Tensor::from_vec(rows, count, device)?;
    let cols = Tensor::from_vec(cols, count, device)?;
    let flat = Tensor::from_vec(flat, count, device)?;
    let flat_t = Tensor::from_vec(flat_t, count, device)?;
    // Off-diagonal products appear twice in <x⊗x, P>: (P_ij + P_ji)·1; diagonal: 2 P_ii · ½.
    let weight: Vec<f64> = (0..dim)
        .flat_map(|i| (i..dim).map(move |j| if i == j { 0.5 } else { 1.0 }))
        .collect();
    let weight = Tensor::from_vec(weight, (1, count), device)?.to_dtype(x.dtype())?;
    let products = xs
        .index_select(&rows, 1)?
        .mul(&xs.index_select(&cols, 1)?)?; // (B, T)
    let flat_precision = precision.reshape((neurons, dim * dim))?;
    let packed = flat_precision
        .index_select(&flat, 1)?
        .add(&flat_precision.index_select(&flat_t, 1)?)?
        .broadcast_mul(&weight)?; // (Z, T)
    let quadratic = products.matmul(&packed.t()?)?; // (B, Z)
    let symmetric = precision
        .add(&precision.transpose(1, 2)?)?
        .affine(0.5, 0.0)?;
    let precision_center = symmetric.matmul(&cs.unsqueeze(2)?)?.squeeze(2)?; // (Z, d)
    let linear = xs.matmul(&precision_center.t()?)?; // (B, Z)
    let constant = cs.mul(&precision_center)?.sum(D::Minus1)?; // (Z)
    let m2 = quadratic
        .sub(&linear.affine(2.0, 0.0)?)?
        .broadcast_add(&constant.unsqueeze(0)?)?;
    Ok(m2.relu()?)
}

/// Cheap conditioning check for the expanded form: its absolute rounding error in `m2` is a
/// few `eps · |c - c̄|² · ‖P‖` with inputs near the centers (the size of the terms that
/// cancel), where `‖P‖` bounds the sum of absolute values `|v|ᵀ|P||v|` per unit `|v|²`: the
/// smaller of the Frobenius and the ∞-norm. True when `max_z |c_z - c̄|²·‖P_z‖` stays under a
/// limit that keeps that error near `1e-5` in f32 (64) and `1e-10` in f64 (`1e5`) at the unit
/// width scale of `g = exp(-m2/2)`.
///
/// # Shapes
/// `center`: (Z, d), `precision`: (Z, d, d)
pub fn expanded_is_accurate(center: &Tensor, precision: &Tensor) -> Result<bool> {
    let limit = super::expanded_fused::scale_limit(center.dtype());
    let center = center.detach().to_dtype(DType::F64)?;
    let precision = precision.detach().to_dtype(DType::F64)?;
    let symmetric = precision
        .add(&precision.transpose(1, 2)?)?
        .affine(0.5, 0.0)?;
    let spread = center
        .broadcast_sub(&center.mean_keepdim(0)?)?
        .sqr()?
        .sum(D::Minus1)?; // (Z)
    let frobenius = symmetric.sqr()?.sum((1, 2))?.sqrt()?; // (Z)
    let infinity = symmetric.abs()?.sum(2)?.max(1)?; // (Z)
    let norm = frobenius.minimum(&infinity)?;
    let worst = spread.mul(&norm)?.max(0)?.to_scalar::<f64>()?;
    Ok(worst.is_finite() && worst <= limit)
}
