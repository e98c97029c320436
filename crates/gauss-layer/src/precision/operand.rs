//! What the fused distance ops read for `P`: the rule that picks it lives here, beside the
//! maps it depends on, so the kernels only translate it into their own input description.

use candle_core::Tensor;

use super::{Precision, RawMap};
use crate::config::PositiveMap;
use crate::error::Result;

/// A precision as the fused distance ops take it ([`Precision::distance_operand`]).
#[derive(Clone, Debug)]
pub(crate) enum DistanceOperand {
    /// The raw Cholesky parameter (Z, d, d), which the ops map themselves:
    /// `F = tril(raw, −1) + diag(positive_map(diag raw) + floor)`, `P = F Fᵀ`.
    CholeskyRaw {
        raw: Tensor,
        positive_map: PositiveMap,
        floor: f64,
    },
    /// A factor `F` (Z, d, d) with `P = F Fᵀ` (the width floor included).
    Factor(Tensor),
    /// `P` itself (Z, d, d); its symmetric part is used.
    Matrix(Tensor),
}

impl Precision {
    /// The cheapest input the fused distance ops can read for `P`: the raw parameter where
    /// an op can map it itself (cholesky and direct without a width floor), else the
    /// effective factor, else the matrix. expm's map needs a matrix exponential, which the
    /// distance ops do not run, so it hands out its factor.
    pub(crate) fn distance_operand(&self) -> Result<DistanceOperand> {
        match self.raw_map() {
            Some(RawMap::Cholesky {
                positive_map,
                floor,
            }) => Ok(DistanceOperand::CholeskyRaw {
                raw: self.raw().clone(),
                positive_map,
                floor,
            }),
            Some(RawMap::Direct) => Ok(DistanceOperand::Matrix(self.raw().clone())),
            Some(RawMap::Expm) | None => match self.factor()? {
                Some(factor) => Ok(DistanceOperand::Factor(factor)),
                None => Ok(DistanceOperand::Matrix(self.precision_matrix()?)),
            },
        }
    }
}
