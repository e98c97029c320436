//! Classical → Gaussian conversion (FGN paper): a trained `candle_nn::Linear` keeps its `W` and
//! `b`; each neuron's center goes on its zero line, `c = -b·w/|w|²` (the point of the
//! hyperplane `w·x + b = 0` closest to the origin), and its Gaussian starts wide. Then
//! `y = (Wx + b)·g` with `g ≈ 1` near the data: the converted layer computes what the linear
//! layer did there, up to a relative error `1 - g ≤ m2/2`, and fades to 0 far away. Retrain
//! afterwards (cross-entropy plus the λ-loss) to shrink the Gaussians onto the data: the
//! converted network holds plain tensors, so train the copy of
//! [`GaussNet::to_trainable`](crate::GaussNet::to_trainable), whose `VarMap` holds every one.
//!
//! How wide the Gaussians start ([`InitialWidth`]):
//! - [`InitialWidth::PrecisionScale`]: `P = scale · I` in every layer (default `1e-3`);
//! - [`InitialWidth::FgnOriginal`]: the rule of the original PyTorch `convert_classic_to_fgn`
//!   (grezesf/FGN---Research, `Finite_Gaussian_Network_lib/convert_classic_to_fgn.py`, HEAD
//!   2399b1d), per layer from that layer's number of neurons Z. The original fills
//!   `inv_covars` with `σ = 1/(init_factor·Z)` (`default_sigma = init_factor*out_features`,
//!   `default_inv_covar = 1/default_sigma`; `init_factor` 10 by default) and reads it with
//!   its forward's conventions (see [`crate::import`]), so here
//!
//!   | `covar_type` | original `inv_covars` | `P` here |
//!   |---|---|---|
//!   | `sphere` | `σ` (Z) | `2σ²·I` |
//!   | `diag` | `σ` (Z, d) | `2σ²·I` |
//!   | `full` | `σ·I` (Z, d, d) | `A + Aᵀ = 2σ·I` (the special case: not squared) |
//!   | `chol` | `σ·I` (Z, d, d) | `2·σI·σI = 2σ²·I` |
//!
//!   with the original's centers `(−b/(w·w))·w` (identical to [`zero_line_centers`]) and its
//!   weights and biases unchanged. [`ConvertOptions::fgn_original`] also sets what the
//!   original's FGN net does: `tanh` on the hidden layers (`non_lin`, matching the classical
//!   net's `tanh`), none on the final layer, and gating.
//!
//! A converted MLP follows the classical one when the classical hidden activation was `tanh`
//! (use [`ConvertOptions::tanh`]); a ReLU MLP converts only approximately (the Gaussian layer
//! has no ReLU), so retrain it. The bound `1 - g ≤ m2/2` holds per layer; through a network
//! the errors compound (each layer's output error moves the next layer's input, and the gate
//! multiplies the Gaussians): a converted 6 → 16 → 3 tanh MLP moved its logits by up to 0.37
//! (logits up to 9.4) while its largest `m2/2` per layer was 0.026, and predicted the same
//! class for every input. Check the converted network on your data before relying on it.
//!
//! The Gaussians start wide: in that 6-D network, with the default `PrecisionScale(1e-3)`,
//! inputs drawn as `10·N(0, I)` (norm ≈ 25) still got `max_gaussian` 0.75, and only inputs of
//! `100·N(0, I)` (norm ≈ 250) got 1e-4 ("I don't know"), until retraining narrows them. The λ-loss (the mean covariance eigenvalue) then starts
//! at `1/scale` = 1000 rather than at `d`: scale `lambda_sigma` down accordingly, or the
//! λ-loss dominates the first steps of the fine-tuning (with `lambda_sigma = 0.05` it was 50
//! of a starting objective of about 50, and test accuracy fell from 0.950 to 0.927). A whole `Feedforward_Classic_net` state dict (input batch
//! norm, linear layers, batch norms) converts with [`classic_net_from_tensors`] or
//! [`convert_classic_net`], which keep its batch norms as the original does.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use gauss_layer::convert::{linear_to_gauss_layer, ConvertOptions, InitialWidth};
//!
//! let w = Tensor::new(&[[1.0f32, 2.0], [0.5, -1.0]], &Device::Cpu)?;
//! let b = Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?;
//! let linear = candle_nn::Linear::new(w, Some(b));
//! let options = ConvertOptions { width: InitialWidth::PrecisionScale(1e-3), ..Default::default() };
//! let layer = linear_to_gauss_layer(&linear, &options)?;
//! assert_eq!(layer.center().dims(), &[2, 2]);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

mod classic;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::Linear;

use crate::config::{GaussLayerConfig, Parameterization, PrecisionConfig};
use crate::error::{check_device, check_dtype, check_float_dtype, GaussError, Result};
use crate::import::FgnCovarType;
use crate::layer::GaussLayer;
use crate::linalg;
use crate::net::{GaussNet, GaussNetConfig};
use crate::precision::Precision;

pub use classic::{classic_net_from_tensors, convert_classic_net};

/// How wide the converted Gaussians start (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InitialWidth {
    /// `P = scale · I` in every layer. Small means wide: pick it well below `1 / E|x - c|²`
    /// over your data so that `g ≈ 1` there.
    PrecisionScale(f64),
    /// The original `convert_classic_to_fgn` rule: per layer `σ = 1/(init_factor·Z)`,
    /// `P = 2σ²·I` (sphere, diag, chol) or `2σ·I` (full).
    FgnOriginal {
        /// The original's `init_factor` (its default is 10).
        init_factor: f64,
        /// The original FGN net's `covar_type`, which decides the formula.
        covar_type: FgnCovarType,
    },
}

impl InitialWidth {
    /// The diagonal value of `P` for a layer of `z` neurons.
    ///
    /// # Errors
    /// [`GaussError::InvalidConfig`] when the scale or `init_factor` is not finite and
    /// positive.
    pub fn precision_scale(&self, z: usize) -> Result<f64> {
        let scale = match *self {
            InitialWidth::PrecisionScale(scale) => scale,
            InitialWidth::FgnOriginal {
                init_factor,
                covar_type,
            } => {
                if !init_factor.is_finite() || init_factor <= 0.0 {
                    return Err(GaussError::config(
                        "init_factor",
                        format!("must be finite and > 0, got {init_factor}"),
                    ));
                }
                let sigma = 1.0 / (init_factor * z as f64);
                match covar_type {
                    FgnCovarType::Full => 2.0 * sigma,
                    _ => 2.0 * sigma * sigma,
                }
            }
        };
        if !scale.is_finite() || scale <= 0.0 {
            return Err(GaussError::config(
                "precision_scale",
                format!("must be finite and > 0, got {scale}"),
            ));
        }
        Ok(scale)
    }
}

/// Options of the conversion.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvertOptions {
    /// Parameterization of the new precisions. Default: diag (cheap, and the FGN recipe).
    pub parameterization: Parameterization,
    /// How wide the Gaussians start. Default `PrecisionScale(1e-3)`.
    pub width: InitialWidth,
    /// `tanh` on the linear part of the hidden layers (set it when the classical MLP used tanh
    /// between layers). The output layer never gets `tanh`. Default `false`.
    pub tanh: bool,
    /// Gate each converted layer by the previous one's Gaussians ([`GaussNetConfig::gate`]).
    /// Default `true`.
    pub gate: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            parameterization: Parameterization::Diag,
            width: InitialWidth::PrecisionScale(1e-3),
            tanh: false,
            gate: true,
        }
    }
}

impl ConvertOptions {
    /// What the original `convert_classic_to_fgn` makes of a `Feedforward_Classic_net` for a
    /// `Feedforward_FGN_net(covar_type=…, non_lin=True)`: its width rule, the parameterization
    /// that holds that `covar_type` exactly, `tanh` on the hidden layers (the classical net's
    /// activation) and gating (the original's network forward).
    pub fn fgn_original(covar_type: FgnCovarType, init_factor: f64) -> Self {
        Self {
            parameterization: covar_type.parameterization(),
            width: InitialWidth::FgnOriginal {
                init_factor,
                covar_type,
            },
            tanh: true,
            gate: true,
        }
    }
}

/// The point of each neuron's zero line closest to the origin, `c = -b·w/|w|²` (0 for a neuron
/// with `w = 0`, which has no zero line).
///
/// # Shapes
/// `weight`: (Z, d), `bias`: (Z) → (Z, d)
///
/// # Errors
/// [`GaussError::Shape`] when `weight` is not (Z, d) or `bias` is not (Z);
/// [`GaussError::DType`] for a weight of an integer dtype; [`GaussError::DType`] or
/// [`GaussError::DeviceMismatch`] when the bias is not of the weight's dtype and device.
pub fn zero_line_centers(weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (z, _) = check_weight(weight)?;
    if bias.dims() != [z] {
        return Err(GaussError::shape("bias", format!("({z})"), bias.dims()));
    }
    check_dtype("bias", bias, weight.dtype(), "the weight")?;
    check_device("bias", bias, weight.device(), "the weight")?;
    // In f32 for f16 and bf16: |w|² overflows f16 from |w| = 256 and loses its small terms
    // in a half-precision sum.
    let dtype = weight.dtype();
    let accumulation = linalg::accumulation_dtype(dtype);
    let (weight, bias) = (weight.to_dtype(accumulation)?, bias.to_dtype(accumulation)?);
    let norm_sq = weight.sqr()?.sum_keepdim(D::Minus1)?;
    // A dead neuron (|w|² = 0) is selected, not floored: a floor such as f64::MIN_POSITIVE
    // rounds to 0 in f32 (b/0), and in f64 gives -b/floor = ∞ for |b| ≥ 4, then 0·∞ = NaN.
    // Its denominator becomes 1 so the branch `where_cond` discards is finite too (a NaN
    // there would still reach the gradient).
    let dead = norm_sq.eq(0.0)?;
    let ones = norm_sq.ones_like()?;
    let safe = dead.where_cond(&ones, &norm_sq)?;
    let scale = (bias.unsqueeze(1)?.neg()? / safe)?;
    let scale = dead.where_cond(&scale.zeros_like()?, &scale)?;
    Ok(weight.broadcast_mul(&scale)?.to_dtype(dtype)?)
}

/// `weight`'s (Z, d), refusing another rank (Candle's "unexpected rank") and an integer
/// dtype (Candle's `sqr` panicked on it).
fn check_weight(weight: &Tensor) -> Result<(usize, usize)> {
    let &[z, d] = weight.dims() else {
        return Err(GaussError::shape("weight", "(Z, d)", weight.dims()));
    };
    check_float_dtype("weight", weight.dtype())?;
    Ok((z, d))
}

/// Refuses a center that is not finite: `Data` when the neuron's weight or bias is not
/// finite, `Numerical` when they are but `|b|/|w|` does not fit the dtype (the state-dict
/// conversion refuses both too, `import::net`'s dtype check).
fn check_centers_finite(weight: &Tensor, bias: &Tensor, center: &Tensor) -> Result<()> {
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)? // f64: on the host
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let (z, d) = center.dims2()?;
    let centers = host(center)?;
    let Some(neuron) = (0..z).find(|&n| centers[n * d..(n + 1) * d].iter().any(|v| !v.is_finite()))
    else {
        return Ok(());
    };
    let (weights, biases) = (host(weight)?, host(bias)?);
    let row = &weights[neuron * d..(neuron + 1) * d];
    let b = biases[neuron];
    if !b.is_finite() || row.iter().any(|v| !v.is_finite()) {
        return Err(GaussError::data(
            "linear layer",
            format!(
                "neuron {neuron}: its weights or bias hold a non-finite value (bias {b}); a center needs finite ones"
            ),
        ));
    }
    let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
    Err(GaussError::Numerical {
        what: "zero-line center".into(),
        reason: format!(
            "neuron {neuron}: the center −b·w/|w|² is {:e} from the origin (|b| = {:e}, |w| = {norm:e}), which is not finite in {:?}; convert in a wider dtype (f32)",
            b.abs() / norm,
            b.abs(),
            center.dtype()
        ),
    })
}

pub(crate) fn layer_from_parts(
    weight: Tensor,
    bias: Option<Tensor>,
    tanh: bool,
    options: &ConvertOptions,
) -> Result<GaussLayer> {
    let (z, d) = check_weight(&weight)?;
    let precision_scale = options.width.precision_scale(z)?;
    let bias = match bias {
        Some(b) => b,
        None => Tensor::zeros(z, weight.dtype(), weight.device())?,
    };
    let center = zero_line_centers(&weight, &bias)?;
    check_centers_finite(&weight, &bias, &center)?;
    let config = GaussLayerConfig {
        precision: PrecisionConfig::with_parameterization(options.parameterization),
        tanh,
        ..Default::default()
    };
    config.validate()?;
    let log_scale = precision_scale.ln();
    let precision = match options.parameterization {
        // Filled in the weights' dtype on their device (`full` of an f64 value would make an
        // f64 tensor there, which Metal cannot hold).
        Parameterization::Sphere => Precision::from_raw(
            (Tensor::ones(z, weight.dtype(), weight.device())? * log_scale)?,
            d,
            &config,
        )?,
        Parameterization::Diag => Precision::from_raw(
            (Tensor::ones((z, d), weight.dtype(), weight.device())? * log_scale)?,
            d,
            &config,
        )?,
        _ => {
            let eye = (Tensor::eye(d, weight.dtype(), weight.device())? * precision_scale)?;
            let p = eye.unsqueeze(0)?.repeat((z, 1, 1))?;
            Precision::from_precision_matrix(&p, &config)?
        }
    };
    GaussLayer::new(Some(weight), Some(bias), center, precision, config)
}

/// Converts one linear layer (no `tanh`).
///
/// # Errors
/// [`GaussError::InvalidConfig`] for a non-positive width; as [`zero_line_centers`]; [`GaussError::Data`] for a neuron whose weights or
/// bias are not finite, [`GaussError::Numerical`] for one whose center `-b·w/|w|²` is not
/// finite in the dtype.
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
///
/// # Errors
/// [`GaussError::InvalidConfig`] for no layers or a non-positive width; [`GaussError::Shape`]
/// when consecutive layers do not fit; as [`linear_to_gauss_layer`].
pub fn mlp_to_gauss_net(linears: &[Linear], options: &ConvertOptions) -> Result<GaussNet> {
    let Some((last, hidden)) = linears.split_last() else {
        return Err(GaussError::config(
            "linears",
            "at least one layer is needed, got 0",
        ));
    };
    let hidden = hidden
        .iter()
        .map(|linear| {
            let layer = layer_from_parts(
                linear.weight().clone(),
                linear.bias().cloned(),
                options.tanh,
                options,
            )?;
            Ok((layer, None))
        })
        .collect::<Result<Vec<_>>>()?;
    let last = layer_from_parts(last.weight().clone(), last.bias().cloned(), false, options)?;
    let eps = GaussNetConfig::default().batch_norm_eps;
    GaussNet::from_layers(
        None,
        hidden,
        last,
        options.gate,
        eps,
        "in the order of the linears",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    /// A dead neuron (w = 0) has no zero line: its center is 0 (the documented value), never
    /// NaN, in f32 (where a MIN_POSITIVE floor is 0) and f64 (where b/MIN_POSITIVE is ∞ for
    /// |b| ≥ 4), and the live neuron keeps `c = -b·w/|w|²`.
    #[test]
    fn a_dead_neuron_gets_a_zero_center_and_finite_outputs() -> Result<()> {
        for dtype in [DType::F32, DType::F64] {
            for dead_bias in [0.5, 5.0] {
                let weight =
                    Tensor::new(&[[0.0f64, 0.0], [1.0, 1.0]], &Device::Cpu)?.to_dtype(dtype)?;
                let bias = Tensor::new(&[dead_bias, 1.0f64], &Device::Cpu)?.to_dtype(dtype)?;
                let linear = Linear::new(weight, Some(bias));
                let layer = linear_to_gauss_layer(&linear, &ConvertOptions::default())?;
                // f64: a unit test on Device::Cpu (the tensors above are built there)
                let center = layer.center().to_dtype(DType::F64)?.to_vec2::<f64>()?;
                // Live neuron: -b·w/|w|² = -1·(1, 1)/2.
                assert_eq!(
                    center,
                    vec![vec![0.0, 0.0], vec![-0.5, -0.5]],
                    "{dtype:?}, b = {dead_bias}"
                );
                let x =
                    Tensor::new(&[[0.3f64, -2.0], [10.0, 4.0]], &Device::Cpu)?.to_dtype(dtype)?;
                // f64: a unit test on Device::Cpu (the tensors above are built there)
                let y = layer.forward(&x)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                assert!(
                    y.iter().flatten().all(|v| v.is_finite()),
                    "{dtype:?}, b = {dead_bias}: {y:?}"
                );
            }
        }
        Ok(())
    }

    /// |w|² was summed in the weights' dtype: in f16, w = (300, 0) gave |w|² = ∞ (past 65504)
    /// and the center 0 instead of −b·w/|w|² = (−0.01, 0), and w = (0.004, 0.004) a subnormal
    /// |w|² and −124.81 instead of −125; in bf16, the sum of 512 squares 0.05² stalled (ulp
    /// 2⁻⁷ at 1) at 1.0 instead of 1.28, so the centers came out 28% too far (−0.0500
    /// instead of −0.0391). Now in f32.
    #[test]
    fn half_precision_centers_are_computed_in_f32() -> Result<()> {
        let device = Device::Cpu;
        // f64: reference values on the host, from the inputs as the dtype holds them.
        let round = |v: f64, dtype: DType| -> Result<f64> {
            Ok(Tensor::new(&[v], &Device::Cpu)?
                .to_dtype(dtype)?
                .to_dtype(DType::F64)? // f64: on the host
                .to_vec1::<f64>()?[0])
        };
        let cases: Vec<(DType, Vec<Vec<f64>>, Vec<f64>)> = vec![
            (
                DType::F16,
                vec![vec![300.0, 0.0], vec![0.004, 0.004]],
                vec![3.0, 1.0],
            ),
            (DType::BF16, vec![vec![0.05; 512]], vec![1.0]),
        ];
        for (dtype, weight, bias) in cases {
            let weight: Vec<Vec<f64>> = weight
                .iter()
                .map(|row| row.iter().map(|&v| round(v, dtype)).collect())
                .collect::<Result<_>>()?;
            let bias: Vec<f64> = bias
                .iter()
                .map(|&v| round(v, dtype))
                .collect::<Result<_>>()?;
            let w = Tensor::new(weight.clone(), &device)?.to_dtype(dtype)?;
            let b = Tensor::new(bias.clone(), &device)?.to_dtype(dtype)?;
            let centers = zero_line_centers(&w, &b)?
                .to_dtype(DType::F64)? // f64: on the host (a CPU tensor)
                .to_vec2::<f64>()?;
            for (z, (row, b)) in weight.iter().zip(&bias).enumerate() {
                // Closed form c = −b·w/|w|², in f64, then as the dtype holds it.
                let norm_sq: f64 = row.iter().map(|v| v * v).sum();
                for (i, w) in row.iter().enumerate() {
                    let expected = round(-b * w / norm_sq, dtype)?;
                    assert_eq!(centers[z][i], expected, "{dtype:?}: neuron {z}, entry {i}");
                }
            }
        }
        Ok(())
    }

    /// A bias of another dtype than the weight failed inside a Candle op; it is the typed
    /// error naming both dtypes now.
    #[test]
    fn a_bias_of_another_dtype_is_a_dtype_error() -> Result<()> {
        let weight = Tensor::new(&[[1.0f32, 2.0]], &Device::Cpu)?;
        let bias = Tensor::new(&[1.0f32], &Device::Cpu)?.to_dtype(DType::F16)?;
        let err = zero_line_centers(&weight, &bias).unwrap_err();
        assert!(matches!(err, GaussError::DType { .. }), "{err}");
        let linear = Linear::new(weight, Some(bias));
        let err = linear_to_gauss_layer(&linear, &ConvertOptions::default()).unwrap_err();
        assert!(matches!(err, GaussError::DType { .. }), "{err}");
        Ok(())
    }

    /// A center that does not fit the dtype (f16: |b|/|w| = 10/1e-4 = 1e5 > 65504) became ±∞
    /// and the layer was built; a weight holding NaN gave a NaN center. Both are refused,
    /// naming the neuron, as the state-dict conversion refuses them.
    #[test]
    fn a_center_that_is_not_finite_in_the_dtype_is_refused() -> Result<()> {
        let options = ConvertOptions {
            // ln 0.01 = −4.6 is within f16's raw bound for diag (±5.5).
            width: InitialWidth::PrecisionScale(1e-2),
            ..Default::default()
        };
        let weight = Tensor::new(&[[1.0f32, 1.0], [1e-4, 0.0]], &Device::Cpu)?;
        let bias = Tensor::new(&[1.0f32, 10.0], &Device::Cpu)?;
        // In f32 the center (−1e5, 0) fits.
        linear_to_gauss_layer(&Linear::new(weight.clone(), Some(bias.clone())), &options)?;
        let half = Linear::new(
            weight.to_dtype(DType::F16)?,
            Some(bias.to_dtype(DType::F16)?),
        );
        let err = linear_to_gauss_layer(&half, &options).unwrap_err();
        assert!(matches!(err, GaussError::Numerical { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("neuron 1") && text.contains("F16"), "{text}");

        let weight = Tensor::new(&[[1.0f32, 1.0], [f32::NAN, 0.0]], &Device::Cpu)?;
        let err = linear_to_gauss_layer(&Linear::new(weight, Some(bias)), &options).unwrap_err();
        assert!(matches!(err, GaussError::Data { .. }), "{err}");
        assert!(err.to_string().contains("neuron 1"), "{err}");
        Ok(())
    }

    /// A `Linear` of an integer dtype, or with a weight that is not a matrix, is a typed error
    /// naming the weight: integer weights panicked in Candle's `sqr` ("no unary function for
    /// u8"), and a vector weight was Candle's "unexpected rank".
    #[test]
    fn integer_or_non_matrix_weights_are_typed_errors() -> Result<()> {
        let options = ConvertOptions::default();
        for dtype in [DType::U8, DType::U32, DType::I64] {
            let weight = Tensor::ones((2, 3), dtype, &Device::Cpu)?;
            let bias = Tensor::zeros(2, dtype, &Device::Cpu)?;
            let linear = Linear::new(weight.clone(), Some(bias.clone()));
            for result in [
                linear_to_gauss_layer(&linear, &options).map(|_| ()),
                mlp_to_gauss_net(std::slice::from_ref(&linear), &options).map(|_| ()),
                zero_line_centers(&weight, &bias).map(|_| ()),
            ] {
                match result {
                    Err(GaussError::DType { what, got, .. }) => {
                        assert_eq!((what.as_str(), got), ("weight", dtype))
                    }
                    other => panic!("{dtype:?}: expected a DType error, got {other:?}"),
                }
            }
        }
        let vector = Tensor::ones(3, DType::F32, &Device::Cpu)?;
        let linear = Linear::new(vector.clone(), None);
        let err = linear_to_gauss_layer(&linear, &options).unwrap_err();
        assert!(
            matches!(&err, GaussError::Shape { what, .. } if what == "weight"),
            "{err}"
        );
        let bias = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        let err = zero_line_centers(&vector, &bias).unwrap_err();
        assert!(
            matches!(&err, GaussError::Shape { what, .. } if what == "weight"),
            "{err}"
        );
        Ok(())
    }
}
