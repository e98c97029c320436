//! How per-sample losses are reduced over the batch.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use gauss_layer::Result;

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
    /// Reduces `per_sample` over its first (batch) dimension.
    ///
    /// # Shapes
    /// `per_sample`: (B, ...) → `None`: (B, ...); `Mean`, `Sum`: (...)
    ///
    /// # Errors
    /// Candle errors (a rank-0 tensor has no batch dimension).
    pub fn apply(self, per_sample: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Reduction::None => per_sample.clone(),
            Reduction::Mean => per_sample.mean(0)?,
            Reduction::Sum => per_sample.sum(0)?,
        })
    }
}
