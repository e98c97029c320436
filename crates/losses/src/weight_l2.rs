//! Weight L2 as in the FGN work: the mean of the squared linear weights only (not biases,
//! centers or precisions).
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use gauss_layer::{gauss_layer, GaussLayerConfig};
//! use gauss_losses::weight_l2;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
//! let layer = gauss_layer(4, 3, GaussLayerConfig::default(), vb)?;
//! let l2 = weight_l2(&layer)?.to_scalar::<f64>()?;
//! let w = layer.weight().unwrap().sqr()?.mean_all()?.to_scalar::<f64>()?;
//! assert!((l2 - w).abs() < 1e-15);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::Tensor;
use gauss_layer::GaussLayer;

use crate::reduction::accumulated;

use gauss_layer::{GaussError, Result};

/// Mean of the squared weights of one layer; zero for a Gaussian-only layer (no weights).
///
/// # Shapes
/// → ()
///
/// # Errors
/// Candle errors only.
pub fn weight_l2(layer: &GaussLayer) -> Result<Tensor> {
    weight_l2_of_layers([layer])
}

/// Mean of the squared weights over all weights of all layers (one pooled mean, so a wide
/// layer weighs by its size); zero when no layer has weights. Errors when there are no
/// layers. f16 and bf16 weights are summed in f32.
///
/// # Shapes
/// → ()
///
/// # Errors
/// No layers ([`GaussError::NoLayers`]).
pub fn weight_l2_of_layers<'a>(layers: impl IntoIterator<Item = &'a GaussLayer>) -> Result<Tensor> {
    let mut any_layer: Option<&GaussLayer> = None;
    let mut total: Option<Tensor> = None;
    let mut count = 0usize;
    for layer in layers {
        any_layer = Some(layer);
        if let Some(weight) = layer.weight() {
            count += weight.elem_count();
            let sum = accumulated(&weight.sqr()?, |t| Ok(t.sum_all()?))?;
            total = Some(match total {
                None => sum,
                Some(acc) => (acc + sum)?,
            });
        }
    }
    let layer = any_layer.ok_or(GaussError::NoLayers { what: "weight L2" })?;
    match total {
        Some(total) if count > 0 => Ok((total / count as f64)?),
        _ => {
            let center = layer.center();
            Ok(Tensor::zeros((), center.dtype(), center.device())?)
        }
    }
}
