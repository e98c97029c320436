//! The `--arch cnn` side of `train`, `eval` and `predict`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use gauss_layer::{
    GaussLayerConfig, GaussNetConfig, InitConfig, Parameterization, PrecisionConfig,
};
use gauss_losses::FgnObjectiveConfig;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::augment::Augment;
use crate::calibration;
use crate::cnn::{self, Activation, TrunkConfig};
use crate::idx::IdxData;
use crate::mirror::{self, Views};
use crate::ood::{self, OodSource};
use crate::train::Schedule;

/// Default epochs of `--arch cnn`.
pub const DEFAULT_EPOCHS: usize = 10;
/// Default Adam learning rate of `--arch cnn` (decayed to 0 by a cosine).
pub const DEFAULT_LR: f64 = 1e-3;

/// Settings of a CNN training run (from `train`'s arguments).
pub struct CnnRun<'a> {
    pub parameterization: Parameterization,
    pub hidden: &'a [usize],
    pub channels: &'a [usize],
    /// Batch norm in each conv block (see [`TrunkConfig::batch_norm`]).
    pub trunk_batch_norm: bool,
    pub features: usize,
    pub activation: Activation,
    pub tied_bias: bool,
    pub feature_batch_norm: bool,
    pub head_lr: f64,
    pub lambda_sigma: f64,
    pub lambda_l2: f64,
    pub schedule: Schedule,
    pub seed: u64,
    pub classical: bool,
    pub fgn: bool,
    pub ood: &'a [OodSource],
    pub out: &'a Path,
    /// Fraction of the training images held out to fit a softmax temperature (see
    /// [`crate::calibration`]), or `None`.
    pub calibration_split: Option<f64>,
    /// Random transformations of the training images.
    pub augment: Augment,
    /// Average each test image's outputs with its mirror's (see [`crate::mirror`]).
    pub test_time_mirror: bool,
}

/// `train --arch cnn`: the classical CNN and/or the CNN FGN, evaluated (and OOD-scored when
/// sets are given); the FGN is saved to `run.out`.
pub fn train(run: &CnnRun, data: IdxData, device: &Device) -> Result<Value> {
    let IdxData {
        mut set,
        height,
        width,
    } = data;
    let trunk = TrunkConfig {
        height,
        width,
        channels: run.channels.to_vec(),
        features: run.features,
        activation: run.activation,
        batch_norm: run.trunk_batch_norm,
    };
    trunk.validate()?;
    let mut rng = StdRng::seed_from_u64(run.seed);
    let started = Instant::now();
    let mut out = serde_json::Map::new();
    out.insert("arch".into(), json!("cnn"));
    out.insert("epochs".into(), json!(run.schedule.epochs));
    out.insert("learning_rate".into(), json!(run.schedule.learning_rate));
    out.insert("lambda_sigma".into(), json!(run.lambda_sigma));
    out.insert("head_learning_rate".into(), json!(run.head_lr));
    out.insert("feature_batch_norm".into(), json!(run.feature_batch_norm));
    out.insert("trunk".into(), serde_json::to_value(&trunk)?);
    out.insert("seed".into(), json!(run.seed));
    out.insert("augment".into(), json!(run.augment));
    out.insert("test_time_mirror".into(), json!(run.test_time_mirror));
    // The same seeded stream as the MLP's split, apart from the training's draws.
    let held_out = match run.calibration_split {
        Some(fraction) => {
            let mut split_rng = StdRng::seed_from_u64(run.seed ^ calibration::SPLIT_SEED);
            let (fit_part, held_out) = calibration::split(&set.train, fraction, &mut split_rng)?;
            set.train = fit_part;
            out.insert("train_images".into(), json!(set.train.len()));
            out.insert("calibration_images".into(), json!(held_out.len()));
            Some(held_out)
        }
        None => None,
    };
    // The temperature fitted on the held-out images (1 without them), and a note of it.
    let temperature_of = |model: &dyn ood::Scorer, what: &str| -> Result<Option<f64>> {
        let Some(held_out) = &held_out else {
            return Ok(None);
        };
        let temperature = calibration::fit(model, held_out, device)?;
        eprintln!(
            "{what}: temperature {temperature:.4} (fitted on {} held-out images)",
            held_out.len()
        );
        Ok(Some(temperature))
    };
    let mut fit_seconds = 0.0;
    if run.classical {
        let config = TrunkConfig {
            activation: Activation::Relu,
            ..trunk.clone()
        };
        let (model, seconds) = crate::cnn_train::train_classical(
            config,
            run.hidden,
            set.classes,
            &set.train,
            &run.schedule,
            run.augment,
            &mut rng,
            device,
        )?;
        fit_seconds += seconds;
        let scorer = Views {
            model: &model,
            mirror: run.test_time_mirror,
        };
        let temperature = temperature_of(&scorer, "classical cnn")?;
        let calibrated = calibration::Calibrated {
            model: &scorer,
            temperature: temperature.unwrap_or(1.0),
        };
        let mut report = ood::report(&calibrated, &set.test, run.ood, device, "classical cnn")?;
        if let Some(temperature) = temperature {
            report["temperature"] = json!(temperature);
        }
        out.insert("classical".into(), report);
    }
    if run.fgn {
        let init = InitConfig {
            seed: Some(run.seed),
            ..Default::default()
        };
        let config = GaussNetConfig {
            in_features: run.features,
            hidden: run.hidden.to_vec(),
            out_features: set.classes,
            layer: GaussLayerConfig {
                precision: PrecisionConfig::with_parameterization(run.parameterization),
                tanh: true,
                tied_bias: run.tied_bias,
                init: init.clone(),
                ..Default::default()
            },
            output_layer: Some(GaussLayerConfig {
                precision: PrecisionConfig::with_parameterization(run.parameterization),
                tied_bias: run.tied_bias,
                init,
                ..Default::default()
            }),
            gate: true,
            input_batch_norm: run.feature_batch_norm,
            ..Default::default()
        };
        let objective = FgnObjectiveConfig {
            lambda_l2: run.lambda_l2,
            lambda_sigma: run.lambda_sigma,
            ..Default::default()
        };
        let (model, seconds) = crate::cnn_train::train_fgn(
            trunk,
            config,
            &objective,
            &set.train,
            &run.schedule,
            run.augment,
            run.head_lr,
            &mut rng,
            device,
        )?;
        fit_seconds += seconds;
        let scorer = Views {
            model: &model,
            mirror: run.test_time_mirror,
        };
        let temperature = temperature_of(&scorer, "fgn cnn")?;
        let calibrated = calibration::Calibrated {
            model: &scorer,
            temperature: temperature.unwrap_or(1.0),
        };
        let mut report = ood::report(&calibrated, &set.test, run.ood, device, "fgn cnn")?;
        let mut meta = BTreeMap::new();
        if let Some(temperature) = temperature {
            report["temperature"] = json!(temperature);
            meta.insert(
                calibration::METADATA_KEY.to_string(),
                temperature.to_string(),
            );
        }
        if run.test_time_mirror {
            meta.insert(mirror::METADATA_KEY.to_string(), "true".to_string());
        }
        meta.insert("dataset".to_string(), set.name.to_string());
        meta.insert("input_scale".to_string(), set.input_scale.to_string());
        meta.insert("test_accuracy".to_string(), report["accuracy"].to_string());
        meta.insert("seed".to_string(), run.seed.to_string());
        meta.insert("epochs".to_string(), run.schedule.epochs.to_string());
        meta.insert("lambda_sigma".to_string(), run.lambda_sigma.to_string());
        cnn::save(&model, run.out, &meta)
            .with_context(|| format!("cannot save the checkpoint to {}", run.out.display()))?;
        eprintln!("saved {}", run.out.display());
        out.insert("checkpoint".into(), json!(run.out.display().to_string()));
        out.insert("fgn".into(), report);
    }
    examples_support::insert_timings(&mut out, started, fit_seconds);
    Ok(Value::Object(out))
}

/// `eval` of a CNN checkpoint on the test split of an IDX directory.
/// `test_time_mirror` forces mirroring on (else the checkpoint's record decides).
pub fn eval(
    path: &Path,
    data: IdxData,
    sets: &[OodSource],
    test_time_mirror: bool,
    device: &Device,
) -> Result<Value> {
    let loaded = cnn::load(path, device, None)?;
    let trunk = loaded.model.trunk.config();
    if (data.height, data.width) != (trunk.height, trunk.width) {
        bail!(
            "the checkpoint's trunk takes {}×{} images, the data has {}×{}",
            trunk.height,
            trunk.width,
            data.height,
            data.width
        );
    }
    let temperature = calibration::recorded(&loaded.user_metadata)?;
    let mirror = test_time_mirror || mirror::recorded(&loaded.user_metadata)?;
    let calibrated = calibration::Calibrated {
        model: &Views {
            model: &loaded.model,
            mirror,
        },
        temperature,
    };
    let report = ood::report(&calibrated, &data.set.test, sets, device, "fgn cnn")?;
    Ok(json!({
        "checkpoint": path.display().to_string(),
        "arch": "cnn",
        "temperature": temperature,
        "test_time_mirror": mirror,
        "fgn": report,
    }))
}

/// `predict` of a CNN checkpoint: `x` (N, H·W) or (N, 1, H, W), divided by the recorded
/// `input_scale`; writes `output` and each Gaussian layer's `g{i}`.
pub fn predict(
    checkpoint: &Path,
    input: &Path,
    device: &Device,
    dtype: Option<DType>,
    test_time_mirror: bool,
) -> Result<(HashMap<String, Tensor>, Value)> {
    let loaded = cnn::load(checkpoint, device, dtype)?;
    let model = &loaded.model;
    let scale = crate::validate::recorded_input_scale(&loaded.user_metadata, 1.0)?;
    let run_dtype = model
        .net
        .layers()
        .first()
        .map(|l| l.center().dtype())
        .context("the checkpoint's network has no layers")?;
    let bytes = gauss_layer::files::read_regular(input)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{} is not a readable safetensors file", input.display()))?;
    let Some(x) = tensors.get("x") else {
        bail!(
            "{}: no tensor `x`; predict reads the inputs from `x`",
            input.display()
        );
    };
    let (h, w) = (model.trunk.config().height, model.trunk.config().width);
    let shape_ok = match x.dims() {
        [n, d] => *n > 0 && *d == h * w,
        [n, 1, xh, xw] => *n > 0 && (*xh, *xw) == (h, w),
        _ => false,
    };
    if !shape_ok {
        bail!(
            "{}: `x` has shape {:?}, the network expects (N, {}) or (N, 1, {h}, {w}) with N >= 1",
            input.display(),
            x.dims(),
            h * w
        );
    }
    if !matches!(
        x.dtype(),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::U8 | DType::U32 | DType::I64
    ) {
        bail!(
            "{}: `x` has dtype {:?}; expected a float or integer tensor",
            input.display(),
            x.dtype()
        );
    }
    // f64: `x` was read from the file onto the CPU; it is scaled and cast there, and checked
    // finite after both (a finite 1e300 overflows f32), before it moves to the device.
    let scaled = (x.to_dtype(DType::F64)? / scale)?.to_dtype(run_dtype)?;
    // f64: the scaled input is still on the CPU.
    let values = scaled
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: `x` element {i} is {} after scaling by 1/{scale} and conversion to {run_dtype:?}; expected finite values",
            input.display(),
            values[i]
        );
    }
    let x = scaled.to_device(device)?;
    let temperature = crate::calibration::recorded(&loaded.user_metadata)?;
    let mirror = test_time_mirror || mirror::recorded(&loaded.user_metadata)?;
    let (logits, gaussians) = model.forward_views(&x, mirror)?;
    let output = (logits / temperature)?;
    let host = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.contiguous()?) };
    let mut out = HashMap::new();
    out.insert("output".to_string(), host(&output)?);
    let mut names = vec!["output".to_string()];
    for (i, g) in gaussians.iter().enumerate() {
        out.insert(format!("g{i}"), host(g)?);
        names.push(format!("g{i}"));
    }
    let summary = json!({
        "command": "predict",
        "arch": "cnn",
        "checkpoint": checkpoint.display().to_string(),
        "input": input.display().to_string(),
        "rows": x.dim(0)?,
        "out_features": model.net.config().out_features,
        "input_scale": scale,
        "temperature": temperature,
        "test_time_mirror": mirror,
        "tensors": names,
    });
    Ok((out, summary))
}
