//! The Gaussian-neuron layer (Finite Gaussian Neuron): `y = (Wx + b) · g`.
//!
//! `g = exp(-m2/2)` with `m2 = (x − c)ᵀ P (x − c)` per neuron; options (see
//! [`GaussLayerConfig`]): `tanh` on the linear part, tied bias `b = −W·c`, Gaussian-only
//! output `y = g`, gating by the previous layer's Gaussians, a width floor.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Module, VarBuilder, VarMap};
//! use gauss_layer::{gauss_layer, GaussLayerConfig};
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let layer = gauss_layer(4, 3, GaussLayerConfig::default(), vb.pp("gauss"))?;
//! let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
//! let (y, g) = layer.forward_with_gaussian(&x, None)?;
//! assert_eq!(y.dims(), &[2, 3]);
//! assert_eq!(g.dims(), &[2, 3]);
//! // Tensors are registered as gauss.weight, gauss.bias, gauss.center, gauss.precision_factor.
//! assert!(varmap.data().lock().unwrap().contains_key("gauss.precision_factor"));
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{Shape, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::config::GaussLayerConfig;
use crate::cpu::Sizes;
use crate::error::{check_device, check_dtype, check_float_dtype, GaussError, Result};
use crate::init::{self, InitStream};
use crate::kernels::{self, layer_op, ResolvedKernel};
use crate::ops;
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
    /// Every tensor must have the dtype and device of `center`. The precision must have been
    /// built with the precision part of `config` ([`GaussLayerConfig::precision`]: the
    /// parameterization, positive map, factor floor, width floor and `portable`), e.g.
    /// `Precision::from_raw(raw, d, &config)`.
    ///
    /// # Shapes
    /// `weight`: (Z, d) (`None` only for `gaussian_only`), `bias`: (Z) (`None` for tied bias,
    /// gaussian-only, or no bias), `center`: (Z, d); `precision` over Z neurons and d dims.
    ///
    /// # Errors
    /// An invalid config; a tensor of the wrong shape, dtype or device (the message names
    /// it); a weight or bias the config does not allow (or a missing weight); a precision
    /// built with another precision config.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use gauss_layer::{GaussLayer, GaussLayerConfig, Parameterization, Precision};
    /// let config = GaussLayerConfig::with_parameterization(Parameterization::Diag);
    /// let (z, d) = (3, 2);
    /// let weight = Tensor::ones((z, d), DType::F32, &Device::Cpu)?;
    /// let center = Tensor::zeros((z, d), DType::F32, &Device::Cpu)?;
    /// let raw = Tensor::zeros((z, d), DType::F32, &Device::Cpu)?; // P = I
    /// let precision = Precision::from_raw(raw, d, &config)?;
    /// let layer = GaussLayer::new(Some(weight), None, center, precision, config)?;
    /// // At x = (1, 1): m2 = 2, g = e^-1, y = (1 + 1)·e^-1.
    /// let (y, g) = layer.forward_with_gaussian(&Tensor::ones((1, d), DType::F32, &Device::Cpu)?, None)?;
    /// assert!((y.to_vec2::<f32>()?[0][0] - 2.0 * (-1f32).exp()).abs() < 1e-6);
    /// # Ok::<(), gauss_layer::GaussError>(())
    /// ```
    pub fn new(
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        center: Tensor,
        precision: Precision,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        config.validate()?;
        let cd = center.dims();
        if cd.len() != 2 || cd[0] == 0 || cd[1] == 0 {
            return Err(GaussError::shape("center", "(Z, d) with Z, d >= 1", cd));
        }
        let (z, d) = (cd[0], cd[1]);
        let dtype = center.dtype();
        check_float_dtype("center", dtype)?;
        match (&weight, config.gaussian_only) {
            (Some(_), true) => {
                return Err(GaussError::config(
                    "gaussian_only",
                    "a Gaussian-only layer has no linear part, but a weight was given",
                ))
            }
            (None, false) => {
                return Err(GaussError::config(
                    "gaussian_only",
                    "is false, so the layer needs a weight (Z, d), but none was given",
                ))
            }
            (Some(w), false) => {
                if w.dims() != [z, d] {
                    return Err(GaussError::shape("weight", format!("({z}, {d})"), w.dims()));
                }
                check_dtype("weight", w, dtype, "center")?;
                check_device("weight", w, center.device(), "center")?;
            }
            (None, true) => {}
        }
        if let Some(b) = &bias {
            if config.tied_bias || config.gaussian_only {
                return Err(GaussError::config(
                    if config.tied_bias {
                        "tied_bias"
                    } else {
                        "gaussian_only"
                    },
                    "the layer computes no stored bias, but a bias was given",
                ));
            }
            if b.dims() != [z] {
                return Err(GaussError::shape("bias", format!("({z})"), b.dims()));
            }
            check_dtype("bias", b, dtype, "center")?;
            check_device("bias", b, center.device(), "center")?;
        }
        let name = Precision::tensor_name(precision.parameterization());
        if precision.parameterization() != config.precision.parameterization {
            return Err(GaussError::config(
                "precision.parameterization",
                format!(
                    "config says {} but the precision is {}",
                    config.precision.parameterization,
                    precision.parameterization()
                ),
            ));
        }
        if precision.config() != config.precision {
            return Err(GaussError::config(
                "precision",
                format!(
                    "was built with {:?}, but the layer config says {:?}",
                    precision.config(),
                    config.precision
                ),
            ));
        }
        let expected_raw = Precision::raw_shape(config.precision.parameterization, z, d);
        if precision.dim() != d {
            // sphere's raw (Z) does not show d: its shape can fit while the width does not.
            return Err(GaussError::shape(
                format!("precision `{name}` (built for d inputs)"),
                format!("d = {d} (the width of center)"),
                &[precision.dim()],
            ));
        }
        if precision.raw().dims() != expected_raw.as_slice() {
            return Err(GaussError::shape(
                format!("precision tensor `{name}`"),
                format!("{expected_raw:?} (Z = {z} neurons over d = {d} inputs)"),
                precision.raw().dims(),
            ));
        }
        check_dtype(
            &format!("precision tensor `{name}`"),
            precision.raw(),
            dtype,
            "center",
        )?;
        check_device(
            &format!("precision tensor `{name}`"),
            precision.raw(),
            center.device(),
            "center",
        )?;
        Ok(Self {
            weight,
            bias,
            center,
            precision,
            config,
        })
    }

    /// Checks `x` (…, d) and returns it flattened to (N, d) with the leading dims.
    fn flatten_input(&self, x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let d = self.in_features();
        let dims = x.dims();
        if dims.len() < 2 || dims[dims.len() - 1] != d {
            return Err(GaussError::shape(
                "input x",
                format!("(batch, {d}), or (..., batch, {d})"),
                dims,
            ));
        }
        check_dtype("input x", x, self.center.dtype(), "center")?;
        check_device("input x", x, self.center.device(), "the layer's center")?;
        ops::flatten_checked(x, d)
    }

    /// Output `y` and the (gated) Gaussian activations `g`, gated by `prev_g` when given.
    ///
    /// Inputs of any rank ≥ 2 are taken as batches of rows, as `candle_nn::Linear` does: the
    /// leading dimensions of `x` come back on `y` and `g`.
    ///
    /// An input row with a NaN or ±∞ entry gives NaN in that row of `y` and `g`, through
    /// every kernel; the other rows are unaffected.
    ///
    /// # Shapes
    /// `x`: (B, d) or (…, B, d), `prev_g`: (B, K) or (…, B, K) → `y`, `g`: (B, Z) or (…, B, Z)
    ///
    /// # Errors
    /// An input of the wrong width, rank or dtype; an input or `prev_g` on another device
    /// than the layer ([`GaussError::DeviceMismatch`]); a `prev_g` whose leading dimensions
    /// differ from `x`'s or whose width is 0.
    pub fn forward_with_gaussian(
        &self,
        x: &Tensor,
        prev_g: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (x, leading) = self.flatten_input(x)?;
        let prev = match prev_g {
            Some(prev) => {
                let pd = prev.dims();
                if pd.len() != leading.len() + 1
                    || pd[..leading.len()] != leading[..]
                    || pd[pd.len() - 1] == 0
                {
                    return Err(GaussError::shape(
                        "prev_g",
                        format!(
                            "({}, K) with K >= 1 (the leading dimensions of x)",
                            leading
                                .iter()
                                .map(|v| v.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        pd,
                    ));
                }
                check_dtype("prev_g", prev, self.center.dtype(), "center")?;
                check_device("prev_g", prev, self.center.device(), "the layer's center")?;
                let k = pd[pd.len() - 1];
                Some(prev.reshape((x.dim(0)?, k))?)
            }
            None => None,
        };
        let (y, g) = self.forward_rows(&x, prev.as_ref())?;
        if leading.len() == 1 {
            return Ok((y, g));
        }
        let mut shape = leading;
        shape.push(self.out_features());
        Ok((y.reshape(shape.as_slice())?, g.reshape(shape)?))
    }

    /// [`GaussLayer::forward_with_gaussian`] on checked rows `x` (N, d), `prev_g` (N, K).
    fn forward_rows(&self, x: &Tensor, prev_g: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let resolved = self.resolve(x)?;
        let linear = match &self.weight {
            Some(weight) => Some(layer_op::Linear {
                weight,
                bias: self.effective_bias(weight)?,
                tanh: self.config.tanh,
            }),
            None => None,
        };
        let (y, g) = resolved.run_layer(x, &self.center, linear.as_ref())?;
        match prev_g {
            None => Ok((y, g)),
            Some(prev) => {
                let g = ops::gate(&g, prev)?;
                if self.config.gaussian_only {
                    return Ok((g.clone(), g));
                }
                // y = linear·g, so gating y is gating g.
                Ok((ops::gate(&y, prev)?, g))
            }
        }
    }

    /// The bias of the linear part: `-W·c` when tied, else the stored one (if any).
    fn effective_bias(&self, weight: &Tensor) -> Result<Option<Tensor>> {
        if self.config.tied_bias {
            return Ok(Some((weight * &self.center)?.sum(D::Minus1)?.neg()?));
        }
        Ok(self.bias.clone())
    }

    /// The resolver's plan for rows `x` (N, d) that [`GaussLayer::flatten_input`] checked:
    /// the sizes go inward from here, and no op checks `x` again.
    fn resolve(&self, x: &Tensor) -> Result<kernels::Resolved> {
        let sizes = Sizes {
            batch: x.dim(0)?,
            dim: self.in_features(),
            neurons: self.out_features(),
        };
        kernels::resolve(
            sizes,
            x,
            &self.center,
            &self.precision,
            self.config.kernel,
            self.config.precision.portable,
        )
    }

    /// Squared Mahalanobis distances through the configured kernel.
    ///
    /// # Shapes
    /// `x`: (B, d) or (…, B, d) → (B, Z) or (…, B, Z)
    ///
    /// # Errors
    /// An input of the wrong width, rank or dtype.
    pub fn mahalanobis_sq(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, leading) = self.flatten_input(x)?;
        let m2 = kernels::run(&rows, &self.center, &self.resolve(&rows)?)?;
        if leading.len() == 1 {
            return Ok(m2);
        }
        let mut shape = leading;
        shape.push(self.out_features());
        Ok(m2.reshape(shape)?)
    }

    /// The kernel [`GaussLayer::forward_with_gaussian`] runs for this input (for logs and
    /// benchmarks; see the table in `docs/design.md` §4).
    ///
    /// # Errors
    /// As [`GaussLayer::mahalanobis_sq`].
    pub fn resolved_kernel(&self, x: &Tensor) -> Result<ResolvedKernel> {
        let (rows, _) = self.flatten_input(x)?;
        Ok(self.resolve(&rows)?.kernel)
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

/// Creates (or loads) a layer through a `VarBuilder`.
///
/// Tensor names (under the builder's prefix):
///
/// | name | shape | when | initialization (FGN) |
/// |---|---|---|---|
/// | `weight` | (Z, d) | not `gaussian_only` | Kaiming uniform (fan-in) |
/// | `bias` | (Z) | neither `tied_bias` nor `gaussian_only` | uniform ±1/√d, like `candle_nn::linear` |
/// | `center` | (Z, d) | always | N(0, `init.center_std`²) |
/// | [`Precision::tensor_name`] | [`Precision::raw_shape`] | always | `P ≈ init.precision_scale · I` (default 1/d) plus a tiny symmetric perturbation, through the inverse map ([`Precision::initial_raw`]) |
///
/// With `config.init.seed` set, every random value above comes from the seeded host streams
/// ([`crate::layer_seed`]) instead of Candle's generator: the same seed gives bit-identical layers
/// on every run and device.
///
/// When the builder already holds a tensor (loading from safetensors, or a `VarMap` that
/// has it) it is used as is. A missing precision tensor in a `VarMap` is created and filled
/// in place with the FGN initial value (likewise every missing tensor of a seeded layer).
///
/// # Errors
/// An invalid config or zero sizes; a builder of a non-float dtype ([`GaussError::DType`]);
/// a tensor the builder holds with another shape, dtype or device than the builder's (named
/// with the builder's prefix); a precision scale the parameterization cannot represent.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{Module, VarBuilder, VarMap};
/// use gauss_layer::{gauss_layer, GaussLayerConfig, InitConfig};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// // A seeded layer: the same seed gives the same layer on every run and device.
/// let config = GaussLayerConfig { init: InitConfig { seed: Some(1), ..Default::default() }, ..Default::default() };
/// let layer = gauss_layer(3, 5, config, vb.pp("hidden"))?;
/// let y = layer.forward(&Tensor::zeros((7, 3), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[7, 5]);
/// assert!(varmap.data().lock().unwrap().contains_key("hidden.center"));
/// # Ok::<(), gauss_layer::GaussError>(())
/// ```
pub fn gauss_layer(
    in_features: usize,
    out_features: usize,
    config: GaussLayerConfig,
    vb: VarBuilder,
) -> Result<GaussLayer> {
    config.validate_sizes(in_features, out_features)?;
    // Before any tensor is created: an integer builder failed in Candle's random init
    // ("unsupported dtype U8 for op rand_uniform").
    check_float_dtype("the VarBuilder's dtype", vb.dtype())?;
    let (z, d) = (out_features, in_features);
    let seed = config.init.seed;
    let weight = if config.gaussian_only {
        None
    } else {
        Some(get_or_init(
            &vb,
            (z, d),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
            seed.map(|s| (s, InitStream::Weight)),
        )?)
    };
    let bias = if config.gaussian_only || config.tied_bias {
        None
    } else {
        let bound = 1.0 / (d as f64).sqrt();
        Some(get_or_init(
            &vb,
            z,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
            seed.map(|s| (s, InitStream::Bias)),
        )?)
    };
    // Normal draws stay within 10 standard deviations (beyond is a chance below 1e-23 per
    // draw): a std whose draws the dtype cannot hold would give infinite centers, which the
    // layer computes NaN with and a checkpoint refuses to load.
    let largest_finite = crate::linalg::max_finite(vb.dtype());
    if 10.0 * config.init.center_std > largest_finite && !vb.contains_tensor("center") {
        return Err(GaussError::config(
            "init.center_std",
            format!(
                "{:e} draws centers beyond the largest finite {:?} ({largest_finite:e}); it must be at most {:e}",
                config.init.center_std,
                vb.dtype(),
                largest_finite / 10.0
            ),
        ));
    }
    let center_init = if config.init.center_std > 0.0 {
        Init::Randn {
            mean: 0.0,
            stdev: config.init.center_std,
        }
    } else {
        Init::Const(0.0)
    };
    let center = get_or_init(
        &vb,
        (z, d),
        "center",
        center_init,
        seed.map(|s| (s, InitStream::Center)),
    )?;

    let name = Precision::tensor_name(config.precision.parameterization);
    let shape = Precision::raw_shape(config.precision.parameterization, z, d);
    let raw = if vb.contains_tensor(name) {
        held_as_built(&vb, name, vb.get(shape, name)?)?
    } else {
        // Init hints cannot express the inverse-mapped FGN value, so create the variable and
        // write the value into its storage (it is the VarMap's own Var).
        let raw = vb.get_with_hints(shape, name, Init::Const(0.0))?;
        let initial = Precision::initial_raw(z, d, &config, raw.dtype(), raw.device())?;
        raw.slice_set(&initial, 0, 0)?;
        raw
    };
    // A refused raw value is named with the layer's prefix (`layers.0.precision_log_diag`).
    let precision = Precision::from_raw(raw, d, &config).map_err(|e| match e {
        GaussError::Numerical { what, reason } if !vb.prefix().is_empty() => {
            GaussError::Numerical {
                what: format!("{}: {what}", vb.prefix()),
                reason,
            }
        }
        other => other,
    })?;
    GaussLayer::new(weight, bias, center, precision, config)
}

/// `tensor`, the builder's `name`, checked against the builder's dtype and device: a
/// `VarMap` hands back what it holds as it is, and a held tensor of another dtype or device
/// would otherwise be reported under the name of the first tensor compared with it (a
/// `center` held in f64 under an f32 builder read as "`weight` has dtype F32").
fn held_as_built(vb: &VarBuilder, name: &str, tensor: Tensor) -> Result<Tensor> {
    let what = if vb.prefix().is_empty() {
        format!("tensor `{name}`")
    } else {
        format!("tensor `{}.{name}`", vb.prefix())
    };
    check_dtype(&what, &tensor, vb.dtype(), "the VarBuilder")?;
    check_device(&what, &tensor, vb.device(), "the VarBuilder")?;
    Ok(tensor)
}

/// The builder's tensor `name`, created with `init` when missing: by Candle's generator, or,
/// given a seed and stream, from the seeded host stream written into the new variable.
fn get_or_init<S: Into<Shape>>(
    vb: &VarBuilder,
    shape: S,
    name: &str,
    init: Init,
    seeded: Option<(u64, InitStream)>,
) -> Result<Tensor> {
    let shape = shape.into();
    let Some((seed, stream)) = seeded else {
        return held_as_built(vb, name, vb.get_with_hints(shape, name, init)?);
    };
    if vb.contains_tensor(name) {
        return held_as_built(vb, name, vb.get(shape, name)?);
    }
    let var = vb.get_with_hints(shape.clone(), name, Init::Const(0.0))?;
    let values = init::sample(init, &shape, &mut init::stream_rng(seed, stream))?;
    let value = crate::linalg::host::from_host(values, shape.dims(), var.dtype(), var.device())?;
    var.slice_set(&value, 0, 0)?;
    Ok(var)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PrecisionConfig;
    use crate::config::{InitConfig, Parameterization};
    use crate::testing::{all_finite, relative_error};
    use candle_core::{DType, Device, Var};
    use candle_nn::{Module, VarMap};

    /// A center std whose draws the dtype cannot hold (1e300 in f32 gave centers of ±∞, a
    /// layer that computes NaN and saves a checkpoint that does not load) is refused by name;
    /// the same std builds in f64, and an f32 std at the bound builds with finite centers.
    #[test]
    fn a_center_std_beyond_the_dtype_is_refused() {
        let build = |std: f64, dtype: DType| {
            let config = GaussLayerConfig {
                init: InitConfig {
                    center_std: std,
                    seed: Some(0),
                    ..Default::default()
                },
                ..GaussLayerConfig::with_parameterization(Parameterization::Diag)
            };
            let varmap = VarMap::new();
            gauss_layer(
                3,
                2,
                config,
                VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu),
            )
        };
        match build(1e300, DType::F32) {
            Err(GaussError::InvalidConfig { field, reason }) => {
                assert_eq!(field, "init.center_std");
                assert!(reason.contains("F32"), "{reason}");
            }
            other => panic!("expected an init.center_std error, got {other:?}"),
        }
        build(1e300, DType::F64).unwrap();
        let at_bound = build(3e37, DType::F32).unwrap();
        assert!(all_finite(at_bound.center()).unwrap());
    }

    fn build(
        config: GaussLayerConfig,
        d: usize,
        z: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(VarMap, GaussLayer)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let layer = gauss_layer(d, z, config, vb)?;
        Ok((varmap, layer))
    }

    fn bad_inputs_are_shape_errors(device: &Device) -> Result<()> {
        let (_, layer) = build(GaussLayerConfig::default(), 4, 3, DType::F32, device)?;
        let expect_shape = |result: Result<(Tensor, Tensor)>, needle: &str| match result {
            Err(GaussError::Shape { what, expected, .. }) => {
                assert!(
                    format!("{what} {expected}").contains(needle),
                    "{what}: {expected}"
                )
            }
            other => panic!("expected a shape error, got {other:?}"),
        };
        let rank1 = Tensor::zeros(4, DType::F32, device)?;
        expect_shape(layer.forward_with_gaussian(&rank1, None), "(batch, 4)");
        let wide = Tensor::zeros((2, 5), DType::F32, device)?;
        expect_shape(layer.forward_with_gaussian(&wide, None), "(batch, 4)");
        let x = Tensor::zeros((2, 4), DType::F32, device)?;
        let prev = Tensor::ones((3, 6), DType::F32, device)?;
        expect_shape(layer.forward_with_gaussian(&x, Some(&prev)), "prev_g");
        let x16 = Tensor::zeros((2, 4), DType::F16, device)?;
        assert!(matches!(
            layer.forward_with_gaussian(&x16, None),
            Err(GaussError::DType { .. })
        ));
        // Through the Module trait the error is a candle error carrying the message.
        let err = layer.forward(&wide).unwrap_err().to_string();
        assert!(err.contains("(batch, 4)"), "{err}");
        Ok(())
    }
    crate::test_device!(bad_inputs_are_shape_errors);

    #[test]
    fn invalid_configs_and_tensors_are_errors() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let bad = |r: Result<GaussLayer>| {
            assert!(matches!(r, Err(GaussError::InvalidConfig { .. })), "{r:?}")
        };
        bad(gauss_layer(0, 3, GaussLayerConfig::default(), vb.pp("a")));
        bad(gauss_layer(3, 0, GaussLayerConfig::default(), vb.pp("b")));
        let floor = GaussLayerConfig {
            precision: PrecisionConfig {
                width_floor: Some(-1.0),
                ..Default::default()
            },
            ..Default::default()
        };
        bad(gauss_layer(3, 2, floor, vb.pp("c")));
        // Misshapen tensors in new() name the tensor.
        let config = GaussLayerConfig::default();
        let center = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let raw = Tensor::zeros((2, 3, 3), DType::F32, &dev).unwrap();
        let precision = Precision::from_raw(raw, 3, &config).unwrap();
        let weight = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let err = GaussLayer::new(Some(weight), None, center, precision, config).unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
    }

    /// A tensor that a `VarMap` holds in another dtype than the builder's is refused under
    /// its own name (it was reported as the first tensor compared with it: a held f64
    /// `center` read as "`weight` has dtype F32", a held f64 weight and center as the
    /// freshly made precision tensor), seeded or not, and the precision tensor too.
    #[test]
    fn a_held_tensor_of_another_dtype_is_named() -> Result<()> {
        let dev = Device::Cpu;
        let seeded = GaussLayerConfig {
            init: InitConfig {
                seed: Some(3),
                ..Default::default()
            },
            ..Default::default()
        };
        for config in [GaussLayerConfig::default(), seeded] {
            for held in [
                vec!["center"],
                vec!["weight", "center"],
                vec!["precision_factor"],
            ] {
                let varmap = VarMap::new();
                for name in &held {
                    let shape: &[usize] = if *name == "precision_factor" {
                        &[2, 3, 3]
                    } else {
                        &[2, 3]
                    };
                    let var = Var::from_tensor(&Tensor::zeros(shape, DType::F64, &dev)?)?;
                    varmap
                        .data()
                        .lock()
                        .expect("lock")
                        .insert(format!("l.{name}"), var);
                }
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
                match gauss_layer(3, 2, config.clone(), vb.pp("l")) {
                    Err(GaussError::DType { what, got, .. }) => {
                        assert_eq!(what, format!("tensor `l.{}`", held[0]), "{held:?}");
                        assert_eq!(got, DType::F64);
                    }
                    other => panic!("{held:?}: expected a dtype error, got {other:?}"),
                }
            }
        }
        Ok(())
    }

    /// Forward and backward through every parameterization stay finite for inputs of
    /// magnitude 1e4 and for Gaussians so narrow that g underflows to 0.
    fn finite_inputs_give_finite_outputs_and_gradients(device: &Device) -> Result<()> {
        for dtype in crate::testing::float_dtypes(device) {
            for parameterization in Parameterization::ALL {
                for (scale, magnitude) in [(1e-2, 1e4), (1e6, 1.0), (1e6, 1e4)] {
                    let config = GaussLayerConfig {
                        precision: PrecisionConfig::with_parameterization(parameterization),
                        tanh: parameterization == Parameterization::Expm,
                        init: InitConfig {
                            precision_scale: Some(scale),
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    let (varmap, layer) = build(config, 6, 4, dtype, device)?;
                    let x =
                        (Tensor::randn(0f32, 1.0, (5, 6), device)?.to_dtype(dtype)? * magnitude)?;
                    let x = Var::from_tensor(&x)?;
                    let prev = Tensor::rand(0f32, 1.0, (5, 2), device)?.to_dtype(dtype)?;
                    let (y, g) = layer.forward_with_gaussian(x.as_tensor(), Some(&prev))?;
                    let what =
                        format!("{parameterization} {dtype:?} scale {scale} |x| {magnitude}");
                    assert!(all_finite(&y)? && all_finite(&g)?, "{what}: outputs");
                    if scale == 1e6 {
                        // g underflows (m2 ≫ 1500), the case the promise is about.
                        assert_eq!(
                            crate::testing::max_abs(&g)?,
                            0.0,
                            "{what}: g should underflow"
                        );
                    }
                    let loss = (y.sum_all()? + g.sum_all()?)?;
                    let grads = loss.backward()?;
                    let mut vars: Vec<(String, Var)> =
                        varmap.data().lock().unwrap().clone().into_iter().collect();
                    vars.push(("x".into(), x));
                    for (name, var) in vars {
                        let grad = grads.get(var.as_tensor()).ok_or_else(|| {
                            GaussError::config("test", format!("{what}: no gradient for {name}"))
                        })?;
                        assert!(all_finite(grad)?, "{what}: gradient of {name}");
                    }
                }
            }
        }
        Ok(())
    }
    crate::test_device!(finite_inputs_give_finite_outputs_and_gradients);

    fn options_follow_their_definitions_f64(device: &Device) -> Result<()> {
        let x = Tensor::randn(0f64, 1.0, (5, 3), device)?;
        let base = GaussLayerConfig::with_parameterization(Parameterization::Diag);
        let (_, plain) = build(base.clone(), 3, 2, DType::F64, device)?;
        let (y, g) = plain.forward_with_gaussian(&x, None)?;
        let weight = plain.weight().unwrap();
        let linear = x
            .matmul(&weight.t()?)?
            .broadcast_add(&plain.bias().unwrap().unsqueeze(0)?)?;
        assert!(relative_error(&y, &(&linear * &g)?)? < 1e-14);
        assert!(relative_error(&plain.forward(&x)?, &y)? < 1e-14);

        // Tied bias: b = −W·c, so y = W(x − c) · g; same tensors otherwise.
        let tied_config = GaussLayerConfig {
            tied_bias: true,
            tanh: true,
            ..base.clone()
        };
        let tied = GaussLayer::new(
            Some(weight.clone()),
            None,
            plain.center().clone(),
            Precision::from_raw(plain.precision().raw().clone(), 3, &tied_config)?,
            tied_config,
        )?;
        let (y_tied, _) = tied.forward_with_gaussian(&x, None)?;
        let shifted = x
            .unsqueeze(1)?
            .broadcast_sub(&plain.center().unsqueeze(0)?)?;
        let expected = shifted
            .broadcast_mul(&weight.unsqueeze(0)?)?
            .sum(D::Minus1)?
            .tanh()?;
        assert!(relative_error(&y_tied, &(expected * &g)?)? < 1e-14);

        // Gaussian-only: y = g.
        let rbf_config = GaussLayerConfig {
            gaussian_only: true,
            ..base
        };
        let (_, rbf) = build(rbf_config, 3, 2, DType::F64, device)?;
        let (y, g) = rbf.forward_with_gaussian(&x, None)?;
        assert!(relative_error(&y, &g)? == 0.0);
        assert!(rbf.weight().is_none() && rbf.bias().is_none());
        Ok(())
    }
    crate::test_device!(options_follow_their_definitions_f64);

    /// Every tensor of a layer, as f32 bits on the host, in a fixed order.
    fn layer_bits(layer: &GaussLayer) -> Result<Vec<Vec<u32>>> {
        let tensors = [
            layer.weight(),
            layer.bias(),
            Some(layer.center()),
            Some(layer.precision().raw()),
        ];
        let mut bits = Vec::new();
        for tensor in tensors.into_iter().flatten() {
            let host = tensor.flatten_all()?.to_device(&Device::Cpu)?;
            bits.push(host.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect());
        }
        Ok(bits)
    }

    fn seeded_layers_are_bit_identical(device: &Device) -> Result<()> {
        for parameterization in Parameterization::ALL {
            let seeded = |seed| GaussLayerConfig {
                precision: PrecisionConfig::with_parameterization(parameterization),
                init: InitConfig {
                    seed: Some(seed),
                    ..Default::default()
                },
                ..Default::default()
            };
            let (_, first) = build(seeded(11), 5, 4, DType::F32, device)?;
            let (_, again) = build(seeded(11), 5, 4, DType::F32, device)?;
            let (_, on_cpu) = build(seeded(11), 5, 4, DType::F32, &Device::Cpu)?;
            let (_, other) = build(seeded(12), 5, 4, DType::F32, device)?;
            let bits = layer_bits(&first)?;
            assert_eq!(
                bits.len(),
                4,
                "{parameterization}: weight, bias, center, raw"
            );
            assert_eq!(bits, layer_bits(&again)?, "{parameterization}: same seed");
            // The host draws are rounded on the CPU, so the device does not matter.
            assert_eq!(
                bits,
                layer_bits(&on_cpu)?,
                "{parameterization}: same seed on CPU"
            );
            for (i, (a, b)) in bits.iter().zip(layer_bits(&other)?).enumerate() {
                assert_ne!(a, &b, "{parameterization}: tensor {i} ignores the seed");
            }
        }
        Ok(())
    }
    crate::test_device!(seeded_layers_are_bit_identical);

    /// A sphere precision built for another width: its raw (Z) shape fits any d, so the error
    /// names the widths (it said "expected shape [3] …, got [3]").
    #[test]
    fn a_precision_built_for_another_width_names_both_widths() {
        let config = GaussLayerConfig {
            gaussian_only: true,
            ..GaussLayerConfig::with_parameterization(Parameterization::Sphere)
        };
        let raw = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let precision = Precision::from_raw(raw, 5, &config).unwrap();
        let center = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let error = GaussLayer::new(None, None, center, precision, config)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("d = 2 (the width of center)") && error.contains("got [5]"),
            "{error}"
        );
    }

    /// A perturbation too large for the initial precision to stay positive definite is a
    /// config error naming `init.perturbation` (it surfaced as a NaN raw value or a neuron that
    /// is not positive definite, with no word about the setting).
    #[test]
    fn a_too_large_perturbation_is_named() -> Result<()> {
        for (parameterization, d, perturbation) in [
            (Parameterization::Diag, 8, 0.6),
            (Parameterization::LowRank { rank: 2 }, 8, 0.6),
            (Parameterization::Cholesky, 64, 0.5),
            (Parameterization::Expm, 64, 0.5),
        ] {
            let config = GaussLayerConfig {
                precision: PrecisionConfig::with_parameterization(parameterization),
                init: InitConfig {
                    perturbation,
                    seed: Some(1),
                    ..Default::default()
                },
                ..Default::default()
            };
            let error = build(config, d, 16, DType::F32, &Device::Cpu)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                error.contains("init.perturbation") && error.contains("too large"),
                "{parameterization}: {error:?}"
            );
        }
        Ok(())
    }

    /// A `precision_scale` below f32's smallest normal number is refused in f32 by every
    /// form (the log-scale and factor forms by the raw-value bounds; direct, which stores `P`
    /// itself, by name: its initial diagonal rounded to 0 and `P = 0` passed), while 1e-3
    /// builds.
    #[test]
    fn a_scale_the_dtype_cannot_hold_is_refused_by_every_form() -> Result<()> {
        for parameterization in Parameterization::ALL {
            let config = |scale| GaussLayerConfig {
                precision: PrecisionConfig::with_parameterization(parameterization),
                init: InitConfig {
                    precision_scale: Some(scale),
                    seed: Some(1),
                    ..Default::default()
                },
                ..Default::default()
            };
            build(config(1e-3), 4, 3, DType::F32, &Device::Cpu)?;
            let refused = build(config(1e-300), 4, 3, DType::F32, &Device::Cpu);
            assert!(refused.is_err(), "{parameterization}: 1e-300 in f32 built");
        }
        let direct = GaussLayerConfig {
            precision: PrecisionConfig::with_parameterization(Parameterization::Direct),
            init: InitConfig {
                precision_scale: Some(1e-300),
                seed: Some(1),
                ..Default::default()
            },
            ..Default::default()
        };
        let error = build(direct, 4, 3, DType::F32, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("init.precision_scale"), "{error:?}");
        Ok(())
    }

    /// `portable: true` sends every op of a layer's training step to tensor ops on the CPU,
    /// as the table says: the forward, the statistics the losses use (exact and estimated
    /// `tr Σ`, with the Cholesky factorizations of a width floor and of lowrank's
    /// capacitance, both recursive past 8), the positive-definiteness check, and their
    /// backward read no storage through a fused op. The same step without `portable` does,
    /// so the count can fail.
    #[test]
    fn portable_runs_no_fused_op() -> Result<()> {
        use crate::cpu::fused_storage_reads;

        let x = Tensor::randn(0f32, 1.0, (12, 10), &Device::Cpu)?;
        let forms = Parameterization::ALL
            .into_iter()
            .chain([Parameterization::LowRank { rank: 9 }]);
        for parameterization in forms {
            for width_floor in [None, Some(0.5)] {
                for portable in [true, false] {
                    let precision = PrecisionConfig {
                        parameterization,
                        width_floor,
                        portable,
                        ..Default::default()
                    };
                    if precision.validate().is_err() {
                        continue; // lowrank takes no width floor
                    }
                    let config = GaussLayerConfig {
                        precision,
                        tanh: true,
                        ..Default::default()
                    };
                    let (_varmap, layer) = build(config, 10, 9, DType::F32, &Device::Cpu)?;
                    let before = fused_storage_reads();
                    let (y, g) = layer.forward_with_gaussian(&x, None)?;
                    let p = layer.precision();
                    crate::repair::ensure_positive_definite(p)?;
                    let mut loss = (y.sum_all()? + g.sum_all()?)?;
                    for stat in [
                        p.log_det_precision()?,
                        p.trace_covariance()?,
                        p.trace_covariance_estimate(4)?,
                        p.trace_precision()?,
                    ] {
                        loss = (loss + stat.sum_all()?)?;
                    }
                    loss.backward()?;
                    let reads = fused_storage_reads() - before;
                    let what = format!("{parameterization} width_floor {width_floor:?}");
                    if portable {
                        assert_eq!(reads, 0, "{what}: portable read storage in fused ops");
                    } else {
                        assert!(reads > 0, "{what}: the fused route ran no fused op");
                    }
                }
            }
        }
        Ok(())
    }

    /// A builder of an integer dtype is a dtype error naming it, seeded or not, and creates
    /// no tensor: unseeded it was Candle's "unsupported dtype U8 for op rand_uniform" (after
    /// the weight's variable had been made); seeded, a Candle error from the precision's init.
    #[test]
    fn integer_builder_dtype_is_a_dtype_error() {
        for dtype in [DType::U8, DType::U32, DType::I64] {
            for seed in [None, Some(1)] {
                for gaussian_only in [false, true] {
                    let config = GaussLayerConfig {
                        gaussian_only,
                        init: InitConfig {
                            seed,
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    let varmap = VarMap::new();
                    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
                    match gauss_layer(2, 3, config, vb) {
                        Err(GaussError::DType { got, .. }) => assert_eq!(got, dtype),
                        other => panic!(
                            "{dtype:?} seed {seed:?} gaussian_only {gaussian_only}: expected a DType error, got {:?}",
                            other.map(|_| "a layer")
                        ),
                    }
                    assert!(
                        varmap.all_vars().is_empty(),
                        "{dtype:?}: tensors were created"
                    );
                }
            }
        }
    }
}
