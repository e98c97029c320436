//! Classification loss for network outputs: Candle's [`candle_nn::loss::cross_entropy`]
//! after checks that name a wrong shape or dtype instead of failing inside a gather.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_losses::checked_cross_entropy;
//! // Uniform logits over 4 classes: the loss is log 4 whatever the target.
//! let logits = Tensor::zeros((2, 4), candle_core::DType::F64, &Device::Cpu)?;
//! let targets = Tensor::new(&[1u32, 3], &Device::Cpu)?;
//! let loss = checked_cross_entropy(&logits, &targets)?.to_scalar::<f64>()?;
//! assert!((loss - 4f64.ln()).abs() < 1e-12);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Tensor};
use candle_nn::loss::cross_entropy;
use gauss_layer::{check_device, GaussError, Result};

use crate::check;
use crate::reduction::accumulated;

/// [`candle_nn::loss::cross_entropy`] (mean over the batch of `−log softmax(logits)[target]`)
/// after checking the shapes, the dtypes (float logits; targets `u8`, `u32` or `i64`) and the
/// device. f16 and bf16 logits are evaluated in f32 and the loss rounded back to their dtype
/// (Candle's CPU sum over the batch accumulates in the tensor's dtype, which stalls).
///
/// On the CPU, where reading them is free, every target is checked to be a class of the
/// logits (`0 ≤ t < C`): Candle's gather takes the largest value of the index dtype
/// (`u8` 255, `u32::MAX`, `i64::MAX`) as padding and gives 0 for that row, which would
/// silently drop the sample from the loss. On other devices the targets are not read (that
/// would wait for the device each step), so an out-of-range class there is Candle's gather.
///
/// # Shapes
/// `logits`: (B, C), `targets`: (B) → ()
///
/// # Errors
/// Logits that are not (B, C) with B ≥ 1 and C ≥ 1 or not of a float dtype
/// ([`GaussError::Shape`], [`GaussError::DType`]); targets of another length, a non-integer
/// dtype or on another device; on the CPU, a target outside `0..C` ([`GaussError::Data`],
/// naming the row).
pub fn checked_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (batch, classes) = check::samples(logits, "logits", None)?;
    check::float_dtype(logits, "logits")?;
    if classes == 0 {
        return Err(GaussError::shape(
            "logits",
            "(batch, classes) with at least one class",
            logits.dims(),
        ));
    }
    if targets.dims() != [batch] {
        return Err(GaussError::shape(
            "class targets",
            format!("({batch}), one class index per row of the logits"),
            targets.dims(),
        ));
    }
    if !matches!(targets.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(GaussError::dtype(
            "class targets",
            "U8, U32 or I64 (integer class indices)",
            targets.dtype(),
        ));
    }
    check_device("class targets", targets, logits.device(), "logits")?;
    if targets.device().is_cpu() {
        check_classes(targets, classes)?;
    }
    accumulated(logits, |logits| Ok(cross_entropy(logits, targets)?))
}

/// Checks that every target (on the CPU) is a class index below `classes`.
fn check_classes(targets: &Tensor, classes: usize) -> Result<()> {
    let values = targets.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    let out_of_range = values
        .iter()
        .position(|&t| usize::try_from(t).map_or(true, |t| t >= classes));
    match out_of_range {
        Some(row) => Err(GaussError::data(
            "class targets",
            format!(
                "row {row} holds class {}, outside 0..{classes} (the logits have {classes} classes)",
                values[row]
            ),
        )),
        None => Ok(()),
    }
}
