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
use gauss_layer::{GaussError, Result};

use crate::check;

/// [`candle_nn::loss::cross_entropy`] (mean over the batch of `−log softmax(logits)[target]`)
/// after checking the shapes and the target dtype (`u8`, `u32` or `i64`).
///
/// # Shapes
/// `logits`: (B, C), `targets`: (B) → ()
///
/// # Errors
/// Logits that are not (B, C) with B ≥ 1, targets of another length or a non-integer dtype.
pub fn checked_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (batch, _) = check::samples(logits, "logits", None)?;
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
            "an integer class index dtype (U8, U32 or I64)",
            targets.dtype(),
        ));
    }
    Ok(cross_entropy(logits, targets)?)
}
