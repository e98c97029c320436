//! The convolutional trunk (candle-nn `Conv2d` blocks and a `Linear`), the two networks
//! built on it (Gaussian layers on top: [`CnnFgn`]; a linear head: [`CnnClassical`]), and the
//! CNN checkpoint.
//!
//! The trunk lives in the example, not in `gauss-layer`: it is ordinary candle-nn code with
//! nothing Gaussian in it, and its checkpoint is the library's own (`gauss_layer::checkpoint`,
//! strict as ever, for the Gaussian part) plus `trunk.*` tensors and the trunk's config as
//! the user metadata `user.trunk`, both validated here just as strictly (config parsed with
//! unknown fields refused and checked; every tensor's name, dtype and shape compared with
//! what the config implies; values finite). The library's format stays one network type.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap};
use gauss_layer::{checkpoint, GaussNet};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::conv_block;
use crate::evaluate::Classifier;
use crate::train::Mlp;

/// Metadata key (under the library's `user.` prefix) holding the trunk config as JSON.
pub const TRUNK_KEY: &str = "trunk";
/// Prefix of the trunk's tensors in a CNN checkpoint.
const TENSOR_PREFIX: &str = "trunk.";
/// Largest CNN checkpoint read (the whole file is read into memory).
const MAX_FILE_BYTES: u64 = 1 << 32;

/// What follows the trunk's final `Linear`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// max(0, x): the classical baseline's choice.
    Relu,
    /// tanh: bounded features, so the Gaussians on top see a bounded space.
    Tanh,
    /// The linear features as they are.
    None,
}

/// The trunk: per entry of `channels` a block 3×3 conv (padding 1) → batch norm (when
/// `batch_norm`) → ReLU → 2×2 max-pool, then flatten → `Linear` to `features` →
/// `activation`.
///
/// Deserialization is strict: every field present (`batch_norm` may be absent, as in
/// checkpoints written before it existed: false), unknown fields refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkConfig {
    pub height: usize,
    pub width: usize,
    pub channels: Vec<usize>,
    pub features: usize,
    pub activation: Activation,
    /// A `candle_nn::BatchNorm` over each block's channels, between the conv and the ReLU.
    #[serde(default)]
    pub batch_norm: bool,
}

impl Default for TrunkConfig {
    fn default() -> Self {
        Self {
            height: 28,
            width: 28,
            channels: vec![32, 64],
            features: 64,
            activation: Activation::Relu,
            batch_norm: false,
        }
    }
}

impl TrunkConfig {
    /// Checks the sizes (each block halves the image; it must stay at least 1×1).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=4096).contains(&self.height) && (1..=4096).contains(&self.width),
            "trunk: image size {}×{} must be 1 to 4096 per side",
            self.height,
            self.width
        );
        ensure!(
            (1..=6).contains(&self.channels.len()),
            "trunk: {} conv blocks, expected 1 to 6",
            self.channels.len()
        );
        if let Some(c) = self.channels.iter().find(|&&c| !(1..=1024).contains(&c)) {
            bail!("trunk: a block has {c} channels, expected 1 to 1024");
        }
        ensure!(
            (1..=65_536).contains(&self.features),
            "trunk: {} features, expected 1 to 65536",
            self.features
        );
        let (h, w) = self.pooled();
        ensure!(
            h >= 1 && w >= 1,
            "trunk: {} blocks pool a {}×{} image to nothing",
            self.channels.len(),
            self.height,
            self.width
        );
        Ok(())
    }

    /// Refuses a trunk whose training cannot fit in this process's memory, before any
    /// tensor is made: each parameter is held as often while training as the MLP's are
    /// counted (`limits`: value, gradient, Adam's two moments, in f32). Every option can be in range while their product is not
    /// (`--channels 1024 --channels 1024 --features 65536` on 28×28: a 13 GB `fc` weight,
    /// which aborted the process on its allocation).
    pub fn check_training_fits(&self) -> Result<()> {
        let elements = self
            .tensor_shapes()
            .iter()
            .try_fold(0u64, |total, (_, shape)| {
                shape
                    .iter()
                    .try_fold(1u64, |product, &dim| product.checked_mul(dim as u64))?
                    .checked_add(total)
            });
        gauss_layer::memory::check_fits(
            &format!(
                "training the CNN trunk (--channels {:?}, --features {}, {}×{} images)",
                self.channels, self.features, self.height, self.width
            ),
            elements.and_then(|e| e.checked_mul(crate::limits::BYTES * crate::limits::COPIES)),
        )?;
        Ok(())
    }

    /// Spatial size after the blocks (each 2×2 pool floors).
    fn pooled(&self) -> (usize, usize) {
        let blocks = self.channels.len() as u32;
        (self.height >> blocks, self.width >> blocks)
    }

    fn flat(&self) -> usize {
        let (h, w) = self.pooled();
        h * w * self.channels.last().copied().unwrap_or(1)
    }

    /// Every tensor's name (without the `trunk.` prefix) and shape.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let mut c_in = 1;
        for (i, &c) in self.channels.iter().enumerate() {
            out.push((format!("conv{i}.weight"), vec![c, c_in, 3, 3]));
            out.push((format!("conv{i}.bias"), vec![c]));
            if self.batch_norm {
                for part in BATCH_NORM_TENSORS {
                    out.push((format!("bn{i}.{part}"), vec![c]));
                }
            }
            c_in = c;
        }
        out.push(("fc.weight".into(), vec![self.features, self.flat()]));
        out.push(("fc.bias".into(), vec![self.features]));
        out
    }
}

/// A block's batch-norm tensors (candle-nn's names) and the value each starts at.
const BATCH_NORM_TENSORS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

fn batch_norm_start(part: &str) -> f32 {
    match part {
        "weight" | "running_var" => 1.0,
        _ => 0.0,
    }
}

/// The convolutional trunk (see [`TrunkConfig`]).
pub struct Trunk {
    convs: Vec<Conv2d>,
    /// One per block when the config asks for batch norm, else empty.
    norms: Vec<BatchNorm>,
    fc: Linear,
    config: TrunkConfig,
}

impl Trunk {
    /// Builds the trunk from `varmap` (names of [`TrunkConfig::tensor_shapes`]); a variable
    /// missing there is created with candle-nn's own initialization.
    pub fn new(
        config: TrunkConfig,
        varmap: &VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let vb = VarBuilder::from_varmap(varmap, dtype, device);
        let conv = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut convs = Vec::new();
        let mut norms = Vec::new();
        let mut c_in = 1;
        for (i, &c) in config.channels.iter().enumerate() {
            convs.push(candle_nn::conv2d(
                c_in,
                c,
                3,
                conv,
                vb.pp(format!("conv{i}")),
            )?);
            if config.batch_norm {
                norms.push(candle_nn::batch_norm(
                    c,
                    BatchNormConfig::default(),
                    vb.pp(format!("bn{i}")),
                )?);
            }
            c_in = c;
        }
        let fc = candle_nn::linear(config.flat(), config.features, vb.pp("fc"))?;
        Ok(Self {
            convs,
            norms,
            fc,
            config,
        })
    }

    /// Seeded He-uniform weights (bound √(6 / fan_in)), zero biases and batch norms that
    /// start as the identity, written into
    /// `varmap` before [`Trunk::new`] (Candle's CPU generator cannot be seeded).
    pub fn seeded_varmap(
        config: &TrunkConfig,
        rng: &mut StdRng,
        dtype: DType,
        device: &Device,
    ) -> Result<VarMap> {
        let varmap = VarMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
            for (name, shape) in config.tensor_shapes() {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = if name.starts_with("bn") {
                    let part = name.rsplit('.').next().unwrap_or_default();
                    vec![batch_norm_start(part); n]
                } else if name.ends_with(".bias") {
                    vec![0.0; n]
                } else {
                    let fan_in: usize = shape[1..].iter().product();
                    let bound = (6.0 / fan_in as f64).sqrt();
                    (0..n)
                        .map(|_| rng.random_range(-bound..=bound) as f32)
                        .collect()
                };
                let t = Tensor::from_vec(values, shape, &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(device)?;
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        Ok(varmap)
    }

    pub fn config(&self) -> &TrunkConfig {
        &self.config
    }

    /// # Shapes
    /// `x`: (B, H·W) or (B, 1, H, W) → (B, features)
    ///
    /// # Errors
    /// A shape that is neither; Candle errors.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(x, false)
    }

    /// [`Trunk::forward`] in training mode when `train` (batch norms normalize with the
    /// batch's statistics and update their running ones).
    ///
    /// # Shapes
    /// As [`Trunk::forward`].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_on(x, train, conv_block::has_cpu_path(x))
    }

    /// [`Trunk::forward_t`] through the fused CPU blocks or the portable ones.
    fn forward_on(&self, x: &Tensor, train: bool, cpu_path: bool) -> candle_core::Result<Tensor> {
        let (h, w) = (self.config.height, self.config.width);
        let b = x.dim(0)?;
        let mut t = match x.dims() {
            [_, d] if *d == h * w => x.reshape((b, 1, h, w))?,
            [_, 1, xh, xw] if (*xh, *xw) == (h, w) => x.clone(),
            other => candle_core::bail!(
                "the trunk takes (N, {}) or (N, 1, {h}, {w}), got {other:?}",
                h * w
            ),
        };
        if cpu_path {
            // NHWC through the blocks; back to NCHW before flattening so `fc` sees the
            // same feature order on every path.
            t = t.permute((0, 2, 3, 1))?;
            for (i, conv) in self.convs.iter().enumerate() {
                t = conv_block::block_cpu(conv, self.norms.get(i), &t, train)?;
            }
            t = t.permute((0, 3, 1, 2))?;
        } else {
            for (i, conv) in self.convs.iter().enumerate() {
                t = conv_block::block_portable(conv, self.norms.get(i), &t, train)?;
            }
        }
        let t = self.fc.forward(&t.flatten_from(1)?)?;
        Ok(match self.config.activation {
            Activation::Relu => t.relu()?,
            Activation::Tanh => t.tanh()?,
            Activation::None => t,
        })
    }

    /// The trunk's tensors under their checkpoint names (`trunk.` prefix).
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, conv) in self.convs.iter().enumerate() {
            out.push((
                format!("{TENSOR_PREFIX}conv{i}.weight"),
                conv.weight().clone(),
            ));
            if let Some(b) = conv.bias() {
                out.push((format!("{TENSOR_PREFIX}conv{i}.bias"), b.clone()));
            }
            if let Some(norm) = self.norms.get(i) {
                let (weight, bias) = norm
                    .weight_and_bias()
                    .map(|(w, b)| (w.clone(), b.clone()))
                    .unzip();
                let parts = [
                    weight,
                    bias,
                    Some(norm.running_mean().clone()),
                    Some(norm.running_var().clone()),
                ];
                for (part, t) in BATCH_NORM_TENSORS.iter().zip(parts) {
                    if let Some(t) = t {
                        out.push((format!("{TENSOR_PREFIX}bn{i}.{part}"), t));
                    }
                }
            }
        }
        out.push((
            format!("{TENSOR_PREFIX}fc.weight"),
            self.fc.weight().clone(),
        ));
        if let Some(b) = self.fc.bias() {
            out.push((format!("{TENSOR_PREFIX}fc.bias"), b.clone()));
        }
        out
    }
}

/// The trunk under the library's Gaussian layers.
pub struct CnnFgn {
    pub trunk: Trunk,
    pub net: GaussNet,
}

/// The same trunk with a linear head (the classical baseline).
pub struct CnnClassical {
    pub trunk: Trunk,
    pub head: Mlp,
}

impl Classifier for CnnFgn {
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let features = self.trunk.forward(x)?;
        Ok(self.net.forward(&features, false)?)
    }
}

impl Classifier for CnnClassical {
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let features = self.trunk.forward(x)?;
        self.head.logits(&features)
    }
}

/// Whether the checkpoint at `path` is a CNN one (its metadata holds `user.trunk`). Reads
/// only the header.
pub fn is_cnn_checkpoint(path: &Path) -> Result<bool> {
    use std::io::Read;
    // A FIFO or device is refused unopened (it could block forever).
    let mut file = gauss_layer::files::open_regular(path)?;
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() {
        return Ok(false); // Not ours to judge: the library's loader gives the error.
    }
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Ok(false);
    }
    let mut header = Vec::new();
    file.take(n).read_to_end(&mut header)?;
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return Ok(false);
    };
    Ok(value
        .get("__metadata__")
        .and_then(|m| m.get(format!("user.{TRUNK_KEY}")))
        .is_some())
}

/// Saves the whole network: the library's checkpoint of `model.net` (with `meta` and the
/// trunk config as `user.trunk`) plus the trunk's tensors, in one file, atomically.
pub fn save(model: &CnnFgn, path: &Path, meta: &BTreeMap<String, String>) -> Result<()> {
    let mut meta = meta.clone();
    meta.insert("arch".into(), "cnn".into());
    meta.insert(
        TRUNK_KEY.into(),
        serde_json::to_string(model.trunk.config())?,
    );
    // The library writes the Gaussian part (its format, metadata and config) to a scratch
    // file, which is read back and completed with the trunk.
    let scratch = std::env::temp_dir().join(format!(
        "fgn-cnn-{}-{}.safetensors",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    checkpoint::save_with_metadata(&model.net, &scratch, &meta)?;
    let bytes = std::fs::read(&scratch);
    let _ = std::fs::remove_file(&scratch);
    let bytes = bytes.context("cannot read back the scratch checkpoint")?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let metadata = header.metadata().clone();
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let dtype = model
        .net
        .layers()
        .first()
        .map(|l| l.center().dtype())
        .context("the network has no layers")?;
    for (name, t) in model.trunk.named_tensors() {
        tensors.insert(
            name,
            t.to_dtype(dtype)?.to_device(&Device::Cpu)?.contiguous()?,
        );
    }
    let out = safetensors::tensor::serialize(&tensors, metadata)?;
    // The library's one atomic write: temp file removed on error, dead writers' debris too.
    Ok(gauss_layer::files::write_atomically(path, &out)?)
}

/// A loaded CNN checkpoint.
pub struct LoadedCnn {
    pub model: CnnFgn,
    pub user_metadata: BTreeMap<String, String>,
}

/// Loads a CNN checkpoint: the Gaussian part through `gauss_layer::checkpoint` (all of its
/// checks), the trunk checked here (see the module docs).
pub fn load(path: &Path, device: &Device, dtype: Option<DType>) -> Result<LoadedCnn> {
    let origin = path.display().to_string();
    // `open_regular` refuses a FIFO or a directory before anything blocks; reading at most one
    // byte past the limit keeps memory bounded even if the file grows after it was opened.
    let file = gauss_layer::files::open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {origin}"))?;
    ensure!(
        bytes.len() as u64 <= MAX_FILE_BYTES,
        "{origin}: more than the {MAX_FILE_BYTES} bytes a CNN checkpoint may hold"
    );
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{origin}: not a readable safetensors file: {e}"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{origin}: not a readable safetensors file: {e}"))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let trunk_json = metadata
        .get(&format!("user.{TRUNK_KEY}"))
        .with_context(|| {
            format!("{origin}: metadata `user.{TRUNK_KEY}` is missing (not a CNN checkpoint)")
        })?;
    let config: TrunkConfig = serde_json::from_str(trunk_json)
        .with_context(|| format!("{origin}: metadata `user.{TRUNK_KEY}` is not a trunk config"))?;
    config
        .validate()
        .with_context(|| format!("{origin}: metadata `user.{TRUNK_KEY}`"))?;

    // The Gaussian part, re-serialized without the trunk, through the library's strict loader.
    let names = file.names();
    let gauss: Vec<(&str, safetensors::tensor::TensorView)> = names
        .iter()
        .filter(|n| !n.starts_with(TENSOR_PREFIX))
        .map(|n| Ok((*n, file.tensor(n)?)))
        .collect::<std::result::Result<_, safetensors::SafeTensorError>>()?;
    let gauss_bytes = safetensors::tensor::serialize(gauss, Some(metadata.clone()))?;
    let loaded = checkpoint::load_from_bytes(&gauss_bytes, path, device, dtype)?;
    // The Gaussian part's default too (f64 loads as f32 on Metal), so the trunk feeds it
    // features of its own dtype.
    let run_dtype =
        dtype.unwrap_or_else(|| checkpoint::default_load_dtype(loaded.stored_dtype, device));
    ensure!(
        loaded.net.config().in_features == config.features,
        "{origin}: the trunk gives {} features, the Gaussian layers take {}",
        config.features,
        loaded.net.config().in_features
    );

    // The trunk: exactly the tensors its config implies, in the stored dtype, finite.
    let expected = config.tensor_shapes();
    let expected_names: Vec<String> = expected
        .iter()
        .map(|(n, _)| format!("{TENSOR_PREFIX}{n}"))
        .collect();
    if let Some(extra) = names
        .iter()
        .filter(|n| n.starts_with(TENSOR_PREFIX))
        .find(|n| !expected_names.iter().any(|e| e.as_str() == **n))
    {
        bail!("{origin}: unexpected tensor `{extra}` (not part of the trunk config)");
    }
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
        for ((name, shape), full) in expected.iter().zip(&expected_names) {
            let view = file
                .tensor(full)
                .map_err(|_| anyhow::anyhow!("{origin}: tensor `{full}` is missing"))?;
            ensure!(
                view.shape() == shape.as_slice(),
                "{origin}: tensor `{full}` has shape {:?}, the trunk config implies {shape:?}",
                view.shape()
            );
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)?;
            ensure!(
                t.dtype() == loaded.stored_dtype,
                "{origin}: tensor `{full}` has dtype {:?}, the checkpoint's is {:?}",
                t.dtype(),
                loaded.stored_dtype
            );
            // f64: the trunk tensors are read from the file onto the CPU.
            let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                bail!(
                    "{origin}: tensor `{full}` holds {} at element {i}",
                    values[i]
                );
            }
            let t = t.to_dtype(run_dtype)?.to_device(device)?;
            data.insert(name.clone(), Var::from_tensor(&t)?);
        }
    }
    let trunk = Trunk::new(config, &varmap, run_dtype, device)?;
    Ok(LoadedCnn {
        model: CnnFgn {
            trunk,
            net: loaded.net,
        },
        user_metadata: loaded.user_metadata,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use gauss_layer::{GaussLayerConfig, GaussNetConfig, InitConfig};
    use rand::SeedableRng;

    /// A seeded f32 CPU CNN: a 2-block trunk on 8×6 images, 4 features, Gaussian layers 5
    /// and 3 (three classes).
    pub(crate) fn small() -> (CnnFgn, VarMap) {
        small_with(false)
    }

    /// An f32 CPU trunk of `channels` blocks on `height × width` images, seeded.
    fn seeded_trunk(
        (height, width): (usize, usize),
        channels: Vec<usize>,
        (features, activation): (usize, Activation),
        batch_norm: bool,
        seed: u64,
    ) -> (Trunk, VarMap) {
        let config = TrunkConfig {
            height,
            width,
            channels,
            features,
            activation,
            batch_norm,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let varmap = Trunk::seeded_varmap(&config, &mut rng, DType::F32, &Device::Cpu).unwrap();
        let trunk = Trunk::new(config, &varmap, DType::F32, &Device::Cpu).unwrap();
        (trunk, varmap)
    }

    fn small_with(batch_norm: bool) -> (CnnFgn, VarMap) {
        let (trunk, _) = seeded_trunk((8, 6), vec![2, 3], (4, Activation::Tanh), batch_norm, 1);
        let net_vars = VarMap::new();
        let layer = GaussLayerConfig {
            init: InitConfig {
                seed: Some(3),
                ..Default::default()
            },
            ..Default::default()
        };
        let net = GaussNet::new(
            GaussNetConfig {
                in_features: 4,
                hidden: vec![5],
                out_features: 3,
                layer: layer.clone(),
                output_layer: Some(layer),
                gate: true,
                ..Default::default()
            },
            VarBuilder::from_varmap(&net_vars, DType::F32, &Device::Cpu),
        )
        .unwrap();
        (CnnFgn { trunk, net }, net_vars)
    }

    /// Options each in range whose product cannot be trained here are refused before any
    /// tensor is made; a small trunk fits.
    #[test]
    fn a_trunk_too_large_to_train_is_refused_first() {
        let config = |side: usize, channels: Vec<usize>, features| TrunkConfig {
            height: side,
            width: side,
            channels,
            features,
            activation: Activation::Relu,
            batch_norm: false,
        };
        // 1024×1024 images: an `fc` weight of 65536 × (256·256·1024) f32, ~70 TB to train.
        let huge = config(1024, vec![1024, 1024], 65_536);
        huge.validate().unwrap();
        let e = huge.check_training_fits().unwrap_err().to_string();
        assert!(
            e.contains("--channels [1024, 1024]") && e.contains("--features 65536"),
            "{e}"
        );
        config(28, vec![16, 32], 64).check_training_fits().unwrap();
    }

    /// Test-time mirroring averages a view and its mirror, so the mirrored network gives an
    /// image and its mirror the same logits and Gaussians; and its average is the mean of
    /// the two single-view forwards.
    #[test]
    fn mirrored_views_are_mirror_invariant_and_the_mean_of_both() {
        let (model, _) = small();
        let (h, w) = (model.trunk.config().height, model.trunk.config().width);
        let x = Tensor::rand(0f32, 1.0, (3, h * w), &Device::Cpu).unwrap();
        let mirrored = crate::mirror::with_mirrors(&x, h, w)
            .unwrap()
            .narrow(0, 3, 3)
            .unwrap();
        let gap = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar())
                .unwrap()
        };
        let (logits, gaussians) = model.forward_views(&x, true).unwrap();
        let (logits_m, gaussians_m) = model.forward_views(&mirrored, true).unwrap();
        assert!(gap(&logits, &logits_m) < 1e-5);
        for (g, g_m) in gaussians.iter().zip(&gaussians_m) {
            assert!(gap(g, g_m) < 1e-6);
        }
        let (single, single_g) = model.forward_views(&x, false).unwrap();
        let (single_m, single_g_m) = model.forward_views(&mirrored, false).unwrap();
        // The single views differ (else the test could not fail)...
        assert!(gap(&single, &single_m) > 1e-4);
        // ...and the mirrored forward is their mean.
        let mean = ((single + single_m).unwrap() / 2.0).unwrap();
        assert!(gap(&logits, &mean) < 1e-5);
        let last = single_g.len() - 1;
        let mean_g = ((&single_g[last] + &single_g_m[last]).unwrap() / 2.0).unwrap();
        assert!(gap(&gaussians[last], &mean_g) < 1e-6);
    }

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "fgn-cnn-test-{name}-{}.safetensors",
            std::process::id()
        ))
    }

    #[test]
    fn the_fused_cpu_trunk_computes_the_portable_one() {
        // Same weights, both block forms, NHWC and back: same features and the same
        // gradients for every trunk tensor (f32 rounding apart), with and without batch
        // norm, in training and in evaluation mode.
        for batch_norm in [false, true] {
            let (trunk, varmap) =
                seeded_trunk((9, 6), vec![3, 4], (5, Activation::None), batch_norm, 5);
            let x = Tensor::rand(0f32, 1.0, (4, 54), &Device::Cpu).unwrap();
            let probe = Tensor::randn(0f32, 1.0, (4, 5), &Device::Cpu).unwrap();
            let gap = |a: &Tensor, b: &Tensor| -> f32 {
                (a - b)
                    .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar())
                    .unwrap()
            };
            for train in [true, false] {
                let fused = trunk.forward_on(&x, train, true).unwrap();
                let portable = trunk.forward_on(&x, train, false).unwrap();
                let what = format!("batch norm {batch_norm}, train {train}");
                assert!(
                    gap(&fused, &portable) < 1e-5,
                    "{what}: {}",
                    gap(&fused, &portable)
                );
                let grad = |out: &Tensor| {
                    (out * &probe)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap()
                };
                let (g_fused, g_portable) = (grad(&fused), grad(&portable));
                let vars = varmap.data().lock().unwrap();
                assert_eq!(vars.len(), if batch_norm { 14 } else { 6 });
                for (name, var) in vars.iter().filter(|(n, _)| !n.contains("running")) {
                    let (a, b) = (g_fused.get(var).unwrap(), g_portable.get(var).unwrap());
                    assert!(gap(a, b) < 1e-4, "{what}, {name}: {}", gap(a, b));
                }
            }
        }
    }

    #[test]
    fn a_saved_cnn_rebuilds_the_same_function() {
        for batch_norm in [false, true] {
            let (model, _vars) = small_with(batch_norm);
            let x = Tensor::arange(0f32, 96.0, &Device::Cpu)
                .unwrap()
                .reshape((2, 48))
                .unwrap()
                .affine(1.0 / 96.0, 0.0)
                .unwrap();
            // Training-mode passes move the batch norms' running statistics off their
            // start, so the round trip has to carry them.
            for _ in 0..3 {
                model.trunk.forward_t(&x, true).unwrap();
            }
            let before = model.logits(&x).unwrap().to_vec2::<f32>().unwrap();
            // (N, 1, H, W) gives what (N, H·W) gives.
            let image = model.logits(&x.reshape((2, 1, 8, 6)).unwrap()).unwrap();
            assert_eq!(image.to_vec2::<f32>().unwrap(), before);
            let path = temp(&format!("roundtrip-{batch_norm}"));
            let mut meta = BTreeMap::new();
            meta.insert("input_scale".to_string(), "255".to_string());
            save(&model, &path, &meta).unwrap();
            assert!(is_cnn_checkpoint(&path).unwrap());
            let loaded = load(&path, &Device::Cpu, None).unwrap();
            std::fs::remove_file(&path).unwrap();
            assert_eq!(loaded.user_metadata["input_scale"], "255");
            assert_eq!(loaded.model.trunk.config(), model.trunk.config());
            if batch_norm {
                let mean = loaded.model.trunk.norms[0].running_mean();
                let moved: f32 = mean.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
                assert!(moved > 0.0, "the running mean never left 0");
            }
            assert_eq!(
                loaded.model.logits(&x).unwrap().to_vec2::<f32>().unwrap(),
                before
            );
        }
    }

    #[test]
    fn a_trunk_config_from_before_batch_norm_still_loads() {
        // `user.trunk` as checkpoints wrote it before the field existed.
        let old =
            r#"{"height":28,"width":28,"channels":[16,32],"features":64,"activation":"none"}"#;
        let config: TrunkConfig = serde_json::from_str(old).unwrap();
        assert!(!config.batch_norm);
        assert_eq!(config.tensor_shapes().len(), 6);
        let unknown = old.replace("\"features\"", "\"feature_count\"");
        assert!(serde_json::from_str::<TrunkConfig>(&unknown).is_err());
    }

    /// Rewrites the saved checkpoint with `edit` applied to its tensors and metadata.
    fn damaged(
        name: &str,
        edit: impl FnOnce(&mut HashMap<String, Tensor>, &mut HashMap<String, String>),
    ) -> String {
        let (model, _vars) = small();
        let path = temp(name);
        save(&model, &path, &BTreeMap::new()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        edit(&mut tensors, &mut meta);
        std::fs::write(
            &path,
            safetensors::tensor::serialize(&tensors, Some(meta)).unwrap(),
        )
        .unwrap();
        let error = format!("{:#}", load(&path, &Device::Cpu, None).err().unwrap());
        std::fs::remove_file(&path).unwrap();
        error
    }

    #[test]
    fn a_damaged_trunk_is_refused_naming_what() {
        let e = damaged("missing", |t, _| {
            t.remove("trunk.conv1.bias");
        });
        assert!(e.contains("`trunk.conv1.bias` is missing"), "{e}");
        let e = damaged("extra", |t, _| {
            t.insert(
                "trunk.conv9.weight".into(),
                Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
            );
        });
        assert!(e.contains("unexpected tensor `trunk.conv9.weight`"), "{e}");
        let e = damaged("shape", |t, _| {
            t.insert(
                "trunk.fc.bias".into(),
                Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
            );
        });
        assert!(e.contains("`trunk.fc.bias` has shape [5]"), "{e}");
        let e = damaged("dtype", |t, _| {
            // f64: a test on the CPU.
            let b = t["trunk.fc.bias"].to_dtype(DType::F64).unwrap();
            t.insert("trunk.fc.bias".into(), b);
        });
        assert!(e.contains("has dtype F64"), "{e}");
        let e = damaged("nan", |t, _| {
            let w = Tensor::new(&[f32::NAN, 0.0, 0.0], &Device::Cpu).unwrap();
            t.insert("trunk.conv1.bias".into(), w);
        });
        assert!(
            e.contains("`trunk.conv1.bias` holds NaN at element 0"),
            "{e}"
        );
        let e = damaged("unknown-field", |_, m| {
            let c = m["user.trunk"].replace("\"height\"", "\"depth\":1,\"height\"");
            m.insert("user.trunk".into(), c);
        });
        assert!(e.contains("unknown field `depth`"), "{e}");
        let e = damaged("too-deep", |_, m| {
            let c = m["user.trunk"].replace("[2,3]", "[2,3,4,5]");
            m.insert("user.trunk".into(), c);
        });
        assert!(e.contains("pool a 8×6 image to nothing"), "{e}");
        // The Gaussian part goes through the library's checks.
        let e = damaged("gauss", |t, _| {
            t.remove("layers.1.center");
        });
        assert!(e.contains("layers.1.center"), "{e}");
    }
}
