//! The functional core under [`crate::GaussLayer`]: pure functions over tensors, as
//! `candle_nn::ops` sits under `candle_nn::Linear`.
//!
//! - [`mahalanobis_sq`]: squared Mahalanobis distances through the resolver (fused CPU ops
//!   where they apply), and [`mahalanobis_sq_portable`], the same in tensor ops only (what
//!   CUDA and Metal run), like candle's `op` / `op_slow` pairs; [`mahalanobis_sq_naive`]
//!   is the (B, Z, d) broadcast oracle.
//! - [`gaussian`] `g = exp(-m2/2)` and [`gate`] `g · max_k prev_g[k]`.
//! - [`log_prob_from_mahalanobis`] and [`log_normalizer`]: the normalized normal log-density
//!   from m² and `log det P` (what [`crate::GaussLayer::log_prob`] returns).
//! - [`tril`], [`tril_inverse`], [`diagonal`]: batched triangular helpers that the losses
//!   build on, differentiable on every device (`tril_inverse` is a Candle op with a
//!   closed-form backward on the CPU, faer per block, and on CUDA, the project's kernel;
//!   matmuls elsewhere).
//! - [`log_sum_exp`]: the stable log-sum-exp of the mixture densities and their NLL, −∞
//!   (not Candle's NaN) for a slice whose entries are all −∞.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::{ops, DistanceKernel, GaussLayerConfig, Parameterization, Precision};
//! let x = Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?;
//! let center = Tensor::new(&[[0.0f64, 0.0]], &Device::Cpu)?;
//! let config = GaussLayerConfig::with_parameterization(Parameterization::Diag);
//! // P = diag(e^ln2, e^ln3) = diag(2, 3): m2 = 2·1² + 3·2² = 14.
//! let raw = Tensor::new(&[[2f64.ln(), 3f64.ln()]], &Device::Cpu)?;
//! let precision = Precision::from_raw(raw, 2, &config)?;
//! let m2 = ops::mahalanobis_sq(&x, &center, &precision, DistanceKernel::Auto)?;
//! assert!((m2.to_vec2::<f64>()?[0][0] - 14.0).abs() < 1e-12);
//! let g = ops::gaussian(&m2)?.to_vec2::<f64>()?;
//! assert!((g[0][0] - (-7.0f64).exp()).abs() < 1e-15);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{Tensor, D};

use crate::config::DistanceKernel;
use crate::cpu::Sizes;
use crate::error::{check_device, check_dtype, check_float_dtype, GaussError, Result};
use crate::kernels;
use crate::precision::Precision;

pub use crate::linalg::{diagonal, log_sum_exp, tril, tril_inverse};

/// Checks x (B, d), center (Z, d) against the precision's Z and d: the one check of the
/// functional core's entry, whose sizes the kernels then take as given.
fn check_arguments(x: &Tensor, center: &Tensor, precision: &Precision) -> Result<Sizes> {
    let (z, d) = (precision.num_neurons(), precision.dim());
    if center.dims() != [z, d] {
        return Err(GaussError::shape(
            "center",
            format!("({z}, {d}) (the precision's neurons and inputs)"),
            center.dims(),
        ));
    }
    if x.rank() != 2 || x.dims()[1] != d {
        return Err(GaussError::shape(
            "input x",
            format!("(batch, {d})"),
            x.dims(),
        ));
    }
    // The parameters are checked against each other first, so that an input of another dtype
    // or device is the one blamed (not the center, which agrees with the precision).
    check_dtype(
        "precision raw tensor",
        precision.raw(),
        center.dtype(),
        "center",
    )?;
    check_dtype("input x", x, center.dtype(), "center and precision")?;
    check_device(
        "precision raw tensor",
        precision.raw(),
        center.device(),
        "center",
    )?;
    check_device("input x", x, center.device(), "center and precision")?;
    Ok(Sizes {
        batch: x.dims()[0],
        dim: d,
        neurons: z,
    })
}

/// Squared Mahalanobis distances `m2[b, z] = (x_b − c_z)ᵀ P_z (x_b − c_z)` through the
/// requested kernel, fused on the CPU where that applies (see the table in
/// `docs/design.md` §4).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d) → (B, Z)
///
/// # Errors
/// Shapes or dtypes that do not match the precision; tensors on different devices
/// ([`GaussError::DeviceMismatch`]); `Projected` for `direct` and `lowrank` (no square factor).
pub fn mahalanobis_sq(
    x: &Tensor,
    center: &Tensor,
    precision: &Precision,
    kernel: DistanceKernel,
) -> Result<Tensor> {
    let sizes = check_arguments(x, center, precision)?;
    kernels::mahalanobis_sq(sizes, x, center, precision, kernel, false)
}

/// [`mahalanobis_sq`] in tensor ops only (the portable forms CUDA and Metal run), on any
/// device: the twin the fused CPU ops are tested against.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d) → (B, Z)
///
/// # Errors
/// As [`mahalanobis_sq`].
pub fn mahalanobis_sq_portable(
    x: &Tensor,
    center: &Tensor,
    precision: &Precision,
    kernel: DistanceKernel,
) -> Result<Tensor> {
    let sizes = check_arguments(x, center, precision)?;
    kernels::mahalanobis_sq(sizes, x, center, precision, kernel, true)
}

/// The broadcast form over a (B, Z, d) difference tensor for precision matrices given
/// directly: slow and memory hungry, exact to rounding; a test oracle. Clamped at 0 like
/// every form.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `precision`: (Z, d, d) → (B, Z)
///
/// # Errors
/// Shapes that do not fit together; a dtype that is not a float; mixed dtypes or devices.
pub fn mahalanobis_sq_naive(x: &Tensor, center: &Tensor, precision: &Tensor) -> Result<Tensor> {
    let &[z, d] = center.dims() else {
        return Err(GaussError::shape("center", "(Z, d)", center.dims()));
    };
    if x.rank() != 2 || x.dims()[1] != d {
        return Err(GaussError::shape(
            "input x",
            format!("(batch, {d})"),
            x.dims(),
        ));
    }
    if precision.dims() != [z, d, d] {
        return Err(GaussError::shape(
            "precision",
            format!("({z}, {d}, {d})"),
            precision.dims(),
        ));
    }
    check_float_dtype("center", center.dtype())?;
    check_dtype("precision", precision, center.dtype(), "center")?;
    check_dtype("input x", x, center.dtype(), "center and precision")?;
    check_device("precision", precision, center.device(), "center")?;
    check_device("input x", x, center.device(), "center and precision")?;
    kernels::naive::portable(x, center, precision)
}

/// `g = exp(-m2/2)`.
///
/// # Shapes
/// `mahalanobis_sq`: any → the same
///
/// # Errors
/// [`GaussError::DType`] for a tensor of an integer dtype (Candle's `exp` panicked on it).
pub fn gaussian(mahalanobis_sq: &Tensor) -> Result<Tensor> {
    check_float_dtype("mahalanobis_sq", mahalanobis_sq.dtype())?;
    kernels::gaussian(mahalanobis_sq)
}

/// Gating by the previous layer: `g · max_k prev_g[b, k]`.
///
/// # Shapes
/// `gaussian`: (B, Z), `prev_gaussian`: (B, K) → (B, Z)
///
/// # Errors
/// Shapes that do not fit (a rank other than 2, another batch size, K = 0); a `gaussian` of
/// an integer dtype, a `prev_gaussian` of another dtype or device than `gaussian`.
pub fn gate(gaussian: &Tensor, prev_gaussian: &Tensor) -> Result<Tensor> {
    // Checked here: a mismatch was Candle's bare "dtype mismatch in mul".
    check_float_dtype("gaussian", gaussian.dtype())?;
    check_dtype("prev_g", prev_gaussian, gaussian.dtype(), "gaussian")?;
    check_device("prev_g", prev_gaussian, gaussian.device(), "gaussian")?;
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
    if gd[0] == 0 {
        // No rows to gate (and Candle's max over an empty tensor is an error).
        return Ok(gaussian.clone());
    }
    let strongest = prev_gaussian.max_keepdim(D::Minus1)?;
    Ok(gaussian.broadcast_mul(&strongest)?)
}

/// Flattens `x` (…, d) to (n, d); returns it with the leading dimensions. The one input
/// flattener of the crate (the layer's forward adds its rank ≥ 2 rule on top and checks the
/// shape itself, then calls [`flatten_checked`]); a (n, d) input comes back as it is, so a
/// strided one is not copied here.
pub(crate) fn flatten_leading(x: &Tensor, d: usize, what: &str) -> Result<(Tensor, Vec<usize>)> {
    match x.dims().split_last() {
        Some((&last, _)) if last == d => flatten_checked(x, d),
        _ => Err(GaussError::shape(what, format!("(…, {d})"), x.dims())),
    }
}

/// [`flatten_leading`] on an `x` whose shape the caller has checked (last dimension `d`):
/// reshapes only.
pub(crate) fn flatten_checked(x: &Tensor, d: usize) -> Result<(Tensor, Vec<usize>)> {
    let leading = x
        .dims()
        .split_last()
        .map_or(Vec::new(), |(_, l)| l.to_vec());
    if leading.len() == 1 {
        return Ok((x.clone(), leading));
    }
    let n = leading.iter().product::<usize>();
    Ok((x.reshape((n, d))?, leading))
}

/// `½·d·log 2π`, the normalizing constant of a d-dimensional normal.
pub fn log_normalizer(dim: usize) -> f64 {
    0.5 * dim as f64 * (2.0 * std::f64::consts::PI).ln()
}

/// `−m2/2 + ½·log det P − ½·d·log 2π`: the log-density from the squared Mahalanobis distance,
/// broadcasting `log_det_precision` over the leading (sample) dimension. The functional core
/// of [`crate::GaussLayer::log_prob`].
///
/// # Shapes
/// `mahalanobis_sq`: (B, Z), `log_det_precision`: (Z) → (B, Z)
///
/// # Errors
/// A tensor of a non-float dtype, or two of different dtypes ([`GaussError::DType`]); on
/// different devices ([`GaussError::DeviceMismatch`]); a `mahalanobis_sq` without a batch
/// dimension, or a `log_det_precision` whose shape is not a trailing part of
/// `mahalanobis_sq`'s after it ([`GaussError::Shape`]).
pub fn log_prob_from_mahalanobis(
    mahalanobis_sq: &Tensor,
    log_det_precision: &Tensor,
    dim: usize,
) -> Result<Tensor> {
    check_float_dtype("mahalanobis_sq", mahalanobis_sq.dtype())?;
    check_float_dtype("log_det_precision", log_det_precision.dtype())?;
    check_dtype(
        "log_det_precision",
        log_det_precision,
        mahalanobis_sq.dtype(),
        "mahalanobis_sq",
    )?;
    check_device(
        "log_det_precision",
        log_det_precision,
        mahalanobis_sq.device(),
        "mahalanobis_sq",
    )?;
    // Checked here: a mismatch was Candle's bare "shape mismatch in broadcast_add".
    let m2 = mahalanobis_sq.dims();
    if m2.is_empty() {
        return Err(GaussError::shape("mahalanobis_sq", "(batch, ...)", m2));
    }
    let log_det = log_det_precision.dims();
    if log_det.len() >= m2.len() || m2[m2.len() - log_det.len()..] != *log_det {
        return Err(GaussError::shape(
            "log_det_precision",
            format!(
                "{:?} or a trailing part of it (mahalanobis_sq's {m2:?} after its batch dimension)",
                &m2[1..]
            ),
            log_det,
        ));
    }
    Ok((mahalanobis_sq * -0.5)?
        .broadcast_add(&(log_det_precision * 0.5)?)?
        .affine(1.0, -log_normalizer(dim))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// log_det_precision must be the trailing dims of mahalanobis_sq (one value per neuron):
    /// Candle's broadcast error named neither argument.
    #[test]
    fn log_prob_from_mahalanobis_names_a_misshapen_log_det() {
        let device = candle_core::Device::Cpu;
        let m2 = Tensor::zeros((2, 3), candle_core::DType::F32, &device).unwrap();
        let error = log_prob_from_mahalanobis(
            &m2,
            &Tensor::zeros(4, candle_core::DType::F32, &device).unwrap(),
            2,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("log_det_precision") && error.contains("[3]") && error.contains("[4]"),
            "{error}"
        );
        // (Z) fits; (B, Z) does not: the first dimension is the batch.
        for (shape, fits) in [(vec![3], true), (vec![2, 3], false)] {
            let log_det = Tensor::zeros(shape, candle_core::DType::F32, &device).unwrap();
            assert_eq!(log_prob_from_mahalanobis(&m2, &log_det, 2).is_ok(), fits);
        }
    }
    use candle_core::{DType, Device};

    /// An input of another dtype than the parameters' is the one blamed: the center agrees
    /// with the precision (the message named the center before), in both distance functions.
    #[test]
    fn an_input_of_another_dtype_is_blamed_not_the_center() -> Result<()> {
        let dev = Device::Cpu;
        let center = Tensor::zeros((4, 3), DType::F32, &dev)?;
        let raw = Tensor::zeros((4, 3, 3), DType::F32, &dev)?;
        let precision = Precision::from_raw(raw.clone(), 3, &crate::GaussLayerConfig::default())?;
        // f64: the odd input out, the dtype this test is about.
        let x = Tensor::zeros((2, 3), DType::F64, &dev)?;
        let naive = mahalanobis_sq_naive(&x, &center, &raw);
        for result in [
            mahalanobis_sq(&x, &center, &precision, DistanceKernel::Auto),
            naive,
        ] {
            match result {
                Err(GaussError::DType {
                    what,
                    got,
                    expected,
                }) => {
                    assert_eq!((what.as_str(), got), ("input x", DType::F64));
                    assert!(expected.starts_with("F32"), "{expected}");
                }
                other => panic!("expected a DType error on x, got {other:?}"),
            }
        }
        // Integer tensors throughout: a dtype error naming the center (Candle's matmul said
        // only "unsupported dtype U8 for op matmul").
        let ints = |shape: &[usize]| Tensor::zeros(shape, DType::U8, &dev);
        match mahalanobis_sq_naive(&ints(&[2, 3])?, &ints(&[4, 3])?, &ints(&[4, 3, 3])?) {
            Err(GaussError::DType { what, got, .. }) => {
                assert_eq!((what.as_str(), got), ("center", DType::U8))
            }
            other => panic!("expected a DType error on the center, got {other:?}"),
        }
        // Parameters that disagree with each other: the precision is named against the center.
        // f64: a center of the input's dtype, against an f32 precision.
        let center64 = center.to_dtype(DType::F64)?;
        match mahalanobis_sq(&x, &center64, &precision, DistanceKernel::Auto) {
            Err(GaussError::DType { what, .. }) => assert!(what.starts_with("precision"), "{what}"),
            other => panic!("expected a DType error on the precision, got {other:?}"),
        }
        Ok(())
    }

    /// `gaussian` of an integer tensor panicked in Candle's `exp` ("no unary function for
    /// u8"); `gate` with a `prev_gaussian` of another dtype was Candle's "dtype mismatch in
    /// mul". Both are dtype errors naming the argument now; matching dtypes still gate.
    #[test]
    fn integer_and_mismatched_dtypes_are_dtype_errors() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::U8, DType::U32, DType::I64] {
            let m2 = Tensor::zeros((2, 3), dtype, &dev)?;
            match gaussian(&m2) {
                Err(GaussError::DType { what, got, .. }) => {
                    assert_eq!((what.as_str(), got), ("mahalanobis_sq", dtype))
                }
                other => panic!("{dtype:?}: expected a DType error, got {other:?}"),
            }
            match gate(&m2, &m2) {
                Err(GaussError::DType { what, got, .. }) => {
                    assert_eq!((what.as_str(), got), ("gaussian", dtype))
                }
                other => panic!("{dtype:?}: expected a DType error, got {other:?}"),
            }
        }
        let g = Tensor::ones((2, 3), DType::F32, &dev)?;
        for dtype in [DType::U32, DType::F16] {
            let prev = Tensor::ones((2, 1), dtype, &dev)?;
            match gate(&g, &prev) {
                Err(GaussError::DType { what, got, .. }) => {
                    assert_eq!((what.as_str(), got), ("prev_g", dtype))
                }
                other => panic!("{dtype:?}: expected a DType error, got {other:?}"),
            }
        }
        let prev = Tensor::new(&[[0.5f32], [0.25]], &dev)?;
        assert_eq!(gate(&g, &prev)?.to_vec2::<f32>()?, [[0.5f32; 3], [0.25; 3]]);
        Ok(())
    }
}
