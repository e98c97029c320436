//! Classification losses for network outputs: Candle's own
//! [`candle_nn::loss::cross_entropy`] and [`candle_nn::loss::nll`], re-exported, plus a
//! checked cross-entropy that names a wrong shape or dtype instead of failing inside a
//! gather.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_losses::classification::checked_cross_entropy;
//! // Uniform logits over 4 classes: the loss is log 4 whatever the target.
//! let logits = Tensor::zeros((2, 4), candle_core::DType::F64, &Device::Cpu)?;
//! let targets = Tensor::new(&[1u32, 3], &Device::Cpu)?;
//! let loss = checked_cross_entropy(&logits, &targets)?.to_scalar::<f64>()?;
//! assert!((loss - 4f64.ln()).abs() < 1e-12);
//! # Ok::<(), gauss_losses::LossError>(())
//! ```

use candle_core::{DType, Tensor};
pub use candle_nn::loss::{binary_cross_entropy_with_logit, cross_entropy, nll};

use crate::check;
use crate::error::{LossError, Result};

/// [`candle_nn::loss::cross_entropy`] (mean over the batch of `−log softmax(logits)[target]`)
/// after checking the shapes and the target dtype (`u8`, `u32` or `i64`).
///
/// # Shapes
/// `logits`: (B, C), `targets`: (B) → ()
pub fn checked_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (batch, _) = check::samples(logits, "logits", None)?;
    if targets.dims() != [batch] {
        return Err(LossError::shape(
            "class targets",
            format!("({batch}), one class index per row of the logits"),
            targets.dims(),
        ));
    }
    if !matches!(targets.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(LossError::DType {
            what: "class targets (u8, u32 or i64)".to_string(),
            expected: DType::U32,
            got: targets.dtype(),
        });
    }
    Ok(cross_entropy(logits, targets)?)
}
