//! Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one
//! scalar `T > 0` fitted after training by minimizing the negative log-likelihood of
//! `softmax(logits / T)` on a calibration split held out of the training data, then applied to
//! every later output. It changes no prediction (the argmax is the same) and none of the FGN's
//! own scores (the Gaussian activations do not see it); it makes the softmax confidences match
//! the accuracy, which the expected calibration error measures.
//!
//! `train --calibration-split F` holds out a seeded random fraction F of the training images
//! (the network never trains on them), fits `T` on them and records it in the checkpoint's
//! metadata as `temperature`; `eval`, `predict` and the out-of-distribution report divide the
//! logits by the recorded temperature (1 when none is recorded).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::data::Split;
use crate::evaluate::Classifier;
use crate::metrics;
use crate::ood::{self, Scorer};

/// The metadata key of the fitted temperature.
pub const METADATA_KEY: &str = "temperature";

/// Mixed into the run's seed for the calibration split's own random stream, so holding
/// images out does not shift the training's draws.
pub const SPLIT_SEED: u64 = 0xca1b_7a7e;

/// The search interval of `ln(1/T)`: T from 1e-2 to 1e2 (a fit at an end says so).
const LOG_INVERSE_RANGE: (f64, f64) = (-4.605_170_185_988_091, 4.605_170_185_988_091);

/// Splits `train` into (fit, calibration) parts by a random permutation drawn from `rng`:
/// `round(fraction · N)` images go to the calibration part.
///
/// # Errors
/// A fraction outside (0, 0.5], or a split leaving either part empty.
pub fn split(train: &Split, fraction: f64, rng: &mut impl Rng) -> Result<(Split, Split)> {
    if !(fraction > 0.0 && fraction <= 0.5) {
        bail!("--calibration-split must be in (0, 0.5], got {fraction}");
    }
    let n = train.len();
    let held_out = (fraction * n as f64).round() as usize;
    if held_out == 0 || held_out == n {
        bail!("--calibration-split {fraction} of {n} training images leaves a part empty");
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(rng);
    let pick = |indices: &[u32]| -> Result<Split> {
        let index = Tensor::from_slice(indices, indices.len(), train.labels.device())?;
        Ok(Split {
            images: train.images.index_select(&index, 0)?,
            labels: train.labels.index_select(&index, 0)?,
        })
    };
    Ok((pick(&order[held_out..])?, pick(&order[..held_out])?))
}

/// Mean negative log-likelihood of `softmax(logits · inverse_temperature)`.
fn mean_nll(logits: &[Vec<f64>], labels: &[u32], inverse_temperature: f64) -> f64 {
    let total: f64 = logits
        .iter()
        .zip(labels)
        .map(|(row, &y)| {
            let scaled: Vec<f64> = row.iter().map(|v| v * inverse_temperature).collect();
            -metrics::log_softmax(&scaled)[y as usize]
        })
        .sum();
    total / labels.len().max(1) as f64
}

/// The temperature minimizing the mean NLL of `softmax(logits / T)` on (logits, labels).
///
/// The NLL is convex in `1/T` (a log-sum-exp of linear functions minus a linear one), so it
/// is unimodal in `ln(1/T)` too, and a golden-section search over `ln(1/T) ∈ [−ln 100,
/// ln 100]` finds it to about 1e-8 relative (√ε: near a minimum the NLL changes only in
/// its second order, which bounds every search that compares values).
///
/// # Errors
/// No samples, a label out of range, or non-finite logits.
pub fn fit_temperature(logits: &[Vec<f64>], labels: &[u32]) -> Result<f64> {
    if logits.is_empty() || logits.len() != labels.len() {
        bail!(
            "temperature fit: {} logit rows for {} labels (expected as many, at least one)",
            logits.len(),
            labels.len()
        );
    }
    for (row, &y) in logits.iter().zip(labels) {
        if y as usize >= row.len() {
            bail!("temperature fit: label {y} for {} classes", row.len());
        }
        if row.iter().any(|v| !v.is_finite()) {
            bail!("temperature fit: the logits hold a non-finite value");
        }
    }
    let nll = |log_inverse: f64| mean_nll(logits, labels, log_inverse.exp());
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    let (mut lo, mut hi) = LOG_INVERSE_RANGE;
    let mut left = hi - ratio * (hi - lo);
    let mut right = lo + ratio * (hi - lo);
    let (mut f_left, mut f_right) = (nll(left), nll(right));
    while hi - lo > 1e-10 {
        if f_left <= f_right {
            hi = right;
            right = left;
            f_right = f_left;
            left = hi - ratio * (hi - lo);
            f_left = nll(left);
        } else {
            lo = left;
            left = right;
            f_left = f_right;
            right = lo + ratio * (hi - lo);
            f_right = nll(right);
        }
    }
    let log_inverse = 0.5 * (lo + hi);
    let temperature = 1.0 / log_inverse.exp();
    if at_range_end(log_inverse) {
        eprintln!(
            "note: the fitted temperature {temperature:.4} is at an end of its search range \
             (0.01 to 100): the held-out NLL still falls beyond it (every held-out image \
             classified with a wide margin, or logits that rank the labels last)"
        );
    }
    Ok(temperature)
}

/// Whether a fitted `ln(1/T)` lies at an end of [`LOG_INVERSE_RANGE`] (the search stops
/// within 1e-10 of it).
fn at_range_end(log_inverse: f64) -> bool {
    let (lo, hi) = LOG_INVERSE_RANGE;
    log_inverse - lo < 1e-6 || hi - log_inverse < 1e-6
}

/// Fits the temperature of `model` on the calibration split (logits computed on `device`).
///
/// # Errors
/// As [`fit_temperature`], and Candle errors running the model.
pub fn fit(model: &dyn Scorer, calibration: &Split, device: &Device) -> Result<f64> {
    let logits = ood::logits(model, &calibration.images, device)?;
    let labels = calibration.labels.to_vec1::<u32>()?;
    fit_temperature(&logits, &labels)
}

/// The temperature a checkpoint records (1 when it records none).
///
/// # Errors
/// A recorded value that is not a finite positive number.
pub fn recorded(metadata: &BTreeMap<String, String>) -> Result<f64> {
    let Some(text) = metadata.get(METADATA_KEY) else {
        return Ok(1.0);
    };
    let temperature: f64 = text.parse().with_context(|| {
        format!("checkpoint metadata `{METADATA_KEY}` is {text:?}, not a number")
    })?;
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("checkpoint metadata `{METADATA_KEY}` must be finite and > 0, got {text}");
    }
    Ok(temperature)
}

/// A model whose logits are divided by a temperature (scores other than the logits pass
/// through unchanged).
pub struct Calibrated<'a, M: ?Sized> {
    pub model: &'a M,
    pub temperature: f64,
}

impl<M: Classifier + ?Sized> Classifier for Calibrated<'_, M> {
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.model.logits(x)? / self.temperature
    }
}

impl<M: Scorer + ?Sized> Scorer for Calibrated<'_, M> {
    fn scores(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (logits, own) = self.model.scores(x)?;
        Ok(((logits / self.temperature)?, own))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Labels drawn from `softmax(z / T₀)` for random logits z: the maximum-likelihood
    /// temperature tends to T₀ (here 2.5 and 0.4, 40,000 samples: a few percent).
    #[test]
    fn recovers_the_temperature_labels_were_drawn_with() {
        let mut rng = StdRng::seed_from_u64(7);
        for true_temperature in [2.5, 0.4] {
            let mut logits = Vec::new();
            let mut labels = Vec::new();
            for _ in 0..40_000 {
                let row: Vec<f64> = (0..5).map(|_| rng.random_range(-4.0..4.0)).collect();
                let scaled: Vec<f64> = row.iter().map(|v| v / true_temperature).collect();
                let probabilities: Vec<f64> = metrics::log_softmax(&scaled)
                    .iter()
                    .map(|l| l.exp())
                    .collect();
                let mut u: f64 = rng.random();
                let mut label = probabilities.len() - 1;
                for (k, p) in probabilities.iter().enumerate() {
                    if u < *p {
                        label = k;
                        break;
                    }
                    u -= p;
                }
                logits.push(row);
                labels.push(label as u32);
            }
            let fitted = fit_temperature(&logits, &labels).unwrap();
            assert!(
                (fitted / true_temperature - 1.0).abs() < 0.05,
                "fitted {fitted}, drawn with {true_temperature}"
            );
            // The fitted T is a minimum: 1% either side is no better.
            let at = |t: f64| mean_nll(&logits, &labels, 1.0 / t);
            assert!(at(fitted) <= at(fitted * 1.01) && at(fitted) <= at(fitted / 1.01));
        }
    }

    /// Two classes, logits (0, 1) for every sample, label 1 in a fraction q of them: the NLL
    /// `−q·ln σ(β) − (1−q)·ln σ(−β)` is minimal at `β = ln(q/(1−q))` (closed form).
    #[test]
    fn matches_the_two_class_closed_form() {
        let q: f64 = 0.8;
        let logits = vec![vec![0.0, 1.0]; 10];
        let labels: Vec<u32> = (0..10).map(|k| u32::from(k < 8)).collect();
        let fitted = fit_temperature(&logits, &labels).unwrap();
        let expected = 1.0 / (q / (1.0 - q)).ln();
        assert!(
            (fitted / expected - 1.0).abs() < 1e-6,
            "{fitted} vs {expected}"
        );
    }

    /// Held-out logits that classify every image with a margin: the NLL falls as T → 0, and
    /// the fit stops at the end of its range (T = 0.01), which it says; an interior fit does
    /// not count as one.
    #[test]
    fn a_fit_at_an_end_of_the_range_is_recognised() {
        let logits = vec![vec![0.0, 1.0]; 10];
        let fitted = fit_temperature(&logits, &[1; 10]).unwrap();
        assert!((fitted / 0.01 - 1.0).abs() < 1e-6, "{fitted}");
        assert!(at_range_end((1.0 / fitted).ln()));
        let labels: Vec<u32> = (0..10).map(|k| u32::from(k < 8)).collect();
        let interior = fit_temperature(&logits, &labels).unwrap();
        assert!(!at_range_end((1.0 / interior).ln()));
        // Labels always ranked last: the NLL falls as T → ∞ (the other end, T = 100).
        let fitted = fit_temperature(&logits, &[0; 10]).unwrap();
        assert!((fitted / 100.0 - 1.0).abs() < 1e-6, "{fitted}");
        assert!(at_range_end((1.0 / fitted).ln()));
    }

    #[test]
    fn bad_input_and_metadata_are_errors() {
        assert!(fit_temperature(&[], &[]).is_err());
        assert!(fit_temperature(&[vec![0.0, 1.0]], &[2]).is_err());
        assert!(fit_temperature(&[vec![0.0, f64::NAN]], &[0]).is_err());
        let mut meta = BTreeMap::new();
        assert_eq!(recorded(&meta).unwrap(), 1.0);
        meta.insert(METADATA_KEY.to_string(), "1.25".to_string());
        assert_eq!(recorded(&meta).unwrap(), 1.25);
        for bad in ["0", "-2", "nan", "inf", "warm"] {
            meta.insert(METADATA_KEY.to_string(), bad.to_string());
            assert!(recorded(&meta).is_err(), "{bad}");
        }
    }

    #[test]
    fn split_holds_out_the_fraction_and_keeps_every_image_once() {
        let n = 50;
        let train = Split {
            images: Tensor::arange(0f32, n as f32, &Device::Cpu)
                .unwrap()
                .reshape((n, 1))
                .unwrap(),
            labels: Tensor::arange(0u32, n as u32, &Device::Cpu).unwrap(),
        };
        let mut rng = StdRng::seed_from_u64(1);
        let (fit_part, calibration) = split(&train, 0.2, &mut rng).unwrap();
        assert_eq!((fit_part.len(), calibration.len()), (40, 10));
        let mut all = fit_part.labels.to_vec1::<u32>().unwrap();
        all.extend(calibration.labels.to_vec1::<u32>().unwrap());
        let images: Vec<f32> = fit_part.images.flatten_all().unwrap().to_vec1().unwrap();
        // Images travel with their labels.
        assert!(images
            .iter()
            .zip(fit_part.labels.to_vec1::<u32>().unwrap())
            .all(|(x, y)| *x == y as f32));
        all.sort_unstable();
        assert_eq!(all, (0..n as u32).collect::<Vec<_>>());
        for bad in [0.0, -0.1, 0.6, f64::NAN] {
            assert!(split(&train, bad, &mut rng).is_err(), "{bad}");
        }
    }
}
