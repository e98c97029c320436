//! Data sets: the bundled 8×8 digits, MNIST IDX files (read by [`crate::idx`]), and user
//! safetensors files.
//!
//! Images are kept as f32 pixels in [0, 1] (raw values divided by the data set's `input_scale`)
//! on the host; labels as u32.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// The bundled digits (UCI optdigits via scikit-learn, CC BY 4.0): 1437 train / 360 test
/// images of 8×8 pixels in 0..=16.
static DIGITS: &[u8] = include_bytes!("../../../data/digits.safetensors");

/// Pixel scale of the digits (values 0..=16).
pub const DIGITS_SCALE: f64 = 16.0;
/// Pixels of a bundled digit (8×8).
pub const DIGITS_FEATURES: usize = 64;
/// Pixel scale of MNIST (values 0..=255).
pub const MNIST_SCALE: f64 = 255.0;

/// Images (N, D) as f32 in [0, 1] and labels (N) as u32.
#[derive(Clone, Debug)]
pub struct Split {
    /// (N, D) f32.
    pub images: Tensor,
    /// (N) u32.
    pub labels: Tensor,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.dims()[0]
    }

    pub fn features(&self) -> usize {
        self.images.dims()[1]
    }
}

/// A train/test pair with its name and pixel scale.
pub struct DataSet {
    pub name: &'static str,
    pub input_scale: f64,
    pub classes: usize,
    pub train: Split,
    pub test: Split,
}

fn normalize(images: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((images.to_dtype(DType::F32)? / scale)?)
}

fn split_from(
    tensors: &HashMap<String, Tensor>,
    images: &str,
    labels: &str,
    scale: f64,
    origin: &str,
) -> Result<Split> {
    let x = tensors
        .get(images)
        .with_context(|| format!("{origin}: tensor `{images}` is missing"))?;
    let y = tensors
        .get(labels)
        .with_context(|| format!("{origin}: tensor `{labels}` is missing"))?;
    check_pair(x, y, images, labels, origin)?;
    Ok(Split {
        images: normalize(x, scale)?,
        labels: y.to_dtype(DType::U32)?,
    })
}

fn check_pair(x: &Tensor, y: &Tensor, images: &str, labels: &str, origin: &str) -> Result<()> {
    let [n, _] = x.dims() else {
        bail!(
            "{origin}: `{images}` must be (N, features), got shape {:?}",
            x.dims()
        )
    };
    if y.dims() != [*n] {
        bail!(
            "{origin}: `{labels}` must be ({n}) to match `{images}`, got shape {:?}",
            y.dims()
        )
    }
    Ok(())
}

/// The bundled digits.
pub fn digits() -> Result<DataSet> {
    let tensors = candle_core::safetensors::load_buffer(DIGITS, &Device::Cpu)
        .context("bundled digits: cannot read")?;
    Ok(DataSet {
        name: "digits",
        input_scale: DIGITS_SCALE,
        classes: 10,
        train: split_from(
            &tensors,
            "train_images",
            "train_labels",
            DIGITS_SCALE,
            "digits",
        )?,
        test: split_from(
            &tensors,
            "test_images",
            "test_labels",
            DIGITS_SCALE,
            "digits",
        )?,
    })
}

/// How the pixels of a user's data file are scaled to the [0, 1] the network was trained on.
#[derive(Clone, Copy, Debug)]
pub struct InputScale {
    /// The scale the checkpoint records (its training pixels were divided by it).
    pub recorded: f64,
    /// The scale the user declared with `--input-scale` (`None`: not declared).
    pub declared: Option<f64>,
    /// The network was trained on pixels in [0, 1] (a checkpoint `train` wrote: it records
    /// its data set), so scaled images outside that range are a wrong scale, not data.
    pub unit_range: bool,
}

/// A safetensors file with `images` (N, D) and integer `labels` (N), checked before use:
/// N >= 1, counts that match, finite pixels, labels in `0..classes` (a bad label is reported
/// as written, never wrapped or cast). Images are divided by the declared scale, else, for
/// integer images, by the checkpoint's recorded scale; float images without a declared scale
/// are refused (their scale cannot be guessed: sklearn's `load_digits().data` is floats in
/// 0..16, others are in [0, 1]).
pub fn eval_file(path: &Path, scale: InputScale, classes: usize) -> Result<Split> {
    let origin = path.display().to_string();
    // A FIFO, device or directory is refused before it is opened (it would block or never end).
    let bytes = gauss_layer::files::read_regular(path)?;
    let file = gauss_layer::files::DataFile::parse(&bytes, path)?;
    let shape = |name: &str| {
        file.shape(name).map_err(|_| {
            anyhow::anyhow!("{origin}: tensor `{name}` is missing (expected `images` (N, features) and `labels` (N))")
        })
    };
    let (images, labels) = (shape("images")?, shape("labels")?);
    let [n, _] = images[..] else {
        bail!("{origin}: `images` must be (N, features), got shape {images:?}")
    };
    if labels != [n] {
        bail!("{origin}: `labels` must be ({n}) to match the {n} images, got shape {labels:?}");
    }
    if n == 0 {
        bail!("{origin}: no images (N = 0); nothing to evaluate");
    }
    let divide_by = match (scale.declared, file.is_float("images")?) {
        (Some(declared), _) => declared,
        (None, false) => scale.recorded,
        (None, true) => bail!(
            "{origin}: `images` are floats, whose scale cannot be guessed; declare it: --input-scale 1 if they are already in [0, 1], or the value that maps them to [0, 1] (the checkpoint was trained on pixels divided by {}, e.g. 16 for sklearn's load_digits().data)",
            scale.recorded
        ),
    };
    if file.is_float("labels")? {
        bail!("{origin}: `labels` are floats; class labels must be integers");
    }
    let (_, label_values) = file.integers("labels")?;
    if let Some((i, bad)) = label_values
        .iter()
        .enumerate()
        .find(|(_, &l)| l < 0 || l >= classes as i128)
    {
        bail!(
            "{origin}: label {bad} at index {i} is not a class of this model (0 to {})",
            classes.saturating_sub(1)
        );
    }
    // Finite before and after the division, and in f32 (a tiny --input-scale or recorded
    // scale, or f64 pixels of 1e300, would otherwise become ∞).
    let mut pixels = file.matrix("images")?;
    pixels.divide(divide_by);
    if scale.unit_range {
        // 0..255 images on a digits checkpoint (0..16) evaluated silently to chance, and the
        // FGSM figures, which clamp to [0, 1], then beat the clean accuracy.
        let (lowest, highest) = pixels
            .values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        // A little slack for pixels scaled before they were saved.
        if lowest < -1e-6 || highest > 1.0 + 1e-6 {
            let hint = match scale.declared {
                Some(declared) => format!("--input-scale {declared} does not map them there"),
                None => "pass --input-scale with the value that maps them there".to_string(),
            };
            bail!(
                "{origin}: `images` divided by {divide_by} span {lowest} to {highest}, outside the [0, 1] this checkpoint's network was trained on (its pixels divided by {}); {hint}",
                scale.recorded
            );
        }
    }
    let images = pixels.to_tensor(DType::F32, &Device::Cpu)?;
    let labels: Vec<u32> = label_values.iter().map(|&l| l as u32).collect();
    Ok(Split {
        images,
        labels: Tensor::from_vec(labels, n, &Device::Cpu)?,
    })
}

/// MNIST from its four IDX files in `dir`, read as any IDX set ([`crate::idx::load`]: plain
/// or gzip, the same checks), then held to ten digit classes.
pub fn mnist(dir: &Path) -> Result<DataSet> {
    let set = crate::idx::load(dir)?.set;
    if set.classes > 10 {
        bail!(
            "{}: train label {} is not a digit",
            dir.display(),
            set.classes - 1
        );
    }
    Ok(DataSet {
        name: "mnist",
        classes: 10,
        ..set
    })
}

/// Only the MNIST test split in `dir` (its two `t10k` files; the train files need not be
/// there), held to the ten digit classes.
pub fn mnist_test(dir: &Path) -> Result<Split> {
    let (split, _, _) = crate::idx::test_split(dir)?;
    if let Some(bad) = split.labels.to_vec1::<u32>()?.into_iter().find(|&l| l > 9) {
        bail!("{}: test label {bad} is not a digit", dir.display());
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of raw tensors `(name, dtype, shape, little-endian bytes)`.
    fn file(name: &str, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> std::path::PathBuf {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (tensor, dtype, shape, bytes) in tensors {
            header.insert(
                tensor.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape,
                    "data_offsets": [data.len(), data.len() + bytes.len()]}),
            );
            data.extend_from_slice(bytes);
        }
        let header = serde_json::Value::Object(header).to_string();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&data);
        let path = std::env::temp_dir().join(format!(
            "fgn-eval-{name}-{}.safetensors",
            std::process::id()
        ));
        std::fs::write(&path, out).unwrap();
        path
    }

    fn f32s(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    const SCALE: InputScale = InputScale {
        recorded: 16.0,
        declared: None,
        unit_range: true,
    };

    fn error(path: &Path, scale: InputScale) -> String {
        let e = format!("{:#}", eval_file(path, scale, 10).unwrap_err());
        std::fs::remove_file(path).unwrap();
        e
    }

    #[test]
    fn labels_must_be_integers_in_range_reported_as_written() {
        let images = ("images", "U8", vec![2, 1], vec![0u8, 16]);
        let cases: [(&str, &str, Vec<u8>, &str); 4] = [
            (
                "float",
                "F32",
                f32s(&[3.7, 1.0]),
                "class labels must be integers",
            ),
            (
                "minus",
                "I32",
                [(-1i32).to_le_bytes(), 1i32.to_le_bytes()].concat(),
                "label -1 at index 0",
            ),
            (
                "wrap",
                "I64",
                [(1i64 << 32) + 3, 1]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                "label 4294967299 at index 0",
            ),
            ("ten", "U8", vec![1, 10], "label 10 at index 1"),
        ];
        for (name, dtype, bytes, needle) in cases {
            let path = file(name, &[images.clone(), ("labels", dtype, vec![2], bytes)]);
            let e = error(&path, SCALE);
            assert!(e.contains(needle), "{name}: {e}");
        }
    }

    #[test]
    fn counts_sizes_and_pixels_are_checked() {
        let path = file(
            "count",
            &[
                ("images", "U8", vec![2, 1], vec![0, 1]),
                ("labels", "U8", vec![3], vec![0, 1, 2]),
            ],
        );
        assert!(error(&path, SCALE).contains("to match the 2 images"));
        let path = file(
            "empty",
            &[
                ("images", "U8", vec![0, 4], vec![]),
                ("labels", "U8", vec![0], vec![]),
            ],
        );
        assert!(error(&path, SCALE).contains("N = 0"));
        let path = file(
            "nan",
            &[
                ("images", "F32", vec![1, 2], f32s(&[0.5, f32::NAN])),
                ("labels", "U8", vec![1], vec![3]),
            ],
        );
        let declared = InputScale {
            declared: Some(1.0),
            ..SCALE
        };
        let e = error(&path, declared);
        assert!(e.contains("NaN") && e.contains("column 1"), "{e}");
    }

    #[test]
    fn the_input_scale_is_explicit() {
        let tensors = [
            ("images", "F32", vec![1, 2], f32s(&[8.0, 16.0])),
            ("labels", "U8", vec![1], vec![3]),
        ];
        // Float images: refused without a declared scale, with a message that says how.
        let path = file("float-scale", &tensors);
        let e = error(&path, SCALE);
        assert!(e.contains("--input-scale 1") && e.contains("16"), "{e}");
        let path = file("float-declared", &tensors);
        let declared = InputScale {
            declared: Some(16.0),
            ..SCALE
        };
        let split = eval_file(&path, declared, 10).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(split.images.to_vec2::<f32>().unwrap(), vec![vec![0.5, 1.0]]);
        // Integer images: the checkpoint's recorded scale.
        let path = file(
            "int",
            &[
                ("images", "U8", vec![1, 2], vec![4, 16]),
                ("labels", "I64", vec![1], 9i64.to_le_bytes().to_vec()),
            ],
        );
        let split = eval_file(&path, SCALE, 10).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            split.images.to_vec2::<f32>().unwrap(),
            vec![vec![0.25, 1.0]]
        );
        assert_eq!(split.labels.to_vec1::<u32>().unwrap(), vec![9]);
    }

    /// Images that the scale leaves outside [0, 1] on a checkpoint `train` wrote are a wrong
    /// scale: 0..255 pixels on a digits checkpoint (recorded 16) evaluated to chance without a
    /// word. With a declared scale that maps them, or on a checkpoint of raw pixels (an
    /// imported one: no range known), they are taken.
    #[test]
    fn images_outside_the_trained_range_are_refused() {
        let tensors = [
            ("images", "U8", vec![1, 2], vec![0, 255]),
            ("labels", "U8", vec![1], vec![3]),
        ];
        let e = error(&file("range-recorded", &tensors), SCALE);
        assert!(
            e.contains("span 0 to 15.9375") && e.contains("pass --input-scale"),
            "{e}"
        );
        let path = file("range", &tensors);
        let declared = InputScale {
            declared: Some(255.0),
            ..SCALE
        };
        assert_eq!(
            eval_file(&path, declared, 10)
                .unwrap()
                .images
                .to_vec2::<f32>()
                .unwrap(),
            vec![vec![0.0, 1.0]]
        );
        let raw_pixels = InputScale {
            recorded: 1.0,
            declared: None,
            unit_range: false,
        };
        assert!(eval_file(&path, raw_pixels, 10).is_ok());
        let too_small = InputScale {
            declared: Some(100.0),
            ..SCALE
        };
        let e = error(&path, too_small);
        assert!(e.contains("--input-scale 100 does not map them"), "{e}");
    }

    #[test]
    fn mnist_reads_what_the_idx_reader_reads_gzip_included() {
        for compressed in [false, true] {
            let dir =
                crate::idx::tests::write_set(&format!("mnist-{compressed}"), 4, 3, compressed);
            let set = mnist(&dir).unwrap();
            let idx = crate::idx::load(&dir).unwrap().set;
            std::fs::remove_dir_all(&dir).unwrap();
            assert_eq!(
                (set.name, set.classes, set.input_scale),
                ("mnist", 10, MNIST_SCALE)
            );
            assert_eq!(
                set.train.images.to_vec2::<f32>().unwrap(),
                idx.train.images.to_vec2::<f32>().unwrap()
            );
            assert_eq!(
                set.test.labels.to_vec1::<u32>().unwrap(),
                idx.test.labels.to_vec1::<u32>().unwrap()
            );
        }
        let dir = crate::idx::tests::write_set("mnist-letters", 12, 12, true);
        let e = format!("{:#}", mnist(&dir).err().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("train label 11 is not a digit"), "{e}");
    }
}
