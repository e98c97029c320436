//! Gaussian-mixture NLL over the neurons of a [`GaussLayer`], with learnable mixture
//! weights `π = softmax(logits)`:
//!
//! `nll(x) = −log Σ_z π_z N(x | c_z, P_z⁻¹) = −logsumexp_z(log π_z − nll_z(x))`.
//!
//! Everything stays in the log domain (a stable log-sum-exp,
//! [`gauss_layer::ops::log_sum_exp`]), so far-away samples give large finite losses rather
//! than `−log 0` while their squared Mahalanobis distances are representable in the dtype
//! (f64 to |x| ≈ 1e154, f32 to ≈ 1e19 for unit precisions). A sample holding ±∞ (and no NaN)
//! has NLL +∞ in every component and in the mixture, never NaN. A finite sample beyond that
//! range overflows `m2`: +∞ in most kernels, but NaN where the expanded form's terms of
//! opposite signs overflow (`direct` on the CPU; `docs/design.md`, "Edge semantics"), and NaN in any
//! component makes the mixture NaN. Where every component is +∞ the loss is +∞ and the
//! gradient of the logits for that sample is NaN (the softmax of −∞ alone, as in torch).
//! Minimizing the mean over the layer's centers, precisions and the logits fits the layer as
//! a mixture by gradient descent.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use gauss_layer::{gauss_layer, GaussLayerConfig};
//! use gauss_losses::{mixture_logits, mixture_nll, Reduction};
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
//! let layer = gauss_layer(2, 3, GaussLayerConfig::default(), vb.pp("layer"))?;
//! let logits = mixture_logits(3, vb.pp("mixture"))?;
//! let x = Tensor::randn(0.0f64, 1.0, (8, 2), &Device::Cpu)?;
//! let loss = mixture_nll(&layer, &x, &logits, Reduction::Mean)?;
//! assert_eq!(loss.dims(), &[] as &[usize]);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use gauss_layer::{ops, GaussLayer};

use crate::check;
use crate::layer_nll::layer_nll;
use crate::reduction::Reduction;
use gauss_layer::{GaussError, Result};

/// The learnable mixture logits of `num_components` components, named `mixture_logits` in
/// `vb`, initialized to zero (equal weights).
///
/// # Shapes
/// → (Z)
///
/// # Errors
/// A tensor the builder already holds under that name with another shape
/// ([`GaussError::InvalidConfig`] on `num_components`).
pub fn mixture_logits(num_components: usize, vb: VarBuilder) -> Result<Tensor> {
    const NAME: &str = "mixture_logits";
    vb.get_with_hints(num_components, NAME, Init::Const(0.0))
        .map_err(|error| {
            if vb.contains_tensor(NAME) {
                // Candle's message ("shape mismatch on …: [2] <> [1]") comes with a backtrace.
                GaussError::config(
                    "num_components",
                    format!(
                        "{num_components}: the VarBuilder already holds `{NAME}` for another number of components"
                    ),
                )
            } else {
                error.into()
            }
        })
}

/// Mixture NLL from the per-component NLLs; the logits are normalized with `log_softmax`,
/// so any real logits are valid. A sample whose every component NLL is +∞ has mixture NLL
/// +∞ (see the module docs).
///
/// # Shapes
/// `component_nll`: (B, Z), `logits`: (Z) → (B) for [`Reduction::None`], () otherwise
///
/// # Errors
/// An empty batch, no components or a non-float dtype; logits of another length, dtype or
/// device.
pub fn mixture_nll_from_components(
    component_nll: &Tensor,
    logits: &Tensor,
    reduction: Reduction,
) -> Result<Tensor> {
    let (_, components) = check::samples(component_nll, "component nll", None)?;
    check::float_dtype(component_nll, "component nll")?;
    if components == 0 {
        return Err(GaussError::shape(
            "component nll",
            "(batch, components) with at least one component",
            component_nll.dims(),
        ));
    }
    check::vector(logits, "mixture logits", components)?;
    gauss_layer::check_dtype(
        "mixture logits",
        logits,
        component_nll.dtype(),
        "component nll",
    )?;
    gauss_layer::check_device(
        "mixture logits",
        logits,
        component_nll.device(),
        "component nll",
    )?;
    let log_weights = candle_nn::ops::log_softmax(logits, 0)?;
    let log_joint = log_weights.broadcast_sub(component_nll)?;
    // +∞ (not Candle's NaN) for a sample whose every component NLL is +∞.
    let nll = ops::log_sum_exp(&log_joint, 1)?.neg()?;
    reduction.apply(&nll)
}

/// Mixture NLL of samples `x` under the layer's neurons weighted by `softmax(logits)`.
///
/// # Shapes
/// `x`: (B, d), `logits`: (Z) → (B) for [`Reduction::None`], () otherwise
///
/// # Errors
/// Logits that are not one per neuron; as [`crate::layer_nll()`].
pub fn mixture_nll(
    layer: &GaussLayer,
    x: &Tensor,
    logits: &Tensor,
    reduction: Reduction,
) -> Result<Tensor> {
    let components = layer.out_features();
    if logits.dims() != [components] {
        return Err(GaussError::shape(
            "mixture logits",
            format!("({components}), one per neuron"),
            logits.dims(),
        ));
    }
    let component_nll = layer_nll(layer, x, Reduction::None)?;
    mixture_nll_from_components(&component_nll, logits, reduction)
}
