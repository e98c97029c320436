//! Data sets: the bundled 8×8 digits, MNIST IDX files, and user safetensors files.
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

/// A safetensors file with `images` (N, D) and `labels` (N). Integer images are divided by
/// `input_scale`; float images are taken as already normalized to [0, 1].
pub fn eval_file(path: &Path, input_scale: f64) -> Result<Split> {
    let origin = path.display().to_string();
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{origin}: not a readable safetensors file"))?;
    let x = tensors
        .get("images")
        .with_context(|| format!("{origin}: tensor `images` is missing"))?;
    let scale = if x.dtype().is_float() {
        1.0
    } else {
        input_scale
    };
    split_from(&tensors, "images", "labels", scale, &origin)
}

fn read_idx(path: &Path, magic: u32, rank: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        bail!("{}: too short for an IDX file", path.display());
    }
    let word = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if word(0) != magic {
        bail!(
            "{}: IDX magic number is {:#x}, expected {magic:#x}",
            path.display(),
            word(0)
        );
    }
    let dims: Vec<usize> = (0..rank).map(|i| word(4 + 4 * i) as usize).collect();
    let count: usize = dims.iter().product();
    if bytes.len() != header + count {
        bail!(
            "{}: IDX dims {dims:?} need {} bytes, file has {}",
            path.display(),
            header + count,
            bytes.len()
        );
    }
    Ok((dims, bytes[header..].to_vec()))
}

fn find(dir: &Path, stem: &str) -> Result<std::path::PathBuf> {
    for name in [stem.to_string(), stem.replace("-idx", ".idx")] {
        let path = dir.join(&name);
        if path.exists() {
            return Ok(path);
        }
    }
    bail!(
        "{}: MNIST file `{stem}` not found (expected train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, uncompressed)",
        dir.display()
    )
}

fn mnist_split(dir: &Path, prefix: &str) -> Result<Split> {
    let (idims, pixels) = read_idx(
        &find(dir, &format!("{prefix}-images-idx3-ubyte"))?,
        0x803,
        3,
    )?;
    let (ldims, labels) = read_idx(
        &find(dir, &format!("{prefix}-labels-idx1-ubyte"))?,
        0x801,
        1,
    )?;
    if idims[0] != ldims[0] {
        bail!(
            "{}: {prefix} has {} images but {} labels",
            dir.display(),
            idims[0],
            ldims[0]
        );
    }
    if let Some(bad) = labels.iter().find(|&&l| l > 9) {
        bail!("{}: {prefix} label {bad} is not a digit", dir.display());
    }
    let n = idims[0];
    let images = Tensor::from_vec(pixels, (n, idims[1] * idims[2]), &Device::Cpu)?;
    let labels = Tensor::from_vec(labels, n, &Device::Cpu)?;
    Ok(Split {
        images: normalize(&images, MNIST_SCALE)?,
        labels: labels.to_dtype(DType::U32)?,
    })
}

/// MNIST from its four IDX files in `dir`.
pub fn mnist(dir: &Path) -> Result<DataSet> {
    Ok(DataSet {
        name: "mnist",
        input_scale: MNIST_SCALE,
        classes: 10,
        train: mnist_split(dir, "train")?,
        test: mnist_split(dir, "t10k")?,
    })
}
