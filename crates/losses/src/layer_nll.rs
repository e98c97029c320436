//! NLL of data under each neuron of a [`GaussLayer`]: neuron `z` is the normal
//! N(c_z, P_z⁻¹), whatever the layer's parameterization.
//!
//! `nll[b, z] = m2[b, z]/2 − log|P_z|/2 + d/2 · log 2π`, with `m2` from the layer's own
//! distance kernel and `log|P_z|` from its precision, so no inverse and no `log g`.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use gauss_layer::{gauss_layer, GaussLayerConfig};
//! use gauss_losses::{layer_nll, Reduction};
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
//! let layer = gauss_layer(3, 2, GaussLayerConfig::default(), vb)?;
//! let x = Tensor::randn(0.0f64, 1.0, (5, 3), &Device::Cpu)?;
//! let per_neuron = layer_nll(&layer, &x, Reduction::Mean)?;
//! assert_eq!(per_neuron.dims(), &[2]);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::Tensor;
use gauss_layer::GaussLayer;

use crate::check;
use crate::gaussian::nll_from_mahalanobis;
use crate::reduction::Reduction;
use gauss_layer::repair::ensure_positive_definite;
use gauss_layer::Result;

/// NLL of each sample under each neuron's Gaussian.
///
/// A `direct` layer whose precision is not positive definite is an error (see
/// [`crate::positive_definite`]).
///
/// # Shapes
/// `x`: (B, d) → (B, Z) for [`Reduction::None`], (Z) otherwise
pub fn layer_nll(layer: &GaussLayer, x: &Tensor, reduction: Reduction) -> Result<Tensor> {
    let d = layer.in_features();
    check::samples(x, "samples x", Some(d))?;
    check::dtype(x, "samples x", layer.center().dtype())?;
    ensure_positive_definite(layer.precision())?;
    let mahalanobis_sq = layer.mahalanobis_sq(x)?;
    let log_det = layer.precision().log_det_precision()?;
    reduction.apply(&nll_from_mahalanobis(&mahalanobis_sq, &log_det, d)?)
}
