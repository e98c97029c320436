//! The FGN paper's checks: accuracy and confidence on the data, on uniform noise, on
//! pixel-shuffled images, and under FGSM attacks (input gradient through Candle autograd).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::data::Split;

/// The FGSM step sizes (in pixel units of [0, 1]).
pub const FGSM_EPSILONS: [f64; 4] = [0.05, 0.1, 0.2, 0.3];
/// Number of uniform-noise images.
const NOISE_IMAGES: usize = 1000;
/// Seed of the noise and shuffles, fixed so evaluations are reproducible.
const EVAL_SEED: u64 = 20_230_613;
/// Evaluation batch size (memory only: results do not depend on it).
const BATCH: usize = 2048;

/// Something that maps a batch of images (B, D) to logits (B, C) in evaluation mode.
pub trait Classifier {
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

impl Classifier for gauss_layer::GaussNet {
    /// Inputs come as f32; an f64 checkpoint (`import` writes them) runs in f64.
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = match self.dtype() {
            Some(dtype) if dtype != x.dtype() => x.to_dtype(dtype)?,
            _ => x.clone(),
        };
        Ok(self.forward(&x, false)?)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FgsmResult {
    pub epsilon: f64,
    pub accuracy: f64,
    pub mean_max_softmax: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub test_accuracy: f64,
    pub test_correct: usize,
    pub test_total: usize,
    pub test_mean_max_softmax: f64,
    pub noise_mean_max_softmax: f64,
    pub shuffled_mean_max_softmax: f64,
    pub fgsm: Vec<FgsmResult>,
}

/// Predictions and max-softmax of `images` (host f32), computed on `device` in batches.
fn predict(
    model: &dyn Classifier,
    images: &Tensor,
    device: &Device,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let n = images.dims()[0];
    let mut classes = Vec::with_capacity(n);
    let mut confidence = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let len = BATCH.min(n - start);
        let x = images.narrow(0, start, len)?.to_device(device)?;
        let probs = candle_nn::ops::softmax_last_dim(&model.logits(&x)?.to_dtype(DType::F32)?)?;
        classes.extend(
            probs
                .argmax(D::Minus1)?
                .to_device(&Device::Cpu)?
                .to_vec1::<u32>()?,
        );
        confidence.extend(
            probs
                .max(D::Minus1)?
                .to_device(&Device::Cpu)?
                .to_vec1::<f32>()?,
        );
        start += len;
    }
    Ok((classes, confidence))
}

fn mean(values: &[f32]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64
}

fn correct(predicted: &[u32], labels: &[u32]) -> usize {
    predicted.iter().zip(labels).filter(|(p, l)| p == l).count()
}

/// FGSM (untargeted): `x + ε · sign(∇_x cross_entropy(model(x), y))`, clamped to [0, 1].
fn fgsm(model: &dyn Classifier, split: &Split, epsilon: f64, device: &Device) -> Result<Tensor> {
    let n = split.len();
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = BATCH.min(n - start);
        let x = Var::from_tensor(&split.images.narrow(0, start, len)?.to_device(device)?)?;
        let y = split.labels.narrow(0, start, len)?.to_device(device)?;
        let logits = model.logits(x.as_tensor())?;
        let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &y)?;
        let grads = loss.backward()?;
        let Some(grad) = grads.get(x.as_tensor()) else {
            bail!("FGSM: the model's output does not depend on its input");
        };
        let adv = (x.as_tensor() + (grad.sign()? * epsilon)?)?.clamp(0f32, 1f32)?;
        out.push(adv.to_device(&Device::Cpu)?);
        start += len;
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// Runs every check on `split` (labels must be < the model's number of classes).
pub fn evaluate(model: &dyn Classifier, split: &Split, device: &Device) -> Result<Report> {
    let labels = split.labels.to_vec1::<u32>()?;
    let (predicted, confidence) = predict(model, &split.images, device)?;
    let classes = model
        .logits(
            &split
                .images
                .narrow(0, 0, 1.min(split.len()))?
                .to_device(device)?,
        )?
        .dim(1)?;
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
        bail!("label {bad} is out of range for a model with {classes} classes");
    }
    let test_correct = correct(&predicted, &labels);
    let features = split.features();
    let mut rng = StdRng::seed_from_u64(EVAL_SEED);

    let noise: Vec<f32> = (0..NOISE_IMAGES * features)
        .map(|_| rng.random::<f32>())
        .collect();
    let noise = Tensor::from_vec(noise, (NOISE_IMAGES, features), &Device::Cpu)?;
    let (_, noise_conf) = predict(model, &noise, device)?;

    let mut pixels = split.images.flatten_all()?.to_vec1::<f32>()?;
    for image in pixels.chunks_mut(features) {
        image.shuffle(&mut rng);
    }
    let shuffled = Tensor::from_vec(pixels, (split.len(), features), &Device::Cpu)?;
    let (_, shuffled_conf) = predict(model, &shuffled, device)?;

    let mut fgsm_results = Vec::new();
    for epsilon in FGSM_EPSILONS {
        let adv = fgsm(model, split, epsilon, device)?;
        let (adv_pred, adv_conf) = predict(model, &adv, device)?;
        fgsm_results.push(FgsmResult {
            epsilon,
            accuracy: correct(&adv_pred, &labels) as f64 / labels.len().max(1) as f64,
            mean_max_softmax: mean(&adv_conf),
        });
    }
    Ok(Report {
        test_accuracy: test_correct as f64 / labels.len().max(1) as f64,
        test_correct,
        test_total: labels.len(),
        test_mean_max_softmax: mean(&confidence),
        noise_mean_max_softmax: mean(&noise_conf),
        shuffled_mean_max_softmax: mean(&shuffled_conf),
        fgsm: fgsm_results,
    })
}
