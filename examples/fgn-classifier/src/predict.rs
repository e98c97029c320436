//! `predict`: runs a checkpoint on the tensor `x` (N, D) of a safetensors file and writes the
//! network's `output` (N, out) and the Gaussian activations `g{i}` (N, Z_i) of every layer
//! (gated, in layer order), in the dtype the network ran in.
//!
//! `x` is divided by a scale, decided as `eval --data` decides it for its images:
//! `--input-scale S` when given; else, for integer `x`, the `input_scale` the checkpoint
//! records (`train` divided its pixels by it: 16 for the digits, 255 for IDX sets; `import`
//! and `convert` record 1, a checkpoint without it counts as 1). Float `x` is taken as given
//! by a checkpoint of scale 1 and refused without `--input-scale` by any other: its scale
//! cannot be guessed (raw pixels in 0..16, or already in [0, 1]?).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use gauss_layer::files;
use serde_json::{json, Value};

use crate::data::InputScale;
use crate::interop::DTypeArg;
use crate::DeviceArg;

#[derive(clap::Args)]
pub struct PredictArgs {
    /// A checkpoint written by train, import or convert.
    checkpoint: PathBuf,
    /// A safetensors file holding `x` (N, D). Integer `x` is divided by the checkpoint's
    /// recorded `input_scale` (16 for train's digits, 255 for its IDX sets, 1 for import and
    /// convert). Float `x` is used as given by a checkpoint of scale 1; for a trained one it
    /// needs --input-scale (as eval --data's float images do).
    #[arg(long)]
    input: PathBuf,
    /// Divide `x` by this instead (1: `x` is already in [0, 1], as the network's training
    /// pixels were after their division).
    #[arg(long)]
    input_scale: Option<f64>,
    /// Where to write `output` and `g0`, `g1`, … (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// Dtype to run in (default: the checkpoint's).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Average each image's outputs and `g{i}` with its left–right mirror's, whether or not
    /// the checkpoint records test-time mirroring (CNN checkpoints only).
    #[arg(long)]
    test_time_mirror: bool,
}

/// Reads `x` from a safetensors file (a regular file: a FIFO or device is refused before it
/// is opened), checked: rank 2 with `features` columns, numbers that are finite before *and*
/// after the division by `input_scale` and the conversion to `dtype` (1e300 into f32 is
/// refused, not turned into ∞); converted on the host.
fn read_input(
    path: &Path,
    features: usize,
    scale: InputScale,
    dtype: DType,
) -> Result<(Tensor, f64)> {
    let bytes = files::read_regular(path)?;
    let file = files::DataFile::parse(&bytes, path)?;
    let shape = file.shape("x").with_context(|| {
        format!(
            "{}: predict reads the inputs from a tensor `x` (N, D)",
            path.display()
        )
    })?;
    if shape.len() != 2 || shape[1] != features {
        bail!(
            "{}: `x` has shape {shape:?}, the network expects (N, {features})",
            path.display()
        );
    }
    let input_scale = divisor(scale, file.is_float("x")?, path)?;
    let mut x = file.matrix("x")?;
    x.divide(input_scale);
    Ok((x.to_tensor(dtype, &candle_core::Device::Cpu)?, input_scale))
}

/// What `x` is divided by (see the module docs): the declared scale, else the recorded one
/// for integer `x` and for float `x` when it is 1; float `x` of a checkpoint trained on
/// scaled pixels is refused, with the two likely fixes.
pub fn divisor(scale: InputScale, is_float: bool, path: &Path) -> Result<f64> {
    match (scale.declared, is_float) {
        (Some(declared), _) => Ok(declared),
        (None, false) => Ok(scale.recorded),
        (None, true) if scale.recorded == 1.0 => Ok(1.0),
        (None, true) => bail!(
            "{}: `x` holds floats, whose scale cannot be guessed, and the checkpoint was trained on pixels divided by {}: pass --input-scale 1 if `x` is already in [0, 1], or --input-scale {} if it holds raw pixels (integer `x` is divided by {} without it)",
            path.display(),
            scale.recorded,
            scale.recorded,
            scale.recorded
        ),
    }
}

/// `fgn-classifier predict`.
pub fn predict(args: PredictArgs) -> Result<Value> {
    crate::interop::check_out_dir("--output", &args.output, &[&args.checkpoint, &args.input])?;
    if let Some(scale) = args.input_scale {
        crate::validate::finite_positive("--input-scale", scale)?;
    }
    let device = crate::device(args.device)?;
    if crate::cnn::is_cnn_checkpoint(&args.checkpoint)? {
        let (tensors, mut summary) = crate::cnn_cli::predict(
            &args.checkpoint,
            &args.input,
            &device,
            args.dtype.map(DType::from),
            args.input_scale,
            args.test_time_mirror,
        )?;
        let mut named: Vec<(&str, &Tensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        named.sort_by_key(|(n, _)| *n);
        files::save_tensors(&args.output, &named)
            .with_context(|| format!("cannot write {}", args.output.display()))?;
        summary["output"] = json!(args.output.display().to_string());
        return Ok(summary);
    }
    if args.test_time_mirror {
        bail!("--test-time-mirror applies to CNN checkpoints; this one is an MLP");
    }
    let loaded =
        crate::validate::load_checkpoint(&args.checkpoint, &device, args.dtype.map(DType::from))?;
    crate::validate::note_converted_dtype(&loaded, &device);
    let net = &loaded.net;
    let scale = InputScale {
        recorded: crate::validate::recorded_input_scale(&loaded.user_metadata, 1.0)?,
        declared: args.input_scale,
        // predict computes for any input; eval holds data to the trained range.
        unit_range: false,
    };
    let dtype = net
        .layers()
        .first()
        .map(|l| l.center().dtype())
        .context("the checkpoint's network has no layers")?;
    let features = net.config().in_features;
    let (x, input_scale) = read_input(&args.input, features, scale, dtype)?;
    let x = x.to_device(&device)?;
    let temperature = crate::calibration::recorded(&loaded.user_metadata)?;
    let (logits, gaussians) = net.forward_with_gaussians(&x, false)?;
    let output = (logits / temperature)?;
    let host = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_device(&candle_core::Device::Cpu)?.contiguous()?)
    };
    let mut names = vec!["output".to_string()];
    let mut tensors = vec![host(&output)?];
    for (i, g) in gaussians.iter().enumerate() {
        tensors.push(host(g)?);
        names.push(format!("g{i}"));
    }
    let named: Vec<(&str, &Tensor)> = names.iter().map(String::as_str).zip(&tensors).collect();
    // Atomic, and the temporary file is removed on error (and by the next write if killed).
    files::save_tensors(&args.output, &named)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    Ok(json!({
        "command": "predict",
        "checkpoint": args.checkpoint.display().to_string(),
        "input": args.input.display().to_string(),
        "output": args.output.display().to_string(),
        "rows": x.dim(0)?,
        "in_features": features,
        "out_features": net.config().out_features,
        "dtype": if dtype == DType::F64 { "f64" } else { "f32" },
        "input_scale": input_scale,
        "temperature": temperature,
        "tensors": names,
    }))
}
