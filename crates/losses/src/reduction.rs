//! How per-sample losses are reduced over the batch.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use gauss_layer::{GaussError, Result};

/// Reduction of per-sample losses over the batch (the first dimension).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// Keep one value per sample.
    None,
    /// Mean over the batch (the usual training loss: its scale does not grow with the batch).
    #[default]
    Mean,
    /// Sum over the batch (the log-likelihood of the whole data set).
    Sum,
}

impl Reduction {
    /// Reduces `per_sample` over its first (batch) dimension. An f16 or bf16 tensor is summed
    /// in f32 and the result rounded back to its dtype (Candle's CPU sum accumulates in the
    /// tensor's dtype, which stalls in half precision).
    ///
    /// # Shapes
    /// `per_sample`: (B, ...) → `None`: (B, ...); `Mean`, `Sum`: (...)
    ///
    /// # Errors
    /// For `Mean` and `Sum`, a rank-0 tensor (no batch dimension, [`GaussError::Shape`]); for
    /// `Mean`, an empty batch ([`GaussError::EmptyBatch`]: the mean of no samples is 0/0, NaN).
    pub fn apply(self, per_sample: &Tensor) -> Result<Tensor> {
        if self != Reduction::None {
            match per_sample.dims().first() {
                None => {
                    return Err(GaussError::shape(
                        "per-sample losses",
                        "(batch, ...)",
                        per_sample.dims(),
                    ))
                }
                Some(0) if self == Reduction::Mean => {
                    return Err(GaussError::EmptyBatch {
                        what: "per-sample losses".to_string(),
                        got: per_sample.dims().to_vec(),
                    })
                }
                Some(_) => {}
            }
        }
        match self {
            Reduction::None => Ok(per_sample.clone()),
            Reduction::Mean => accumulated(per_sample, |t| Ok(t.mean(0)?)),
            Reduction::Sum => accumulated(per_sample, |t| Ok(t.sum(0)?)),
        }
    }
}

/// The mean of every element of the per-layer `terms` (the λ-loss's per-neuron terms, the
/// weights' squares), or `None` when no layer gave any. f16 and bf16 terms are summed in f32
/// and the mean rounded back once, after the division: a half-precision running total is
/// infinite past 65504 even where the mean is small (1100 neurons of `log|Σ|` ≈ 266).
///
/// # Errors
/// `what`'s terms of different dtypes ([`GaussError::DType`], naming the layer, counted
/// from 0): one mean has one dtype.
pub(crate) fn mean_over_layers(
    what: &str,
    terms: impl IntoIterator<Item = Result<Option<Tensor>>>,
) -> Result<Option<Tensor>> {
    let mut total: Option<(Tensor, DType)> = None;
    let mut count = 0usize;
    for (layer, terms) in terms.into_iter().enumerate() {
        let Some(terms) = terms? else { continue };
        count += terms.elem_count();
        let sum = widened(&terms)?.sum_all()?;
        total = Some(match total {
            None => (sum, terms.dtype()),
            Some((acc, dtype)) => {
                if terms.dtype() != dtype {
                    return Err(GaussError::dtype(
                        format!("{what} of layer {layer}"),
                        format!("{dtype:?} (the dtype of the layers before it)"),
                        terms.dtype(),
                    ));
                }
                ((acc + sum)?, dtype)
            }
        });
    }
    total
        .map(|(sum, dtype)| Ok((sum / count as f64)?.to_dtype(dtype)?))
        .transpose()
}

/// `t` in the dtype its sums run in: f32 for f16 and bf16, its own otherwise.
fn widened(t: &Tensor) -> Result<Tensor> {
    Ok(match t.dtype() {
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32)?,
        _ => t.clone(),
    })
}

/// Runs the reduction `reduce` on `t` widened to f32 when `t` is f16 or bf16, and rounds its
/// result back to `t`'s dtype; other dtypes as they are. Candle's CPU sum accumulates in the
/// tensor's dtype, and a running sum in 11 (f16) or 8 (bf16) significant bits stops growing
/// once its spacing exceeds twice the terms: 1000 terms of 10.3 summed in bf16 give 4096,
/// not 10312. The casts are differentiable, and f32 exists on every device.
pub(crate) fn accumulated(
    t: &Tensor,
    reduce: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    Ok(reduce(&widened(t)?)?.to_dtype(t.dtype())?)
}
