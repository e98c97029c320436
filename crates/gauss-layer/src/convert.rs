//! Classical → Gaussian conversion (FGN paper): a trained `candle_nn::Linear` keeps its `W` and
//! `b`; each neuron's center goes on its zero line, `c = -b·w/|w|²` (the point of the
//! hyperplane `w·x + b = 0` closest to the origin), and its Gaussian starts wide,
//! `P = precision_scale · I`. Then `y = (Wx + b)·g` with `g ≈ 1` near the data: the converted
//! layer computes what the linear layer did there, up to a relative error `1 - g ≤ m2/2`, and
//! fades to 0 far away. Retrain afterwards (cross-entropy plus the λ-loss) to shrink the
//! Gaussians onto the data.
//!
//! A converted MLP matches the classical one when the classical hidden activation was `tanh`
//! (use [`ConvertOptions::tanh`]); a ReLU MLP converts only approximately (the Gaussian layer has
//! no ReLU), so retrain it.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use gauss_layer::convert::{linear_to_gauss_layer, ConvertOptions};
//!
//! let w = Tensor::new(&[[1.0f32, 2.0], [0.5, -1.0]], &Device::Cpu)?;
//! let b = Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?;
//! let linear = candle_nn::Linear::new(w, Some(b));
//! let layer = linear_to_gauss_layer(&linear, &ConvertOptions { precision_scale: 1e-3, ..Default::default() })?;
//! assert_eq!(layer.center().dims(), &[2, 2]);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{Tensor, D};
use candle_nn::Linear;

use crate::config::{GaussLayerConfig, Parameterization};
use crate::error::{GaussError, Result};
use crate::layer::GaussLayer;
use crate::net::{GaussNet, GaussNetConfig};
use crate::precision::Precision;

/// Options of the conversion.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvertOptions {
    /// Parameterization of the new precisions. Default: diag (cheap, and the FGN recipe).
    pub parameterization: Parameterization,
    /// Initial precision `P = precision_scale · I`. Small means wide: pick it well below
    /// `1 / E|x - c|²` over your data so that `g ≈ 1` there. Default `1e-3`.
    pub precision_scale: f64,
    /// `tanh` on the linear part of the hidden layers (set it when the classical MLP used tanh
    /// between layers). The output layer never gets `tanh`.
    pub tanh: bool,
    /// Gate each converted layer by the previous one's Gaussians ([`GaussNetConfig::gate`]).
    pub gate: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            parameterization: Parameterization::Diag,
            precision_scale: 1e-3,
            tanh: false,
            gate: true,
        }
    }
}

/// The point of each neuron's zero line closest to the origin, `c = -b·w/|w|²` (0 for a neuron
/// with `w = 0`, which has no zero line).
///
/// # Shapes
/// `weight`: (Z, d), `bias`: (Z) → (Z, d)
pub fn zero_line_centers(weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (z, d) = weight.dims2()?;
    if bias.dims() != [z] {
        return Err(GaussError::shape("bias", format!("({z})"), bias.dims()));
    }
    let _ = d;
    let norm_sq = weight.sqr()?.sum_keepdim(D::Minus1)?;
    let safe = norm_sq.maximum(f64::MIN_POSITIVE)?;
    let scale = (bias.unsqueeze(1)?.neg()? / safe)?;
    Ok(weight.broadcast_mul(&scale)?)
}

fn layer_from_parts(
    weight: Tensor,
    bias: Option<Tensor>,
    tanh: bool,
    options: &ConvertOptions,
) -> Result<GaussLayer> {
    if !options.precision_scale.is_finite() || options.precision_scale <= 0.0 {
        return Err(GaussError::config(
            "precision_scale",
            format!("must be finite and > 0, got {}", options.precision_scale),
        ));
    }
    let (z, d) = weight.dims2()?;
    let bias = match bias {
        Some(b) => b,
        None => Tensor::zeros(z, weight.dtype(), weight.device())?,
    };
    let center = zero_line_centers(&weight, &bias)?;
    let config = GaussLayerConfig {
        parameterization: options.parameterization,
        tanh,
        ..Default::default()
    };
    config.validate()?;
    let log_scale = options.precision_scale.ln();
    let precision = match options.parameterization {
        Parameterization::Sphere => Precision::from_raw(
            Tensor::full(log_scale, z, weight.device())?.to_dtype(weight.dtype())?,
            d,
            &config,
        )?,
        Parameterization::Diag => Precision::from_raw(
            Tensor::full(log_scale, (z, d), weight.device())?.to_dtype(weight.dtype())?,
            d,
            &config,
        )?,
        _ => {
            let eye = (Tensor::eye(d, weight.dtype(), weight.device())? * options.precision_scale)?;
            let p = eye.unsqueeze(0)?.repeat((z, 1, 1))?;
            Precision::from_precision_matrix(&p, &config)?
        }
    };
    GaussLayer::new(Some(weight), Some(bias), center, precision, config)
}

/// Converts one linear layer (no `tanh`).
pub fn linear_to_gauss_layer(linear: &Linear, options: &ConvertOptions) -> Result<GaussLayer> {
    layer_from_parts(
        linear.weight().clone(),
        linear.bias().cloned(),
        false,
        options,
    )
}

/// Converts a classical MLP (its `Linear` layers in order) to a [`GaussNet`] without batch norm
/// or dropout; hidden layers get `tanh` when [`ConvertOptions::tanh`] is set.
pub fn mlp_to_gauss_net(linears: &[Linear], options: &ConvertOptions) -> Result<GaussNet> {
    let Some((last, hidden)) = linears.split_last() else {
        return Err(GaussError::config(
            "linears",
            "at least one layer is needed, got 0",
        ));
    };
    let mut layers = Vec::with_capacity(linears.len());
    for linear in hidden {
        layers.push(layer_from_parts(
            linear.weight().clone(),
            linear.bias().cloned(),
            options.tanh,
            options,
        )?);
    }
    layers.push(layer_from_parts(
        last.weight().clone(),
        last.bias().cloned(),
        false,
        options,
    )?);
    let config = GaussNetConfig {
        in_features: layers[0].in_features(),
        hidden: layers[..layers.len() - 1]
            .iter()
            .map(GaussLayer::out_features)
            .collect(),
        out_features: layers[layers.len() - 1].out_features(),
        layer: layers[0].config().clone(),
        output_layer: Some(layers[layers.len() - 1].config().clone()),
        gate: options.gate,
        ..Default::default()
    };
    for (i, pair) in layers.windows(2).enumerate() {
        if pair[0].out_features() != pair[1].in_features() {
            return Err(GaussError::shape(
                format!("linear layer {}", i + 1),
                format!("(_, {}) to follow layer {i}", pair[0].out_features()),
                &[pair[1].out_features(), pair[1].in_features()],
            ));
        }
    }
    let norms = vec![None; layers.len() - 1];
    GaussNet::from_parts(config, None, layers, norms)
}
