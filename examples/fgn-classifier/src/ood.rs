//! Out-of-distribution evaluation: in-distribution accuracy, NLL and ECE, and per OOD set
//! the AUROC and FPR at 95% TPR of three scores (higher = more in-distribution):
//! - `max_softmax`: the largest softmax probability;
//! - `entropy`: minus the softmax entropy;
//! - `fgn`: the largest gated Gaussian activation of the last layer (FGN networks only).
//!
//! OOD sets: the test split of another IDX directory, or generated from the in-distribution
//! test images: `noise` (uniform pixels), `shuffled` (each image's pixels permuted),
//! `inverted` (1 − x). Generated sets use a fixed seed, so evaluations are reproducible.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use gauss_layer::GaussNet;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::cnn::{CnnClassical, CnnFgn};
use crate::data::Split;
use crate::evaluate::Classifier;
use crate::metrics;
use crate::train::Mlp;

/// Seed of the generated sets.
const OOD_SEED: u64 = 20_261_204;
/// Inference batch size (memory only: results do not depend on it).
const BATCH: usize = 1000;
/// Bins of the expected calibration error.
pub const ECE_BINS: usize = 15;
/// The true-positive rate of the reported FPR.
const TPR: f64 = 0.95;

/// A model that gives logits and, for an FGN, its own score.
pub trait Scorer {
    /// Logits (B, C) and, for an FGN, the largest gated Gaussian activation of the last
    /// layer (B).
    fn scores(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)>;
}

fn fgn_scores(net: &GaussNet, features: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    // Inputs come as f32; an f64 network (`import` writes f64 checkpoints) runs in f64, as
    // `evaluate`'s `Classifier` runs it.
    let features = match net.dtype() {
        Some(dtype) if dtype != features.dtype() => features.to_dtype(dtype)?,
        _ => features.clone(),
    };
    let (logits, gaussians) = net.forward_with_gaussians(&features, false)?;
    let Some(last) = gaussians.last() else {
        bail!("the network has no layers");
    };
    Ok((logits, Some(last.max(D::Minus1)?)))
}

impl Scorer for GaussNet {
    fn scores(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        fgn_scores(self, x)
    }
}

impl Scorer for CnnFgn {
    fn scores(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        fgn_scores(&self.net, &self.trunk.forward(x)?)
    }
}

impl Scorer for Mlp {
    fn scores(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        Ok((self.logits(x)?, None))
    }
}

impl Scorer for CnnClassical {
    fn scores(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        Ok((self.logits(x)?, None))
    }
}

/// What an OOD set's images must match: the in-distribution images' pixel count (the MLP
/// reads an image as a vector) or their height and width (the CNN's trunk reads them as
/// such).
#[derive(Clone, Copy, Debug)]
pub enum InDistribution {
    Pixels(usize),
    Size(usize, usize),
}

impl std::fmt::Display for InDistribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Pixels(pixels) => write!(f, "have {pixels} pixels"),
            Self::Size(h, w) => write!(f, "are {h}×{w}"),
        }
    }
}

/// [`OodSource::check`] of every set in `sets`.
pub fn check(sets: &[OodSource], expected: InDistribution) -> Result<()> {
    sets.iter().try_for_each(|set| set.check(expected))
}

/// An OOD set as named on the command line.
#[derive(Clone, Debug)]
pub enum OodSource {
    /// The test split of an IDX directory.
    Dir(PathBuf),
    Noise,
    Shuffled,
    Inverted,
}

impl OodSource {
    /// `noise`, `shuffled`, `inverted`, or a directory of IDX files.
    pub fn parse(arg: &str) -> Result<Self, String> {
        Ok(match arg {
            "noise" => Self::Noise,
            "shuffled" => Self::Shuffled,
            "inverted" => Self::Inverted,
            dir => {
                let path = PathBuf::from(dir);
                if !path.is_dir() {
                    return Err(format!(
                        "`{dir}` is neither noise, shuffled, inverted nor a directory of IDX files"
                    ));
                }
                Self::Dir(path)
            }
        })
    }

    pub fn name(&self) -> String {
        match self {
            Self::Dir(p) => p.display().to_string(),
            Self::Noise => "noise".into(),
            Self::Shuffled => "shuffled".into(),
            Self::Inverted => "inverted".into(),
        }
    }

    /// Checks, before any work, that this set can be scored beside `expected`: a directory
    /// holds an IDX test split (both `t10k` files, headers valid) of images of the
    /// in-distribution size, read from the IDX headers alone. Generated sets always can.
    pub fn check(&self, expected: InDistribution) -> Result<()> {
        let Self::Dir(dir) = self else {
            return Ok(());
        };
        let (height, width) = crate::idx::test_image_size(dir).context("--ood")?;
        let fits = match expected {
            InDistribution::Pixels(pixels) => height * width == pixels,
            InDistribution::Size(h, w) => (height, width) == (h, w),
        };
        if !fits {
            bail!(
                "--ood {}: its test images are {height}×{width} ({} pixels), the in-distribution images {expected}; an OOD set must have their size (or use noise, shuffled, inverted)",
                dir.display(),
                height * width
            );
        }
        Ok(())
    }

    /// The OOD images (N, D) as f32 in [0, 1] on the host.
    pub fn images(&self, test: &Split) -> Result<Tensor> {
        let (n, d) = (test.len(), test.features());
        let mut rng = StdRng::seed_from_u64(OOD_SEED);
        Ok(match self {
            Self::Dir(dir) => {
                let (split, _, _) = crate::idx::test_split(dir)?;
                if split.features() != d {
                    bail!(
                        "{}: images have {} pixels, the in-distribution ones {d}",
                        dir.display(),
                        split.features()
                    );
                }
                split.images
            }
            Self::Noise => {
                let values: Vec<f32> = (0..n * d).map(|_| rng.random::<f32>()).collect();
                Tensor::from_vec(values, (n, d), &Device::Cpu)?
            }
            Self::Shuffled => {
                let mut pixels = test.images.flatten_all()?.to_vec1::<f32>()?;
                for image in pixels.chunks_mut(d) {
                    image.shuffle(&mut rng);
                }
                Tensor::from_vec(pixels, (n, d), &Device::Cpu)?
            }
            Self::Inverted => test.images.affine(-1.0, 1.0)?,
        })
    }
}

/// Per-image host values of a model on a set.
struct Outputs {
    /// Logits as f64 rows.
    logits: Vec<Vec<f64>>,
    fgn: Option<Vec<f64>>,
}

/// The logits of `images` (host f64 rows), computed on `device` in batches.
pub fn logits(model: &dyn Scorer, images: &Tensor, device: &Device) -> Result<Vec<Vec<f64>>> {
    Ok(run(model, images, device)?.logits)
}

fn run(model: &dyn Scorer, images: &Tensor, device: &Device) -> Result<Outputs> {
    let n = images.dim(0)?;
    let mut logits = Vec::with_capacity(n);
    let mut fgn: Option<Vec<f64>> = None;
    let mut start = 0;
    while start < n {
        let len = BATCH.min(n - start);
        let x = images.narrow(0, start, len)?.to_device(device)?;
        let (l, s) = model.scores(&x)?;
        // Host-only work: to the CPU first, then f64.
        let l = l.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        logits.extend(l.to_vec2::<f64>()?);
        if let Some(s) = s {
            let s = s.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
            fgn.get_or_insert_with(Vec::new).extend(s.to_vec1::<f64>()?);
        }
        start += len;
    }
    Ok(Outputs { logits, fgn })
}

/// The scores of every image: (name, values), `fgn` only for FGN networks.
fn scores(outputs: &Outputs) -> Vec<(&'static str, Vec<f64>)> {
    let max_softmax = outputs
        .logits
        .iter()
        .map(|row| metrics::max_softmax(row))
        .collect();
    let entropy = outputs
        .logits
        .iter()
        .map(|row| -metrics::softmax_entropy(row))
        .collect();
    let mut out = vec![("max_softmax", max_softmax), ("entropy", entropy)];
    if let Some(fgn) = &outputs.fgn {
        out.push(("fgn", fgn.clone()));
    }
    out
}

fn round(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// In-distribution accuracy, NLL, ECE and each OOD set's AUROC and FPR at 95% TPR.
/// Progress lines go to stderr under `label`.
pub fn report(
    model: &dyn Scorer,
    test: &Split,
    sets: &[OodSource],
    device: &Device,
    label: &str,
) -> Result<Value> {
    let labels = test.labels.to_vec1::<u32>()?;
    let inside = run(model, &test.images, device)?;
    let classes = inside.logits.first().map_or(0, Vec::len);
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
        bail!("label {bad} is out of range for a model with {classes} classes");
    }
    let mut correct = Vec::with_capacity(labels.len());
    let mut confidence = Vec::with_capacity(labels.len());
    let mut nll = 0.0;
    for (row, &y) in inside.logits.iter().zip(&labels) {
        let lp = metrics::log_softmax(row);
        // The first largest, as `numpy.argmax` and Candle's `argmax` (`evaluate`) take it.
        let best = metrics::argmax(&lp).unwrap_or(0);
        correct.push(best == y as usize);
        confidence.push(lp.get(best).map_or(f64::NAN, |l| l.exp()));
        nll -= lp[y as usize];
    }
    let n = labels.len().max(1) as f64;
    let accuracy = correct.iter().filter(|&&c| c).count() as f64 / n;
    let ece = metrics::ece(&confidence, &correct, ECE_BINS);
    eprintln!(
        "{label}: accuracy {accuracy:.4}, NLL {:.4}, ECE {ece:.4}",
        nll / n
    );
    let in_scores = scores(&inside);
    let mut ood = Map::new();
    for set in sets {
        let outside = run(model, &set.images(test)?, device)?;
        let out_scores = scores(&outside);
        let mut entry = Map::new();
        entry.insert("n".into(), json!(outside.logits.len()));
        let mut line = format!("{label} vs {}:", set.name());
        for ((name, pos), (_, neg)) in in_scores.iter().zip(&out_scores) {
            let auroc = metrics::auroc(pos, neg);
            let fpr = metrics::fpr_at_tpr(pos, neg, TPR);
            line.push_str(&format!(" {name} AUROC {auroc:.4} FPR95 {fpr:.4};"));
            entry.insert(
                name.to_string(),
                json!({"auroc": round(auroc), "fpr_at_95_tpr": round(fpr)}),
            );
        }
        eprintln!("{line}");
        ood.insert(set.name(), Value::Object(entry));
    }
    Ok(json!({
        "accuracy": round(accuracy),
        "nll": round(nll / n),
        "ece_15": round(ece),
        "test_total": labels.len(),
        "ood": ood,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits = the images themselves (and no FGN score).
    struct Identity;

    impl Scorer for Identity {
        fn scores(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
            Ok((x.clone(), None))
        }
    }

    impl Classifier for Identity {
        fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            Ok(x.clone())
        }
    }

    fn split(images: &[[f32; 2]], labels: &[u32]) -> Split {
        Split {
            images: Tensor::from_vec(images.concat(), (images.len(), 2), &Device::Cpu).unwrap(),
            labels: Tensor::new(labels, &Device::Cpu).unwrap(),
        }
    }

    /// A tie between the top logits predicts the first class, as `numpy.argmax` (which
    /// `tools/ood/from_predict.py` uses) and Candle's `argmax` (which `evaluate` uses) do:
    /// logits (0.5, 0.5) with label 0 and (0.2, 0.7) with label 1 are both correct. NLL:
    /// ln 2 and ln(1 + e^−0.5), closed forms.
    #[test]
    fn report_accuracy_breaks_ties_as_argmax_does() {
        let test = split(&[[0.5, 0.5], [0.2, 0.7]], &[0, 1]);
        let report = report(&Identity, &test, &[], &Device::Cpu, "ties").unwrap();
        let evaluated = crate::evaluate::evaluate(&Identity, &test, &Device::Cpu).unwrap();
        assert_eq!(evaluated.test_accuracy, 1.0);
        assert_eq!(report["accuracy"], json!(1.0));
        let nll = (2f64.ln() + (1.0 + (-0.5f64).exp()).ln()) / 2.0;
        assert!((report["nll"].as_f64().unwrap() - nll).abs() < 1e-6);
    }

    /// NaN logits give NaN scores: before, they scored as the most in-distribution image
    /// there is by the entropy (−0) and the least by max-softmax (0).
    #[test]
    fn nan_logits_give_nan_scores() {
        let outputs = Outputs {
            logits: vec![vec![f64::NAN, 0.0], vec![0.0, 0.0]],
            fgn: None,
        };
        for (name, values) in scores(&outputs) {
            assert!(values[0].is_nan(), "{name}: {}", values[0]);
            assert!(values[1].is_finite(), "{name}: {}", values[1]);
        }
    }

    /// An f64 network (`import` writes f64 checkpoints) scored on f32 images, as `eval --ood`
    /// does: the images run in the network's dtype, as `evaluate` runs them.
    #[test]
    fn report_runs_an_f64_network_on_f32_images() {
        use candle_nn::{VarBuilder, VarMap};
        let varmap = VarMap::new();
        let config = gauss_layer::GaussNetConfig {
            in_features: 2,
            hidden: vec![3],
            out_features: 2,
            ..Default::default()
        };
        let net = GaussNet::new(
            config,
            VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu),
        )
        .unwrap();
        let test = split(&[[0.1, 0.9], [0.8, 0.3], [0.5, 0.5]], &[0, 1, 1]);
        let report = report(&net, &test, &[OodSource::Inverted], &Device::Cpu, "f64")
            .unwrap_or_else(|e| panic!("{e:#}"));
        let evaluated = crate::evaluate::evaluate(&net, &test, &Device::Cpu).unwrap();
        assert_eq!(report["accuracy"], json!(round(evaluated.test_accuracy)));
        assert!(report["ood"]["inverted"]["fgn"]["auroc"].is_number());
    }

    /// `--ood` directories are checked from the IDX headers alone: the `t10k` files there,
    /// valid, with as many labels as images, of the in-distribution size (the pixel count for
    /// the MLP, height and width for the CNN); generated sets always pass.
    #[test]
    fn directories_are_checked_by_their_headers() {
        let dir = crate::idx::tests::write_set("ood-check", 3, 2, false);
        let set = OodSource::Dir(dir.clone());
        let ok = [InDistribution::Pixels(12), InDistribution::Size(4, 3)];
        let results: Vec<_> = ok.iter().map(|&e| set.check(e)).collect();
        let wrong = [
            InDistribution::Pixels(64),
            InDistribution::Size(3, 4),
            InDistribution::Size(2, 6),
        ]
        .map(|e| format!("{:#}", set.check(e).unwrap_err()));
        // A plain file shorter than its header promises, then a missing label file.
        let images = dir.join("t10k-images-idx3-ubyte");
        let bytes = std::fs::read(&images).unwrap();
        std::fs::write(&images, &bytes[..bytes.len() - 1]).unwrap();
        let short = format!("{:#}", set.check(InDistribution::Pixels(12)).unwrap_err());
        std::fs::write(&images, &bytes).unwrap();
        std::fs::remove_file(dir.join("t10k-labels-idx1-ubyte")).unwrap();
        let no_labels = format!(
            "{:#}",
            check(&[set], InDistribution::Pixels(12)).unwrap_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
        for result in results {
            result.unwrap();
        }
        assert!(
            wrong[0].starts_with("--ood ") && wrong[0].contains("4×3 (12 pixels)"),
            "{}",
            wrong[0]
        );
        assert!(wrong[0].contains("have 64 pixels"), "{}", wrong[0]);
        assert!(wrong[1].contains("are 3×4"), "{}", wrong[1]);
        assert!(wrong[2].contains("are 2×6"), "{}", wrong[2]);
        assert!(short.contains("need 36 bytes"), "{short}");
        assert!(
            no_labels.starts_with("--ood") && no_labels.contains("t10k-labels-idx1-ubyte"),
            "{no_labels}"
        );
        // Gzip files: the header is read through the decoder.
        let gz = crate::idx::tests::write_set("ood-check-gz", 3, 2, true);
        let gz_result = OodSource::Dir(gz.clone()).check(InDistribution::Size(4, 3));
        // A cut-short `.gz` (its header intact) is refused up front too, by decompressing it.
        let images_gz = gz.join("t10k-images-idx3-ubyte.gz");
        let whole = std::fs::read(&images_gz).unwrap();
        std::fs::write(&images_gz, &whole[..whole.len() - 12]).unwrap();
        let cut_gz = OodSource::Dir(gz.clone()).check(InDistribution::Size(4, 3));
        let header_only = crate::idx::tests::gzip(&crate::idx::tests::idx_bytes(
            crate::idx::IMAGES_MAGIC,
            &[3, 4, 3],
            &[0; 35],
        ));
        std::fs::write(&images_gz, header_only).unwrap();
        let short_gz = OodSource::Dir(gz.clone()).check(InDistribution::Size(4, 3));
        std::fs::remove_dir_all(&gz).unwrap();
        gz_result.unwrap();
        let cut_gz = format!("{:#}", cut_gz.unwrap_err());
        assert!(cut_gz.contains("t10k-images-idx3-ubyte.gz"), "{cut_gz}");
        let short_gz = format!("{:#}", short_gz.unwrap_err());
        assert!(short_gz.contains("need 36 bytes"), "{short_gz}");
        for generated in [OodSource::Noise, OodSource::Shuffled, OodSource::Inverted] {
            generated.check(InDistribution::Size(1, 1)).unwrap();
        }
    }

    #[test]
    fn generated_sets_keep_shape_and_pixels_in_range() {
        let images = Tensor::new(
            &[[0f32, 0.25, 0.5, 1.0], [0.1, 0.2, 0.3, 0.4]],
            &Device::Cpu,
        )
        .unwrap();
        let test = Split {
            images,
            labels: Tensor::new(&[0u32, 1], &Device::Cpu).unwrap(),
        };
        let inverted = OodSource::Inverted.images(&test).unwrap();
        assert_eq!(
            inverted.to_vec2::<f32>().unwrap()[0],
            vec![1.0, 0.75, 0.5, 0.0]
        );
        let shuffled = OodSource::Shuffled
            .images(&test)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut row = shuffled[1].clone();
        row.sort_by(f32::total_cmp);
        assert_eq!(row, vec![0.1, 0.2, 0.3, 0.4]);
        let noise = OodSource::Noise.images(&test).unwrap();
        assert_eq!(noise.dims(), [2, 4]);
        assert!(noise
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| (0.0..1.0).contains(v)));
        assert!(OodSource::parse("/definitely/not/here").is_err());
    }
}
