//! The Gaussian-neuron layer (Finite Gaussian Neuron): `y = (Wx + b) · g`.
//!
//! SKELETON: signatures are the contract other modules build on; bodies are being filled in.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::config::GaussLayerConfig;
use crate::error::Result;
use crate::precision::Precision;

/// A layer of `out_features` Gaussian neurons over `in_features` inputs.
#[derive(Clone, Debug)]
pub struct GaussLayer {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    center: Tensor,
    precision: Precision,
    config: GaussLayerConfig,
}

impl GaussLayer {
    /// Builds a layer from tensors.
    ///
    /// # Shapes
    /// `weight`: (Z, d) (`None` only for `gaussian_only`), `bias`: (Z) (`None` for tied bias,
    /// gaussian-only, or no bias), `center`: (Z, d); `precision` over Z neurons and d dims.
    pub fn new(
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        center: Tensor,
        precision: Precision,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        let _ = (weight, bias, center, precision, config);
        todo!()
    }

    /// Output `y` and the (gated) Gaussian activations `g`, gated by `prev_g` when given.
    ///
    /// # Shapes
    /// `x`: (B, d), `prev_g`: (B, K) → `y`: (B, Z), `g`: (B, Z)
    pub fn forward_with_gaussian(
        &self,
        x: &Tensor,
        prev_g: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let _ = (x, prev_g);
        todo!()
    }

    /// Squared Mahalanobis distances through the configured kernel.
    ///
    /// # Shapes
    /// `x`: (B, d) → (B, Z)
    pub fn mahalanobis_sq(&self, x: &Tensor) -> Result<Tensor> {
        let _ = x;
        todo!()
    }

    /// `d`.
    pub fn in_features(&self) -> usize {
        self.center.dims()[1]
    }

    /// `Z`.
    pub fn out_features(&self) -> usize {
        self.center.dims()[0]
    }

    /// The linear weights (Z, d), if any.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// The stored bias (Z), if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The centers (Z, d).
    pub fn center(&self) -> &Tensor {
        &self.center
    }

    /// The precision parameterization.
    pub fn precision(&self) -> &Precision {
        &self.precision
    }

    /// The config.
    pub fn config(&self) -> &GaussLayerConfig {
        &self.config
    }
}

impl candle_nn::Module for GaussLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward_with_gaussian(x, None)?.0)
    }
}

/// Creates (or loads) a layer through a `VarBuilder`. Tensor names: `weight` (Z, d),
/// `bias` (Z), `center` (Z, d), and the precision's raw tensor under
/// [`Precision::tensor_name`].
pub fn gauss_layer(
    in_features: usize,
    out_features: usize,
    config: GaussLayerConfig,
    vb: VarBuilder,
) -> Result<GaussLayer> {
    let _ = (in_features, out_features, config, vb);
    todo!()
}
