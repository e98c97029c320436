//! The FGN training objective of a classifier built from Gaussian layers:
//!
//! `total = cross_entropy + λ_l2 · weight_L2 + λ_sig · λ-loss`,
//!
//! with the weight L2 pooled over all weights ([`crate::weight_l2_of_layers`]) and the λ-loss
//! pooled over all neurons ([`LambdaLoss::of_layers`]) of all Gaussian layers. The result
//! keeps every term for logging.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Module, VarBuilder, VarMap};
//! use gauss_layer::{gauss_layer, GaussLayerConfig};
//! use gauss_losses::{fgn_objective, FgnObjectiveConfig};
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
//! let layer = gauss_layer(4, 3, GaussLayerConfig::default(), vb)?;
//! let x = Tensor::randn(0.0f64, 1.0, (6, 4), &Device::Cpu)?;
//! let targets = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &Device::Cpu)?;
//! let logits = layer.forward(&x)?;
//! let loss = fgn_objective(&logits, &targets, [&layer], &FgnObjectiveConfig::default())?;
//! let values = loss.values()?;
//! let config = FgnObjectiveConfig::default();
//! let expected = values.cross_entropy
//!     + config.lambda_l2 * values.weight_l2
//!     + config.lambda_sigma * values.lambda;
//! assert!((values.total - expected).abs() < 1e-12);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::Tensor;
use gauss_layer::GaussLayer;
use serde::{Deserialize, Serialize};

use crate::classification::checked_cross_entropy;
use crate::lambda::{LambdaLoss, TraceEstimator};
use crate::weight_l2::weight_l2_of_layers;
use gauss_layer::{GaussError, Result};

/// Weights of the FGN objective's regularizers.
///
/// Deserialization fills a missing field with its default (unlike the layer's configs, which
/// require every field: a checkpoint must not rebuild a different network) and refuses an
/// unknown one (a misspelt weight) by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FgnObjectiveConfig {
    /// Weight `λ_l2` of the mean squared linear weight. Default `1e-4`.
    pub lambda_l2: f64,
    /// Weight `λ_sig` of the λ-loss. Default `1e-3`: a mild pull towards narrow Gaussians
    /// that leaves the accuracy to the cross-entropy; raise it for tighter neurons. The
    /// default λ-loss (the mean covariance eigenvalue) starts at `d` for `d` inputs and its
    /// gradient grows with `d`, so a weight tuned at one width is too strong at a wider one:
    /// `fgn-classifier` uses `0.05·(64/d)²` (0.05 on 64 inputs, 3.3e-4 on MNIST's 784).
    pub lambda_sigma: f64,
    /// Which λ-loss. Default [`LambdaLoss::TraceCovariance`].
    pub lambda_loss: LambdaLoss,
    /// How the trace-covariance λ-loss gets `tr Σ`. Default [`TraceEstimator::Exact`];
    /// [`TraceEstimator::Hutchinson`] for full covariance on wide inputs.
    pub trace_estimator: TraceEstimator,
}

impl Default for FgnObjectiveConfig {
    fn default() -> Self {
        Self {
            lambda_l2: 1e-4,
            lambda_sigma: 1e-3,
            lambda_loss: LambdaLoss::TraceCovariance,
            trace_estimator: TraceEstimator::Exact,
        }
    }
}

impl FgnObjectiveConfig {
    /// Checks that both weights are finite and `>= 0`.
    ///
    /// # Errors
    /// [`GaussError::InvalidConfig`] naming a weight that is negative or not finite.
    pub fn validate(&self) -> Result<()> {
        self.trace_estimator.validate()?;
        for (field, value) in [
            ("lambda_l2", self.lambda_l2),
            ("lambda_sigma", self.lambda_sigma),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(GaussError::config(
                    field,
                    format!("must be finite and >= 0, got {value}"),
                ));
            }
        }
        Ok(())
    }
}

/// The FGN objective and its terms, as scalar tensors (backpropagate through `total`).
#[derive(Clone, Debug)]
pub struct FgnLoss {
    /// `cross_entropy + λ_l2 · weight_l2 + λ_sig · lambda`.
    pub total: Tensor,
    /// The classification cross-entropy (mean over the batch).
    pub cross_entropy: Tensor,
    /// The unweighted weight L2.
    pub weight_l2: Tensor,
    /// The unweighted λ-loss.
    pub lambda: Tensor,
}

/// The terms of an [`FgnLoss`] as numbers, for logging.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FgnLossValues {
    /// The total objective.
    pub total: f64,
    /// The cross-entropy.
    pub cross_entropy: f64,
    /// The unweighted weight L2.
    pub weight_l2: f64,
    /// The unweighted λ-loss.
    pub lambda: f64,
}

impl FgnLoss {
    /// Copies every term to the host (each scalar moves in its own dtype and is widened to
    /// `f64` on the CPU: no f64 on the device).
    ///
    /// # Errors
    /// Candle errors (a device read).
    pub fn values(&self) -> Result<FgnLossValues> {
        let value = |t: &Tensor| -> Result<f64> {
            Ok(t.to_device(&candle_core::Device::Cpu)?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?)
        };
        Ok(FgnLossValues {
            total: value(&self.total)?,
            cross_entropy: value(&self.cross_entropy)?,
            weight_l2: value(&self.weight_l2)?,
            lambda: value(&self.lambda)?,
        })
    }
}

/// The FGN objective of a classifier's `logits` against class `targets`, regularizing the
/// given Gaussian layers (for a `GaussNet`, pass its `layers()`). Errors when there are no
/// layers or the config is invalid.
///
/// # Shapes
/// `logits`: (B, C), `targets`: (B) with dtype u8, u32 or i64 → every term ()
///
/// # Errors
/// An invalid config; no layers; logits that are not (B, C) or targets of another length or a
/// non-integer dtype; a `direct` precision that is not positive definite.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{Optimizer, VarBuilder, VarMap};
/// use gauss_layer::{GaussNet, GaussNetConfig};
/// use gauss_losses::{fgn_objective, FgnObjectiveConfig};
/// let varmap = VarMap::new();
/// let config = GaussNetConfig { in_features: 4, hidden: vec![6], out_features: 3, ..Default::default() };
/// let net = GaussNet::new(config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
/// let x = Tensor::randn(0f32, 1.0, (8, 4), &Device::Cpu)?;
/// let targets = Tensor::new(&[0u32, 1, 2, 0, 1, 2, 0, 1], &Device::Cpu)?;
/// let mut optimizer = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2)?;
/// // One training step: cross-entropy + λ_l2·mean(w²) + λ_sig·λ-loss over every layer.
/// let loss = fgn_objective(&net.forward(&x, true)?, &targets, net.layers(), &FgnObjectiveConfig::default())?;
/// optimizer.backward_step(&loss.total)?;
/// assert!(loss.values()?.total.is_finite());
/// # Ok::<(), gauss_layer::GaussError>(())
/// ```
pub fn fgn_objective<'a>(
    logits: &Tensor,
    targets: &Tensor,
    layers: impl IntoIterator<Item = &'a GaussLayer>,
    config: &FgnObjectiveConfig,
) -> Result<FgnLoss> {
    config.validate()?;
    let layers: Vec<&GaussLayer> = layers.into_iter().collect();
    if layers.is_empty() {
        return Err(GaussError::NoLayers {
            what: "fgn_objective's `layers`",
        });
    }
    let cross_entropy = checked_cross_entropy(logits, targets)?;
    let weight_l2 = weight_l2_of_layers(layers.iter().copied())?.to_dtype(logits.dtype())?;
    let lambda = config
        .lambda_loss
        .of_layers_with(layers.iter().copied(), config.trace_estimator)?
        .to_dtype(logits.dtype())?;
    let total =
        ((&cross_entropy + (&weight_l2 * config.lambda_l2)?)? + (&lambda * config.lambda_sigma)?)?;
    Ok(FgnLoss {
        total,
        cross_entropy,
        weight_l2,
        lambda,
    })
}
