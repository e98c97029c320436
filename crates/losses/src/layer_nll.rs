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
use crate::reduction::Reduction;
use gauss_layer::Result;

/// NLL of each sample under each neuron's Gaussian.
///
/// The negative of [`GaussLayer::log_prob`]. A `direct` layer whose precision is not
/// positive definite is an error (see [`gauss_layer::repair::ensure_positive_definite`]).
///
/// # Fitting by gradient descent
/// A fresh layer's centers start near 0 (N(0, 0.1²), `init.center_std`) with precisions
/// near `I/d` (`init.precision_scale`), so data far from the origin start deep in the tails:
/// with data offset by +100, AdamW stalled at a mean NLL of 10.6 against the optimum 6.3 in
/// one reproduction. Standardize such data first, or start the layer from the data:
/// [`GaussLayer::from_covariance`] with the sample mean and covariance (for one Gaussian,
/// already the maximum-likelihood fit), [`gauss_layer::GaussianMixture::fit`] (or
/// [`gauss_layer::GaussianMixture::init_from_kmeans`]) for a mixture, or, for a layer built
/// through a `VarBuilder`, `VarMap::set_one("<prefix>.center", means)` before training.
///
/// # Shapes
/// `x`: (B, d) → (B, Z) for [`Reduction::None`], (Z) otherwise
///
/// # Errors
/// Samples that are not (B, d) with B ≥ 1 or of another dtype; a `direct` precision that is
/// not positive definite ([`gauss_layer::GaussError::NotPositiveDefinite`]).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{Optimizer, VarBuilder, VarMap};
/// use gauss_layer::{gauss_layer, GaussLayerConfig};
/// use gauss_losses::{layer_nll, Reduction};
/// // Fit one Gaussian to data by gradient descent on its mean NLL.
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
/// let config = GaussLayerConfig { gaussian_only: true, ..Default::default() };
/// let layer = gauss_layer(2, 1, config, vb)?;
/// let x = (Tensor::randn(0f64, 1.0, (256, 2), &Device::Cpu)? + 3.0)?;
/// let mut optimizer = candle_nn::AdamW::new_lr(varmap.all_vars(), 0.1)?;
/// let first = layer_nll(&layer, &x, Reduction::Mean)?.to_vec1::<f64>()?[0];
/// for _ in 0..50 {
///     optimizer.backward_step(&layer_nll(&layer, &x, Reduction::Mean)?.sum_all()?)?;
/// }
/// let last = layer_nll(&layer, &x, Reduction::Mean)?.to_vec1::<f64>()?[0];
/// assert!(last < first);
/// # Ok::<(), gauss_layer::GaussError>(())
/// ```
pub fn layer_nll(layer: &GaussLayer, x: &Tensor, reduction: Reduction) -> Result<Tensor> {
    let d = layer.in_features();
    check::samples(x, "samples x", Some(d))?;
    gauss_layer::check_dtype("samples x", x, layer.center().dtype(), "the layer's center")?;
    // The layer's own density (its positive-definiteness check, kernel and log-det).
    reduction.apply(&layer.log_prob(x)?.neg()?)
}
