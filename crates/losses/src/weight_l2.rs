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

use crate::reduction::mean_over_layers;

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
/// layers. f16 and bf16 weights are summed in f32 and the mean rounded back once (a
/// half-precision sum of many weights would overflow where the mean does not).
///
/// # Shapes
/// → ()
///
/// # Errors
/// No layers ([`GaussError::NoLayers`]); layers of different dtypes ([`GaussError::DType`]).
pub fn weight_l2_of_layers<'a>(layers: impl IntoIterator<Item = &'a GaussLayer>) -> Result<Tensor> {
    let mut first_layer: Option<&GaussLayer> = None;
    let squares = layers.into_iter().map(|layer| {
        first_layer.get_or_insert(layer);
        layer.weight().map(|weight| Ok(weight.sqr()?)).transpose()
    });
    let mean = mean_over_layers("weights", squares)?;
    let layer = first_layer.ok_or(GaussError::NoLayers { what: "weight L2" })?;
    match mean {
        Some(mean) => Ok(mean),
        None => {
            let center = layer.center();
            Ok(Tensor::zeros((), center.dtype(), center.device())?)
        }
    }
}
