//! Test helpers shared by this crate's tests and the workspace's integration tests (behind the
//! `testing` feature, not part of the library's API): the [`test_device!`](crate::test_device)
//! macro (one test per enabled device, in the style of candle's own) and tensor comparisons
//! (done on the host: tensors move to the CPU before any cast to f64).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::testing::relative_error;
//! let a = Tensor::new(&[1.0f64, 2.0], &Device::Cpu)?;
//! let b = Tensor::new(&[1.0f64, 2.5], &Device::Cpu)?;
//! // max |a − b| / max |b| = 0.5 / 2.5
//! assert!((relative_error(&a, &b)? - 0.2).abs() < 1e-15);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Tensor};

use crate::error::{GaussError, Result};

#[doc(hidden)]
pub use candle_core::Device as __Device;

/// The crate-private batched linear algebra, for tests that build reference values with it
/// (not part of the API: the library's users get [`crate::ops`]'s four helpers).
pub mod linalg {
    pub use crate::linalg::{
        cholesky, diag_embed, diagonal, expm_symmetric, matmul, strict_tril, trace,
        trace_expm_symmetric, transpose, tril, tril_inverse,
    };
}

/// Expands a test body `fn(&Device) -> Result<(), E>` (any `E: Debug`, e.g. `anyhow::Error`)
/// into one `#[test]` per device the build enables: CPU always, CUDA with the `cuda` feature,
/// Metal with the `metal` feature (features of the crate that invokes the macro). On Metal,
/// which has no f64, a body whose name contains `f64` is skipped with a printed note; bodies
/// that loop over dtypes take them from [`float_dtypes`].
///
/// Two forms:
/// - `test_device!(body)` makes a module `body` with tests `body::cpu`, `body::cuda`,
///   `body::metal` (a module and a function may share a name);
/// - `test_device!(body, body_cpu, body_cuda, body_metal)` names the tests explicitly, like
///   candle's macro.
///
/// ```
/// fn forward_shapes(device: &candle_core::Device) -> Result<(), gauss_layer::GaussError> {
///     let x = candle_core::Tensor::zeros((2, 3), candle_core::DType::F32, device)?;
///     assert_eq!(x.dims(), &[2, 3]);
///     Ok(())
/// }
/// gauss_layer::test_device!(forward_shapes);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! test_device {
    ($body:ident) => {
        mod $body {
            #[test]
            fn cpu() {
                if let Err(e) = super::$body(&$crate::testing::__Device::Cpu) {
                    panic!("{}: {e:?}", stringify!($body));
                }
            }
            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                let device = $crate::testing::__Device::new_cuda(0).expect("a CUDA device");
                if let Err(e) = super::$body(&device) {
                    panic!("{}: {e:?}", stringify!($body));
                }
            }
            #[cfg(feature = "metal")]
            #[test]
            fn metal() {
                if $crate::testing::skip_f64_body_on_metal(stringify!($body)) {
                    return;
                }
                let device = $crate::testing::__Device::new_metal(0).expect("a Metal device");
                if let Err(e) = super::$body(&device) {
                    panic!("{}: {e:?}", stringify!($body));
                }
            }
        }
    };
    ($body:ident, $cpu:ident, $cuda:ident, $metal:ident) => {
        #[test]
        fn $cpu() {
            if let Err(e) = $body(&$crate::testing::__Device::Cpu) {
                panic!("{}: {e:?}", stringify!($body));
            }
        }
        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() {
            let device = $crate::testing::__Device::new_cuda(0).expect("a CUDA device");
            if let Err(e) = $body(&device) {
                panic!("{}: {e:?}", stringify!($body));
            }
        }
        #[cfg(feature = "metal")]
        #[test]
        fn $metal() {
            if $crate::testing::skip_f64_body_on_metal(stringify!($body)) {
                return;
            }
            let device = $crate::testing::__Device::new_metal(0).expect("a Metal device");
            if let Err(e) = $body(&device) {
                panic!("{}: {e:?}", stringify!($body));
            }
        }
    };
}

/// [`test_device!`](crate::test_device) for a body that takes the dtype too,
/// `fn(DType, &Device) -> Result<(), E>`: `test_device_dtypes!(name, body)` defines
/// `name(&Device)`, which runs `body` in every dtype of [`float_dtypes`] (f32 and f64; f32
/// only on Metal) and names the dtype of a failure, and expands `test_device!(name)`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// fn zeros_sum_to_zero(dtype: DType, device: &Device) -> Result<(), gauss_layer::GaussError> {
///     let sum = Tensor::zeros(4, dtype, device)?.sum_all()?;
///     assert_eq!(sum.to_dtype(DType::F32)?.to_scalar::<f32>()?, 0.0);
///     Ok(())
/// }
/// gauss_layer::test_device_dtypes!(zeros_sum_in_every_dtype, zeros_sum_to_zero);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! test_device_dtypes {
    ($name:ident, $body:ident) => {
        fn $name(device: &$crate::testing::__Device) -> ::std::result::Result<(), String> {
            for dtype in $crate::testing::float_dtypes(device) {
                $body(dtype, device).map_err(|e| format!("{dtype:?}: {e:?}"))?;
            }
            Ok(())
        }
        $crate::test_device!($name);
    };
}

/// Whether a [`test_device!`](crate::test_device) body named `name` is an f64 body (its
/// name contains `f64`), which Metal cannot run (it has no f64): prints a note and returns
/// true so the Metal test skips it.
pub fn skip_f64_body_on_metal(name: &str) -> bool {
    if name.contains("f64") {
        println!("{name}: skipped on Metal (no f64 support)");
        return true;
    }
    false
}

/// The float dtypes a test body should loop over on `device`: f32 and f64, without f64 on
/// Metal (printing a note that it was left out).
pub fn float_dtypes(device: &candle_core::Device) -> Vec<DType> {
    if device.is_metal() {
        println!("f64 left out on Metal (no f64 support)");
        return vec![DType::F32];
    }
    vec![DType::F32, DType::F64]
}

/// Largest absolute value of a tensor, in f64 (0 for an empty tensor, NaN when it holds a
/// NaN, so that it fails any tolerance).
///
/// # Shapes
/// `tensor`: any
pub fn max_abs(tensor: &Tensor) -> Result<f64> {
    let values = tensor
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    // On the host: Candle's `max` skips a NaN that is not the first element.
    Ok(values.iter().fold(0.0f64, |m, v| {
        if m.is_nan() || v.is_nan() {
            f64::NAN
        } else {
            m.max(v.abs())
        }
    }))
}

/// `max |actual − expected| / max(max |expected|, tiny)`, in f64 (both converted), after
/// checking that the shapes agree. NaN anywhere gives NaN (so it fails any tolerance).
///
/// # Shapes
/// `actual`, `expected`: the same shape
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    if actual.dims() != expected.dims() {
        return Err(GaussError::shape(
            "actual tensor",
            format!("{:?} (the expected tensor's shape)", expected.dims()),
            actual.dims(),
        ));
    }
    let a = actual
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let b = expected
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mut diff = 0.0f64;
    let mut scale = 0.0f64;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        if d.is_nan() {
            return Ok(f64::NAN);
        }
        diff = diff.max(d);
        scale = scale.max(y.abs());
    }
    Ok(diff / scale.max(f64::MIN_POSITIVE))
}

/// The tolerance on [`relative_error`] this project tests a dtype to: 1e-9 for f64, 1e-4 for
/// f32, 1e-2 for the half types.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-9,
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

/// Whether every element is finite (no NaN, no ±∞).
///
/// # Shapes
/// `tensor`: any
pub fn all_finite(tensor: &Tensor) -> Result<bool> {
    Ok(tensor
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .iter()
        .all(|v| v.is_finite()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Candle's `max` skips a NaN that is not the first element, so `max_abs` of (1, NaN)
    /// was 1 and a check `max_abs(a − b) < tol` passed on a NaN result; it is NaN now, which
    /// fails every tolerance, as `relative_error` does.
    #[test]
    fn max_abs_of_a_tensor_holding_nan_is_nan() -> Result<()> {
        let with_nan = Tensor::new(&[1.0f32, f32::NAN, -3.0], &Device::Cpu)?;
        assert!(max_abs(&with_nan)?.is_nan());
        let finite = Tensor::new(&[[1.0f32, -3.0], [2.0, 0.5]], &Device::Cpu)?;
        assert_eq!(max_abs(&finite)?, 3.0);
        let infinite = Tensor::new(&[1.0f32, f32::NEG_INFINITY], &Device::Cpu)?;
        assert_eq!(max_abs(&infinite)?, f64::INFINITY);
        Ok(())
    }
}
