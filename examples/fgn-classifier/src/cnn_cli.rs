//! The `--arch cnn` side of `train`, `eval` and `predict`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use gauss_layer::files::{DataFile, HostMatrix};
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
use crate::data::Split;
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
    /// Hutchinson probes of the λ-loss's tr Σ (`--trace-probes`; 0: the exact trace).
    pub trace_probes: usize,
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
    trunk.check_training_fits()?;
    let mut rng = StdRng::seed_from_u64(run.seed);
    let started = Instant::now();
    let mut out = serde_json::Map::new();
    out.insert("arch".into(), json!("cnn"));
    out.insert("epochs".into(), json!(run.schedule.epochs));
    out.insert("learning_rate".into(), json!(run.schedule.learning_rate));
    out.insert("lambda_sigma".into(), json!(run.lambda_sigma));
    out.insert("trace_probes".into(), json!(run.trace_probes));
    out.insert(
        "precision_lr_scale".into(),
        json!(run.schedule.precision_lr_scale),
    );
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
            trace_estimator: crate::trace_estimator(run.trace_probes),
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

/// `eval` of a CNN checkpoint on the test split of an IDX directory (`(split, height, width)`
/// as [`crate::idx::test_split`] reads it).
/// `test_time_mirror` forces mirroring on (else the checkpoint's record decides).
pub fn eval(
    path: &Path,
    (test, height, width): (Split, usize, usize),
    sets: &[OodSource],
    test_time_mirror: bool,
    device: &Device,
) -> Result<Value> {
    let loaded = cnn::load(path, device, None)?;
    let trunk = loaded.model.trunk.config();
    if (height, width) != (trunk.height, trunk.width) {
        bail!(
            "the checkpoint's trunk takes {}×{} images, the data has {height}×{width}",
            trunk.height,
            trunk.width,
        );
    }
    // Before any work: each --ood set holds images of the trunk's size.
    ood::check(sets, ood::InDistribution::Size(trunk.height, trunk.width))?;
    let temperature = calibration::recorded(&loaded.user_metadata)?;
    let mirror = test_time_mirror || mirror::recorded(&loaded.user_metadata)?;
    let calibrated = calibration::Calibrated {
        model: &Views {
            model: &loaded.model,
            mirror,
        },
        temperature,
    };
    let report = ood::report(&calibrated, &test, sets, device, "fgn cnn")?;
    Ok(json!({
        "checkpoint": path.display().to_string(),
        "arch": "cnn",
        "temperature": temperature,
        "test_time_mirror": mirror,
        "fgn": report,
    }))
}

/// The tensor `x` (N, 1, H, W) of the safetensors `bytes` as the matrix (N, H·W) of the same
/// values: `DataFile::matrix` reads rank 2 only, and the trunk takes either shape.
fn images_as_rows(bytes: &[u8], input: &Path, rows: usize, cols: usize) -> Result<HostMatrix> {
    let file = safetensors::SafeTensors::deserialize(bytes)?;
    let view = file.tensor("x")?;
    let flat = safetensors::tensor::TensorView::new(view.dtype(), vec![rows, cols], view.data())?;
    let flat_bytes = safetensors::tensor::serialize([("x", flat)], None)?;
    Ok(DataFile::parse(&flat_bytes, input)?.matrix("x")?)
}

/// `predict` of a CNN checkpoint: `x` (N, H·W) or (N, 1, H, W) of any float or integer
/// dtype, divided by `input_scale` or the recorded scale as the MLP's `predict` decides
/// ([`crate::predict::divisor`]); writes `output` and each Gaussian layer's `g{i}`.
pub fn predict(
    checkpoint: &Path,
    input: &Path,
    device: &Device,
    dtype: Option<DType>,
    input_scale: Option<f64>,
    test_time_mirror: bool,
) -> Result<(HashMap<String, Tensor>, Value)> {
    let loaded = cnn::load(checkpoint, device, dtype)?;
    let model = &loaded.model;
    let scale = crate::data::InputScale {
        recorded: crate::validate::recorded_input_scale(&loaded.user_metadata, 1.0)?,
        declared: input_scale,
        unit_range: false,
    };
    let run_dtype = model
        .net
        .layers()
        .first()
        .map(|l| l.center().dtype())
        .context("the checkpoint's network has no layers")?;
    let bytes = gauss_layer::files::read_regular(input)?;
    let file = DataFile::parse(&bytes, input)?;
    let shape = file.shape("x").with_context(|| {
        format!(
            "{}: predict reads the inputs from a tensor `x`",
            input.display()
        )
    })?;
    let (h, w) = (model.trunk.config().height, model.trunk.config().width);
    let shape_ok = match shape[..] {
        [n, d] => n > 0 && d == h * w,
        [n, 1, xh, xw] => n > 0 && (xh, xw) == (h, w),
        _ => false,
    };
    if !shape_ok {
        bail!(
            "{}: `x` has shape {shape:?}, the network expects (N, {}) or (N, 1, {h}, {w}) with N >= 1",
            input.display(),
            h * w
        );
    }
    // Read as the MLP's `predict` reads it (`DataFile::matrix`: every float and integer dtype,
    // each value finite), then checked finite after the scaling and the conversion to the
    // network's dtype (a finite 1e300 overflows f32), on the host.
    let scale = crate::predict::divisor(scale, file.is_float("x")?, input)?;
    let mut x = if shape.len() == 4 {
        images_as_rows(&bytes, input, shape[0], h * w)?
    } else {
        file.matrix("x")?
    };
    x.divide(scale);
    let x = x.to_tensor(run_dtype, device)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::Classifier;

    /// CNN `predict` reads `x` as the MLP's does: integer images (I32, I16, in either shape)
    /// give exactly what the same values as f32 of a declared `--input-scale 255` give, which
    /// is the model's own forward of `x / input_scale`; f32 without it is refused.
    #[test]
    fn predict_reads_integer_images_as_the_mlp_predict_does() -> Result<()> {
        let (model, _vars) = cnn::tests::small();
        let dir = std::env::temp_dir().join(format!("fgn-cnn-predict-int-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ckpt = dir.join("cnn.safetensors");
        let mut meta = BTreeMap::new();
        meta.insert("input_scale".to_string(), "255".to_string());
        cnn::save(&model, &ckpt, &meta)?;
        let cpu = Device::Cpu;
        // Pixel p of image i is (7·i + 5·p) % 256: integers that f32 holds exactly.
        let pixels: Vec<i32> = (0..96)
            .map(|v: i32| (7 * (v / 48) + 5 * (v % 48)) % 256)
            .collect();
        let as_i32 = Tensor::from_vec(pixels.clone(), (2, 48), &cpu)?;
        let as_f32 = as_i32.to_dtype(DType::F32)?;
        // Scaled in f64 and rounded to f32 once, as predict does.
        // f64: a unit test on the CPU (`as_i32` is built there)
        let scaled = (as_i32.to_dtype(DType::F64)? / 255.0)?.to_dtype(DType::F32)?;
        let expected = model.logits(&scaled)?.to_vec2::<f32>()?;
        let run = |name: &str, x: Tensor, declared: Option<f64>| -> Result<Vec<Vec<f32>>> {
            let input = dir.join(format!("{name}.safetensors"));
            candle_core::safetensors::save(&HashMap::from([("x".to_string(), x)]), &input)?;
            let (out, _) = predict(&ckpt, &input, &cpu, None, declared, false)?;
            Ok(out["output"].to_vec2::<f32>()?)
        };
        let i16_images = Tensor::from_vec(
            pixels.iter().map(|&v| v as i16).collect::<Vec<_>>(),
            (2, 1, 8, 6),
            &cpu,
        )?;
        // Float images need their scale declared (the checkpoint records 255, not 1).
        let undeclared = run("f32-undeclared", as_f32.clone(), None);
        let results = [
            ("f32", run("f32", as_f32, Some(255.0))?),
            ("i32", run("i32", as_i32, None)?),
            ("i16-images", run("i16", i16_images, None)?),
        ];
        std::fs::remove_dir_all(&dir)?;
        let e = format!("{:#}", undeclared.unwrap_err());
        assert!(e.contains("--input-scale 255"), "{e}");
        for (name, got) in results {
            assert_eq!(got, expected, "{name}");
        }
        Ok(())
    }
}
