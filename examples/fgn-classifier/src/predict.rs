//! `predict`: runs a checkpoint on the tensor `x` (N, D) of a safetensors file and writes the
//! network's `output` (N, out) and the Gaussian activations `g{i}` (N, Z_i) of every layer
//! (gated, in layer order), in the dtype the network ran in.
//!
//! `x` is used as given, except that a checkpoint recording `input_scale` in its metadata
//! (written by `train`, which divides pixels by it) gets `x / input_scale`; `import` and
//! `convert` record 1.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use gauss_layer::checkpoint;
use serde_json::{json, Value};

use crate::interop::DTypeArg;
use crate::DeviceArg;

#[derive(clap::Args)]
pub struct PredictArgs {
    /// A checkpoint written by train, import or convert.
    checkpoint: PathBuf,
    /// A safetensors file holding `x` (N, D).
    #[arg(long)]
    input: PathBuf,
    /// Where to write `output` and `g0`, `g1`, … (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// Dtype to run in (default: the checkpoint's).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

/// Reads `x` from a safetensors file, checked: rank 2 with `features` columns, a float or
/// integer dtype, every value finite; converted to `dtype`.
fn read_input(path: &Path, features: usize, dtype: DType) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .with_context(|| format!("{} is not a readable safetensors file", path.display()))?;
    let Some(x) = tensors.get("x") else {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        bail!(
            "{}: no tensor `x` (found {names:?}); predict reads the inputs from `x` (N, D)",
            path.display()
        );
    };
    if x.rank() != 2 || x.dim(1)? != features {
        bail!(
            "{}: `x` has shape {:?}, the network expects (N, {features})",
            path.display(),
            x.dims()
        );
    }
    if x.dim(0)? == 0 {
        bail!("{}: `x` has no rows (N = 0)", path.display());
    }
    let supported = matches!(
        x.dtype(),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::U8 | DType::U32 | DType::I64
    );
    if !supported {
        bail!(
            "{}: `x` has dtype {:?}; expected a float or integer tensor",
            path.display(),
            x.dtype()
        );
    }
    let values = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: `x` holds {} at row {}, column {}",
            path.display(),
            values[i],
            i / features,
            i % features
        );
    }
    Ok(x.to_dtype(dtype)?)
}

/// Writes the tensors to a temporary file beside `path`, then renames it over `path`.
fn write_outputs(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.predict.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = candle_core::safetensors::save(tensors, &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    Ok(())
}

/// `fgn-classifier predict`.
pub fn predict(args: PredictArgs) -> Result<Value> {
    crate::interop::check_out_dir(&args.output)?;
    let device = crate::device(args.device)?;
    if crate::cnn::is_cnn_checkpoint(&args.checkpoint)? {
        let (tensors, mut summary) = crate::cnn_cli::predict(
            &args.checkpoint,
            &args.input,
            &device,
            args.dtype.map(DType::from),
        )?;
        write_outputs(&args.output, &tensors)?;
        summary["output"] = json!(args.output.display().to_string());
        return Ok(summary);
    }
    let loaded = checkpoint::load(&args.checkpoint, &device, args.dtype.map(DType::from))?;
    let net = &loaded.net;
    let input_scale: f64 = match loaded.user_metadata.get("input_scale") {
        Some(s) => s
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v > 0.0)
            .with_context(|| {
                format!("checkpoint metadata `input_scale` is {s:?}, not a finite number > 0")
            })?,
        None => 1.0,
    };
    let dtype = net
        .layers()
        .first()
        .map(|l| l.center().dtype())
        .context("the checkpoint's network has no layers")?;
    let features = net.config().in_features;
    let x = read_input(&args.input, features, dtype)?;
    let x = if input_scale == 1.0 {
        x
    } else {
        (x / input_scale)?
    };
    let x = x.to_device(&device)?;
    let (output, gaussians) = net.forward_with_gaussians(&x, false)?;
    let host = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_device(&candle_core::Device::Cpu)?.contiguous()?)
    };
    let mut tensors = HashMap::new();
    tensors.insert("output".to_string(), host(&output)?);
    let mut names = vec!["output".to_string()];
    for (i, g) in gaussians.iter().enumerate() {
        tensors.insert(format!("g{i}"), host(g)?);
        names.push(format!("g{i}"));
    }
    write_outputs(&args.output, &tensors)?;
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
        "tensors": names,
    }))
}
