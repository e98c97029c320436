//! A feed-forward network of Gaussian layers (the FGN "Feedforward_FGN_net").
//!
//! Layout, as in the FGN work: an optional batch norm on the input, then Gaussian layers; between
//! two Gaussian layers an optional batch norm and an optional dropout. Each layer's Gaussians
//! are gated by the previous layer's (`g ← g · max_k g_prev[k]`, when [`GaussNetConfig::gate`]
//! is on), so an input far from everything the first layer has seen gives `g ≈ 0` all the way up
//! and logits near 0: a softmax near uniform, the network's "I don't know".
//!
//! Tensor names (VarBuilder and checkpoint): `layers.{i}.weight`, `layers.{i}.bias`,
//! `layers.{i}.center`, `layers.{i}.<precision name>` (see [`crate::Precision::tensor_name`]),
//! `norms.{i}.{running_mean,running_var,weight,bias}` for the batch norm after hidden layer `i`,
//! and `input_norm.*` for the input batch norm.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use gauss_layer::{GaussNet, GaussNetConfig};
//!
//! let config = GaussNetConfig { in_features: 4, hidden: vec![8], out_features: 3, ..Default::default() };
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let net = GaussNet::new(config, vb)?;
//! let x = Tensor::zeros((5, 4), DType::F32, &Device::Cpu)?;
//! let logits = net.forward(&x, false)?;
//! assert_eq!(logits.dims(), &[5, 3]);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Tensor, Var, D};
use candle_nn::{BatchNorm, Dropout, ModuleT, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::config::GaussLayerConfig;
use crate::error::{check_device, check_dtype, GaussError, Result};
use crate::init::layer_seed;
use crate::layer::{gauss_layer, GaussLayer};
use crate::precision::Precision;

/// Configuration of a [`GaussNet`]; serializable so checkpoints carry it.
///
/// Deserialization is strict, like [`GaussLayerConfig`]'s: every field must be present
/// (`output_layer` as `null` or a layer config) and unknown fields are errors naming them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GaussNetConfig {
    /// Width of the input.
    pub in_features: usize,
    /// Widths of the hidden Gaussian layers, in order (may be empty).
    pub hidden: Vec<usize>,
    /// Width of the output layer (number of classes for a classifier).
    pub out_features: usize,
    /// Config of the hidden layers.
    pub layer: GaussLayerConfig,
    /// Config of the output layer; `None` uses [`GaussNetConfig::layer`].
    #[serde(deserialize_with = "crate::config::required_option")]
    pub output_layer: Option<GaussLayerConfig>,
    /// Batch norm on the input (FGN's `ib`).
    pub input_batch_norm: bool,
    /// Batch norm after every hidden layer.
    pub batch_norm: bool,
    /// Epsilon of the batch norms.
    pub batch_norm_eps: f64,
    /// Dropout probability after every hidden layer (0 = none), active only in training.
    pub dropout: f32,
    /// Gate each layer's Gaussians by the previous layer's (`g ← g · max_k g_prev[k]`).
    pub gate: bool,
}

impl Default for GaussNetConfig {
    fn default() -> Self {
        Self {
            in_features: 1,
            hidden: Vec::new(),
            out_features: 1,
            layer: GaussLayerConfig::default(),
            output_layer: None,
            input_batch_norm: false,
            batch_norm: false,
            batch_norm_eps: 1e-5,
            dropout: 0.0,
            gate: true,
        }
    }
}

impl GaussNetConfig {
    /// Checks sizes, probabilities and the layer configs.
    ///
    /// # Errors
    /// [`GaussError::InvalidConfig`] naming the field: a zero width, a dropout outside
    /// [0, 1), a non-positive batch-norm epsilon, or what [`GaussLayerConfig::validate_sizes`]
    /// refuses for a layer (a lowrank rank above its inputs, a tensor whose size in bytes
    /// would overflow the address space). A network that only exceeds the machine's memory
    /// passes; creating it then aborts the process when an allocation fails (Rust's response
    /// to running out of memory).
    pub fn validate(&self) -> Result<()> {
        if self.in_features == 0 {
            return Err(GaussError::config("in_features", "must be >= 1, got 0"));
        }
        if self.out_features == 0 {
            return Err(GaussError::config("out_features", "must be >= 1, got 0"));
        }
        if let Some(i) = self.hidden.iter().position(|&w| w == 0) {
            return Err(GaussError::config(
                "hidden",
                format!("every hidden width must be >= 1, got 0 at position {i}"),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(GaussError::config(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        // 0 would divide by a zero variance (a constant feature, a batch of one): NaN.
        if !self.batch_norm_eps.is_finite() || self.batch_norm_eps <= 0.0 {
            return Err(GaussError::config(
                "batch_norm_eps",
                format!("must be finite and > 0, got {}", self.batch_norm_eps),
            ));
        }
        self.layer.validate()?;
        if let Some(output) = &self.output_layer {
            output.validate()?;
        }
        // Each layer's lowrank rank against its own input width, and its tensors' sizes.
        // (Walked in place: `layer_specs` clones a config per layer, and a damaged checkpoint
        // may claim a great many layers.)
        let mut width = self.in_features;
        for &next in &self.hidden {
            self.layer.check_rank(width)?;
            self.layer.check_tensor_sizes(width, next)?;
            width = next;
        }
        let output = self.output_layer.as_ref().unwrap_or(&self.layer);
        output.check_rank(width)?;
        output.check_tensor_sizes(width, self.out_features)
    }

    /// `(in_features, out_features, config)` of every Gaussian layer, in order.
    pub fn layer_specs(&self) -> Vec<(usize, usize, GaussLayerConfig)> {
        let mut specs = Vec::with_capacity(self.hidden.len() + 1);
        let mut width = self.in_features;
        for &next in &self.hidden {
            specs.push((width, next, self.layer.clone()));
            width = next;
        }
        let output = self
            .output_layer
            .clone()
            .unwrap_or_else(|| self.layer.clone());
        specs.push((width, self.out_features, output));
        specs
    }
}

/// A stack of [`GaussLayer`]s with optional batch norm and dropout between them.
#[derive(Clone, Debug)]
pub struct GaussNet {
    config: GaussNetConfig,
    input_norm: Option<BatchNorm>,
    layers: Vec<GaussLayer>,
    norms: Vec<Option<BatchNorm>>,
    dropout: Option<Dropout>,
}

impl GaussNet {
    /// Creates (or loads) the network's tensors through `vb` (see the module docs for names).
    ///
    /// # Errors
    /// An invalid config ([`GaussNetConfig::validate`]); loading through `vb`: a missing
    /// tensor or one of the wrong shape or dtype (Candle's error names it).
    pub fn new(config: GaussNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let norm_config = candle_nn::BatchNormConfig {
            eps: config.batch_norm_eps,
            ..Default::default()
        };
        let input_norm = if config.input_batch_norm {
            Some(candle_nn::batch_norm(
                config.in_features,
                norm_config,
                vb.pp("input_norm"),
            )?)
        } else {
            None
        };
        let specs = config.layer_specs();
        let mut layers = Vec::with_capacity(specs.len());
        let mut norms = Vec::with_capacity(specs.len().saturating_sub(1));
        for (i, (fan_in, fan_out, mut layer_config)) in specs.into_iter().enumerate() {
            // Distinct seeds, so that equally shaped layers do not start alike.
            layer_config.init.seed = layer_config.init.seed.map(|s| layer_seed(s, i));
            layers.push(gauss_layer(
                fan_in,
                fan_out,
                layer_config,
                vb.pp("layers").pp(i),
            )?);
            if i < config.hidden.len() {
                norms.push(if config.batch_norm {
                    Some(candle_nn::batch_norm(
                        fan_out,
                        norm_config,
                        vb.pp("norms").pp(i),
                    )?)
                } else {
                    None
                });
            }
        }
        Ok(Self::assemble(config, input_norm, layers, norms))
    }

    /// The network of checked parts, with the dropout its config asks for.
    fn assemble(
        config: GaussNetConfig,
        input_norm: Option<BatchNorm>,
        layers: Vec<GaussLayer>,
        norms: Vec<Option<BatchNorm>>,
    ) -> Self {
        let dropout = (config.dropout > 0.0).then(|| Dropout::new(config.dropout));
        Self {
            config,
            input_norm,
            layers,
            norms,
            dropout,
        }
    }

    /// Assembles a network from parts (used by importers and conversions).
    ///
    /// `norms[i]` is the batch norm after hidden layer `i` (one entry per hidden layer, `None`
    /// where there is none); `config` must describe the parts (sizes, batch norm flags and
    /// widths, the norms' epsilon, each layer's config but its `init`; the norms affine, as
    /// [`GaussNet::new`] makes them), since a checkpoint saves `config` and rebuilds the
    /// network from it. All parts share layer 0's dtype and device.
    ///
    /// # Errors
    /// [`GaussError::InvalidConfig`] or [`GaussError::Shape`] when the parts do not match
    /// `config` (layer count or sizes, a layer's config, batch-norm flags, widths, epsilon or
    /// a norm without weight and bias), or `config` is invalid; [`GaussError::DType`] or
    /// [`GaussError::DeviceMismatch`] for a part of another dtype or device than layer 0.
    pub fn from_parts(
        config: GaussNetConfig,
        input_norm: Option<BatchNorm>,
        layers: Vec<GaussLayer>,
        norms: Vec<Option<BatchNorm>>,
    ) -> Result<Self> {
        config.validate()?;
        let specs = config.layer_specs();
        if layers.len() != specs.len() {
            return Err(GaussError::config(
                "hidden",
                format!(
                    "config describes {} layers, {} were given",
                    specs.len(),
                    layers.len()
                ),
            ));
        }
        // One dtype and device for the whole network, layer 0's (a later layer of another
        // dtype refused the previous layer's output as a bad "input x"; saves refuse it too).
        let reference = layers.first().map(|layer| layer.center().clone());
        let check_part = |what: &str, tensor: &Tensor| -> Result<()> {
            if let Some(reference) = &reference {
                check_dtype(what, tensor, reference.dtype(), "layer 0's center")?;
                check_device(what, tensor, reference.device(), "layer 0's center")?;
            }
            Ok(())
        };
        for (i, (layer, (fan_in, fan_out, expected))) in layers.iter().zip(&specs).enumerate() {
            check_part(&format!("layer {i}'s center"), layer.center())?;
            if layer.in_features() != *fan_in || layer.out_features() != *fan_out {
                return Err(GaussError::shape(
                    format!("layer {i}"),
                    format!("({fan_out}, {fan_in}) neurons × inputs"),
                    &[layer.out_features(), layer.in_features()],
                ));
            }
            // `init` only shapes a freshly created layer (and its seed differs per layer).
            let built = GaussLayerConfig {
                init: expected.init.clone(),
                ..layer.config().clone()
            };
            if built != *expected {
                let field = if i < config.hidden.len() || config.output_layer.is_none() {
                    "layer"
                } else {
                    "output_layer"
                };
                return Err(GaussError::config(
                    field,
                    format!(
                        "describes layer {i} as {expected:?} (init aside), but it was built with {:?}",
                        layer.config()
                    ),
                ));
            }
        }
        if norms.len() != config.hidden.len() {
            return Err(GaussError::config(
                "batch_norm",
                format!(
                    "one entry per hidden layer expected ({}), got {}",
                    config.hidden.len(),
                    norms.len()
                ),
            ));
        }
        if input_norm.is_some() != config.input_batch_norm
            || norms.iter().any(|n| n.is_some() != config.batch_norm)
        {
            return Err(GaussError::config(
                "batch_norm",
                "the batch norms given do not match the config's flags",
            ));
        }
        let widths = std::iter::once(config.in_features).chain(config.hidden.iter().copied());
        let named_norms = std::iter::once(("input_norm".to_string(), input_norm.as_ref())).chain(
            norms
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("norms.{i}"), n.as_ref())),
        );
        for ((name, norm), width) in named_norms.zip(widths) {
            let Some(norm) = norm else { continue };
            check_part(
                &format!("batch norm {name}.running_mean"),
                norm.running_mean(),
            )?;
            if norm.running_mean().dims() != [width] {
                return Err(GaussError::shape(
                    format!("batch norm {name}.running_mean"),
                    format!("({width})"),
                    norm.running_mean().dims(),
                ));
            }
            // A checkpoint stores every norm's weight and bias and rebuilds it with the
            // config's epsilon.
            if norm.weight_and_bias().is_none() {
                return Err(GaussError::config(
                    "batch_norm",
                    format!(
                        "batch norm {name} has no weight and bias (affine: false), which the network's batch norms (and its checkpoints) always have"
                    ),
                ));
            }
            if norm.eps() != config.batch_norm_eps {
                return Err(GaussError::config(
                    "batch_norm_eps",
                    format!(
                        "is {}, but batch norm {name} was built with eps {}",
                        config.batch_norm_eps,
                        norm.eps()
                    ),
                ));
            }
        }
        Ok(Self::assemble(config, input_norm, layers, norms))
    }

    /// A network (no dropout) from its layers in order, the config read off them: the input
    /// norm, the hidden layers each with the batch norm after it, the final layer (what
    /// import and conversion build). `order` says in a width error what the layer indices
    /// count, e.g. `"in the order of the state dict"`.
    ///
    /// # Errors
    /// [`GaussError::Shape`] when a layer's inputs are not the previous layer's width; as
    /// [`GaussNet::from_parts`].
    pub(crate) fn from_layers(
        input_norm: Option<BatchNorm>,
        hidden: Vec<(GaussLayer, Option<BatchNorm>)>,
        final_layer: GaussLayer,
        gate: bool,
        batch_norm_eps: f64,
        order: &str,
    ) -> Result<Self> {
        let batch_norm = hidden.iter().any(|(_, n)| n.is_some());
        let (mut layers, norms): (Vec<GaussLayer>, Vec<Option<BatchNorm>>) =
            hidden.into_iter().unzip();
        let first = layers.first().unwrap_or(&final_layer);
        let config = GaussNetConfig {
            in_features: first.in_features(),
            hidden: layers.iter().map(GaussLayer::out_features).collect(),
            out_features: final_layer.out_features(),
            layer: first.config().clone(),
            output_layer: Some(final_layer.config().clone()),
            input_batch_norm: input_norm.is_some(),
            batch_norm,
            batch_norm_eps,
            dropout: 0.0,
            gate,
        };
        layers.push(final_layer);
        for (i, pair) in layers.windows(2).enumerate() {
            if pair[0].out_features() != pair[1].in_features() {
                return Err(GaussError::shape(
                    format!("layer {} ({order})", i + 1),
                    format!("{} inputs, the width of layer {i}", pair[0].out_features()),
                    &[pair[1].out_features(), pair[1].in_features()],
                ));
            }
        }
        Self::from_parts(config, input_norm, layers, norms)
    }

    /// Logits of the output layer. `train` switches batch norm to batch statistics (updating the
    /// running ones) and turns dropout on.
    ///
    /// An empty batch (B = 0) gives empty logits, except in training through a batch norm.
    ///
    /// # Shapes
    /// `x`: (B, in_features) → (B, out_features)
    ///
    /// # Errors
    /// [`GaussError::Shape`] or [`GaussError::DType`] for an `x` the first layer cannot take
    /// (wrong width, dtype or device); in training, a network with a batch norm refuses a
    /// batch of fewer than two samples ([`GaussError::EmptyBatch`] for none,
    /// [`GaussError::Shape`] for one, as PyTorch's `BatchNorm1d` does): its batch variance
    /// is undefined and would turn the running statistics into NaN for good. Candle errors.
    ///
    /// A NaN or ±∞ input stays in its own row everywhere but in a batch norm's training
    /// statistics: one such row in a training batch makes the running mean or variance NaN
    /// for good (as in PyTorch), so every later evaluation is NaN. The rows are not checked
    /// (that would read the batch on the host each step): filter non-finite samples from the
    /// training data of a network with batch norms.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.run(x, train, false)?.0)
    }

    /// Logits and every layer's (gated) Gaussian activations, in layer order.
    ///
    /// # Shapes
    /// `x`: (B, in_features) → (B, out_features) and one (B, Z_i) per layer
    ///
    /// # Errors
    /// As [`GaussNet::forward`].
    pub fn forward_with_gaussians(&self, x: &Tensor, train: bool) -> Result<(Tensor, Vec<Tensor>)> {
        self.run(x, train, true)
    }

    fn run(&self, x: &Tensor, train: bool, keep_all: bool) -> Result<(Tensor, Vec<Tensor>)> {
        if x.rank() != 2 || x.dim(1)? != self.config.in_features {
            return Err(GaussError::shape(
                "input x",
                format!("(batch, {})", self.config.in_features),
                x.dims(),
            ));
        }
        // Checked here, not only by the first layer: the input batch norm runs before it and
        // would report a dtype or device mismatch as a bare Candle error.
        if let Some(first) = self.layers.first() {
            let center = first.center();
            check_dtype("input x", x, center.dtype(), "the network's parameters")?;
            check_device("input x", x, center.device(), "the network's parameters")?;
        }
        let batch = x.dim(0)?;
        // Candle's batch norm in training divides the running variance's update by B - 1 and
        // takes means over B rows: B = 0 or 1 would write NaN into the running statistics,
        // which every later evaluation would then read. Refused before any norm runs.
        if train && batch < 2 && self.has_batch_norm() {
            return Err(if batch == 0 {
                GaussError::EmptyBatch {
                    what: "input x (batch norm in training)".to_string(),
                    got: x.dims().to_vec(),
                }
            } else {
                GaussError::shape(
                    "input x",
                    format!(
                        "(batch, {}) with batch >= 2 in training: a batch norm needs two samples for its variance",
                        self.config.in_features
                    ),
                    x.dims(),
                )
            });
        }
        let mut h = match &self.input_norm {
            Some(norm) => norm_forward(norm, x, train)?,
            None => x.clone(),
        };
        let mut gaussians = Vec::with_capacity(if keep_all { self.layers.len() } else { 0 });
        let mut prev_g: Option<Tensor> = None;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            let gate = if self.config.gate {
                prev_g.as_ref()
            } else {
                None
            };
            let (y, g) = layer.forward_with_gaussian(&h, gate)?;
            h = y;
            if i < last {
                if let Some(norm) = &self.norms[i] {
                    h = norm_forward(norm, &h, train)?;
                }
                if let Some(dropout) = &self.dropout {
                    h = dropout.forward(&h, train)?;
                }
            }
            if keep_all {
                gaussians.push(g.clone());
            }
            prev_g = Some(g);
        }
        Ok((h, gaussians))
    }

    /// The largest Gaussian activation of the output layer per input: near 0 means the network
    /// has not seen anything like this input ("I don't know").
    ///
    /// # Shapes
    /// `x`: (B, in_features) → (B)
    ///
    /// # Errors
    /// As [`GaussNet::forward`].
    pub fn max_gaussian(&self, x: &Tensor) -> Result<Tensor> {
        let (_, gaussians) = self.forward_with_gaussians(x, false)?;
        match gaussians.last() {
            // Candle's max over an empty tensor is an error; an empty batch has no maxima.
            Some(g) if g.dim(0)? == 0 => Ok(Tensor::zeros(0, g.dtype(), g.device())?),
            Some(g) => Ok(g.max(D::Minus1)?),
            None => Err(GaussError::config("hidden", "network has no layers")),
        }
    }

    /// Whether any batch norm (the input's or a hidden layer's) runs in the forward.
    fn has_batch_norm(&self) -> bool {
        self.input_norm.is_some() || self.norms.iter().any(Option::is_some)
    }

    /// The Gaussian layers, in order (for losses over all layers, e.g. the λ-loss).
    pub fn layers(&self) -> &[GaussLayer] {
        &self.layers
    }

    /// The dtype of the parameters, which inputs must have (`None` only for a network without
    /// layers, which the constructors refuse).
    pub fn dtype(&self) -> Option<DType> {
        self.layers.first().map(|layer| layer.center().dtype())
    }

    /// The batch norm after each hidden layer (`None` where there is none).
    pub fn norms(&self) -> &[Option<BatchNorm>] {
        &self.norms
    }

    /// The input batch norm, if any.
    pub fn input_norm(&self) -> Option<&BatchNorm> {
        self.input_norm.as_ref()
    }

    /// The config.
    pub fn config(&self) -> &GaussNetConfig {
        &self.config
    }

    /// Every tensor of the network under its VarBuilder/checkpoint name, sorted by name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if let Some(norm) = &self.input_norm {
            push_norm(&mut out, "input_norm", norm);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let prefix = format!("layers.{i}");
            if let Some(w) = layer.weight() {
                out.push((format!("{prefix}.weight"), w.clone()));
            }
            if let Some(b) = layer.bias() {
                out.push((format!("{prefix}.bias"), b.clone()));
            }
            out.push((format!("{prefix}.center"), layer.center().clone()));
            let precision = layer.precision();
            let name = Precision::tensor_name(precision.parameterization());
            out.push((format!("{prefix}.{name}"), precision.raw().clone()));
        }
        for (i, norm) in self.norms.iter().enumerate() {
            if let Some(norm) = norm {
                push_norm(&mut out, &format!("norms.{i}"), norm);
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A copy of the network whose every tensor is a variable of a new `VarMap`, under its
    /// [`GaussNet::named_tensors`] names: an optimizer over `varmap.all_vars()` trains all of
    /// it. Networks from [`crate::convert`], [`crate::import`] or [`GaussNet::from_parts`]
    /// hold plain tensors (an optimizer over the `VarMap` of the original `Linear`s moves
    /// their weights but never the centers or precisions); this is how to retrain them. The
    /// copy computes exactly what `self` does; `self` is left as it is.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{linear, Optimizer, VarBuilder, VarMap, SGD};
    /// use gauss_layer::convert::{mlp_to_gauss_net, ConvertOptions};
    ///
    /// let classic = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&classic, DType::F32, &Device::Cpu);
    /// let hidden = linear(4, 8, vb.pp("0"))?;
    /// let out = linear(8, 3, vb.pp("1"))?;
    /// let converted = mlp_to_gauss_net(&[hidden, out], &ConvertOptions::default())?;
    /// let (net, varmap) = converted.to_trainable()?;
    /// assert_eq!(varmap.all_vars().len(), net.named_tensors().len());
    /// let mut sgd = SGD::new(varmap.all_vars(), 0.1)?;
    /// let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu)?;
    /// sgd.backward_step(&net.forward(&x, true)?.sqr()?.sum_all()?)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// Candle's, copying a tensor.
    pub fn to_trainable(&self) -> Result<(GaussNet, VarMap)> {
        let Some(center) = self.layers.first().map(GaussLayer::center) else {
            return Err(GaussError::NoLayers {
                what: "GaussNet::to_trainable",
            });
        };
        let (dtype, device) = (center.dtype(), center.device().clone());
        let varmap = VarMap::new();
        {
            // A new map: nothing else holds its lock, so it cannot be poisoned.
            let mut data = varmap
                .data()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (name, tensor) in self.named_tensors() {
                // A copy: the new variables must not write into `self`'s tensors.
                data.insert(name, Var::from_tensor(&tensor.copy()?)?);
            }
        }
        let net = GaussNet::new(
            self.config.clone(),
            VarBuilder::from_varmap(&varmap, dtype, &device),
        )?;
        Ok((net, varmap))
    }
}

fn push_norm(out: &mut Vec<(String, Tensor)>, prefix: &str, norm: &BatchNorm) {
    out.push((
        format!("{prefix}.running_mean"),
        norm.running_mean().clone(),
    ));
    out.push((format!("{prefix}.running_var"), norm.running_var().clone()));
    if let Some((w, b)) = norm.weight_and_bias() {
        out.push((format!("{prefix}.weight"), w.clone()));
        out.push((format!("{prefix}.bias"), b.clone()));
    }
}

impl ModuleT for GaussNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.forward(x, train)?)
    }
}

/// `norm` on `x`, in training or not. Candle's training forward computes the batch statistics
/// of F16 and BF16 inputs in f32 and adds them to the running statistics in the norm's own
/// dtype, which fails ("dtype mismatch in add, lhs: BF16, rhs: F32"): for those dtypes in
/// training the norm runs on an f32 copy, whose updated running statistics are written back
/// into the norm's (so the `VarMap` and checkpoints see them) in its dtype.
fn norm_forward(norm: &BatchNorm, x: &Tensor, train: bool) -> Result<Tensor> {
    let (mean, var) = (norm.running_mean(), norm.running_var());
    let dtype = mean.dtype();
    if !train || !matches!(dtype, DType::F16 | DType::BF16) {
        return Ok(norm.forward_t(x, train)?);
    }
    let wide = |t: &Tensor| t.to_dtype(DType::F32);
    let features = mean.dim(0)?;
    let (eps, momentum) = (norm.eps(), norm.momentum());
    let norm32 = match norm.weight_and_bias() {
        Some((weight, bias)) => BatchNorm::new_with_momentum(
            features,
            wide(mean)?,
            wide(var)?,
            wide(weight)?,
            wide(bias)?,
            eps,
            momentum,
        )?,
        None => {
            BatchNorm::new_no_bias_with_momentum(features, wide(mean)?, wide(var)?, eps, momentum)?
        }
    };
    let y = norm32.forward_train(&wide(x)?)?;
    mean.slice_set(&norm32.running_mean().to_dtype(dtype)?, 0, 0)?;
    var.slice_set(&norm32.running_var().to_dtype(dtype)?, 0, 0)?;
    Ok(y.to_dtype(x.dtype())?)
}
