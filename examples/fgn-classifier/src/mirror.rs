//! Test-time mirroring (`--test-time-mirror`, CNN only): each test image is scored as itself
//! and mirrored left–right, and the two views' logits and Gaussian activations are
//! averaged. It suits sets whose classes are mirror-symmetric (clothes: the networks of the
//! README are trained with `--augment flip`), not digits. Both views run as one batch.
//!
//! `train --test-time-mirror` fits the temperature on the averaged logits and records
//! `test_time_mirror` in the checkpoint; `eval` and `predict` apply a recorded one, or force
//! it with their own `--test-time-mirror`. The FGN score of a mirrored network is the largest
//! averaged activation of the last layer, what `predict`'s averaged `g{i}` give.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};

use crate::cnn::{CnnClassical, CnnFgn};
use crate::evaluate::Classifier;
use crate::ood::Scorer;

/// The metadata key recording that a checkpoint averages mirrored views.
pub const METADATA_KEY: &str = "test_time_mirror";

/// Whether a checkpoint records test-time mirroring (`false` when it records nothing).
///
/// # Errors
/// A recorded value other than `true` or `false`.
pub fn recorded(metadata: &BTreeMap<String, String>) -> Result<bool> {
    match metadata.get(METADATA_KEY).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => {
            bail!("checkpoint metadata `{METADATA_KEY}` must be `true` or `false`, got {other:?}")
        }
    }
}

/// `x` and its left–right mirror stacked as one batch (2B, 1, H, W): rows `0..B` are the
/// images, rows `B..2B` their mirrors.
///
/// # Shapes
/// `x`: (B, H·W) or (B, 1, H, W) → (2B, 1, H, W)
pub fn with_mirrors(x: &Tensor, height: usize, width: usize) -> candle_core::Result<Tensor> {
    let images = x.reshape((x.dim(0)?, 1, height, width))?;
    let reversed: Vec<u32> = (0..width as u32).rev().collect();
    let reversed = Tensor::from_vec(reversed, width, &Device::Cpu)?.to_device(x.device())?;
    let mirrored = images.index_select(&reversed, 3)?;
    Tensor::cat(&[&images, &mirrored], 0)
}

/// The mean of the two halves of a (2B, …) tensor: a view and its mirror.
fn mean_of_views(t: &Tensor) -> candle_core::Result<Tensor> {
    let half = t.dim(0)? / 2;
    (t.narrow(0, 0, half)? + t.narrow(0, half, half)?)? / 2.0
}

impl CnnFgn {
    /// Logits and each Gaussian layer's gated activations `g{i}`, averaged over `x` and its
    /// mirror when `mirror`, else of `x` alone.
    ///
    /// # Shapes
    /// `x`: (B, H·W) or (B, 1, H, W) → (B, C) and one (B, Zᵢ) per layer
    pub fn forward_views(&self, x: &Tensor, mirror: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let (height, width) = (self.trunk.config().height, self.trunk.config().width);
        let x = if mirror {
            with_mirrors(x, height, width)?
        } else {
            x.clone()
        };
        let features = self.trunk.forward(&x)?;
        let (logits, gaussians) = self.net.forward_with_gaussians(&features, false)?;
        if !mirror {
            return Ok((logits, gaussians));
        }
        let gaussians = gaussians
            .iter()
            .map(mean_of_views)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((mean_of_views(&logits)?, gaussians))
    }
}

/// A CNN scored on each image alone, or on each image and its mirror averaged when
/// `mirror` (see the module docs): the one switch `train` and `eval` score through.
pub struct Views<'a, M> {
    pub model: &'a M,
    pub mirror: bool,
}

impl Scorer for Views<'_, CnnFgn> {
    fn scores(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (logits, gaussians) = self.model.forward_views(x, self.mirror)?;
        let Some(last) = gaussians.last() else {
            bail!("the network has no layers");
        };
        Ok((logits, Some(last.max(D::Minus1)?)))
    }
}

impl Scorer for Views<'_, CnnClassical> {
    fn scores(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        if !self.mirror {
            return Ok((self.model.logits(x)?, None));
        }
        let trunk = self.model.trunk.config();
        let both = with_mirrors(x, trunk.height, trunk.width)?;
        Ok((mean_of_views(&self.model.logits(&both)?)?, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// Rows `B..2B` are the mirrors: pixel (r, c) of image b is pixel (r, W−1−c) of its
    /// mirror, on a non-square image so rows and columns cannot be confused.
    #[test]
    fn mirrors_reverse_each_row() {
        let (b, h, w) = (2usize, 3usize, 4usize);
        let values: Vec<f32> = (0..b * h * w).map(|v| v as f32).collect();
        let x = Tensor::from_vec(values.clone(), (b, h * w), &Device::Cpu).unwrap();
        let both = with_mirrors(&x, h, w).unwrap();
        assert_eq!(both.dims(), &[2 * b, 1, h, w]);
        let out = both.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for image in 0..b {
            for r in 0..h {
                for c in 0..w {
                    let original = values[image * h * w + r * w + c];
                    assert_eq!(out[image * h * w + r * w + c], original);
                    assert_eq!(out[(b + image) * h * w + r * w + (w - 1 - c)], original);
                }
            }
        }
        assert_eq!(both.dtype(), DType::F32);
    }

    #[test]
    fn recorded_values_are_checked() {
        let mut meta = BTreeMap::new();
        assert!(!recorded(&meta).unwrap());
        meta.insert(METADATA_KEY.to_string(), "true".to_string());
        assert!(recorded(&meta).unwrap());
        meta.insert(METADATA_KEY.to_string(), "yes".to_string());
        let message = recorded(&meta).unwrap_err().to_string();
        assert!(message.contains("`true` or `false`"), "{message}");
    }
}
