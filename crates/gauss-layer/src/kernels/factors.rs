//! The factors `F_z` (with `P_z = F_z F_zᵀ`) as the fused ops see them: the op's (Z, d, d)
//! input is either `F` itself or the raw Cholesky parameter, mapped to `L` inside the op (so
//! neither `L` nor its backward exists as (Z, d, d) tensors), with the chain rule back to
//! the input.

use crate::config::PositiveMap;
use crate::cpu::{Real, Sizes};
use crate::precision::maps;

/// How the op's third input becomes the factor `F` (so the Cholesky map from raw parameters
/// runs inside the op, without (Z, d, d) temporaries and their backward ops).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum FactorMap {
    /// The input is `F`.
    Identity,
    /// The input is the raw Cholesky parameter:
    /// `F = tril(raw, -1) + diag(map(diag raw) + floor)`; entries above the diagonal unused.
    Cholesky {
        positive_map: PositiveMap,
        floor: f64,
    },
}

impl FactorMap {
    /// Turns `∂F_z` into the gradient of the op's input block, in place.
    pub(crate) fn chain<T: Real>(self, input: &[T], dim: usize, grad: &mut [T]) {
        if let FactorMap::Cholesky { positive_map, .. } = self {
            for i in 0..dim {
                let slope = maps::slope(positive_map, input[i * dim + i].to_f64());
                grad[i * dim + i] = T::from_f64(grad[i * dim + i].to_f64() * slope);
                grad[i * dim + i + 1..(i + 1) * dim].fill(T::zero());
            }
        }
    }
}

/// The factors `F_z` as the op sees them: its input and, for the Cholesky map, the mapped
/// diagonal computed once per call (Z·d values).
pub(crate) struct Factors<'a, T> {
    input: &'a [T],
    dim: usize,
    mapped_diagonal: Option<Vec<T>>,
}

impl<'a, T: Real> Factors<'a, T> {
    pub(crate) fn new(input: &'a [T], map: FactorMap, s: Sizes) -> Self {
        let dim = s.dim;
        let mapped_diagonal = match map {
            FactorMap::Identity => None,
            FactorMap::Cholesky {
                positive_map,
                floor,
            } => Some(
                (0..s.neurons * dim)
                    .map(|k| {
                        let (z, i) = (k / dim, k % dim);
                        let raw = input[z * dim * dim + i * dim + i].to_f64();
                        T::from_f64(maps::value(positive_map, raw) + floor)
                    })
                    .collect(),
            ),
        };
        Self {
            input,
            dim,
            mapped_diagonal,
        }
    }

    /// d.
    pub(crate) fn dim(&self) -> usize {
        self.dim
    }

    /// True when every `F_z` is lower triangular (the Cholesky map).
    pub(crate) fn is_lower_triangular(&self) -> bool {
        self.mapped_diagonal.is_some()
    }

    /// Writes row `i` of `F_z` into `out` (length d).
    #[inline]
    pub(crate) fn write_row(&self, z: usize, i: usize, out: &mut [T]) {
        let d = self.dim;
        let src = &self.input[z * d * d + i * d..][..d];
        match &self.mapped_diagonal {
            None => out.copy_from_slice(src),
            Some(diagonal) => {
                out[..i].copy_from_slice(&src[..i]);
                out[i] = diagonal[z * d + i];
                out[i + 1..].fill(T::zero());
            }
        }
    }
}
