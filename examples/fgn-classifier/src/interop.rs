//! `import` and `convert`: networks of the original PyTorch FGN code (grezesf/FGN---Research)
//! to native checkpoints, through `gauss_layer::import` and `gauss_layer::convert`.
//!
//! ```text
//! fgn-classifier import model.safetensors --covar diag --out fgn.safetensors
//! fgn-classifier convert classic.safetensors --covar diag --out fgn.safetensors
//! ```
//! Both write a self-describing checkpoint that records `input_scale = 1` (the network takes
//! its inputs as the original did) and print one JSON line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;
use gauss_layer::checkpoint;
use gauss_layer::convert::{convert_classic_net, ConvertOptions};
use gauss_layer::import::{import_fgn_model, FgnCovarType, FgnImportOptions};
use gauss_layer::GaussNet;
use serde_json::{json, Value};

/// The original's `covar_type`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CovarArg {
    Sphere,
    Diag,
    Full,
    Chol,
}

impl From<CovarArg> for FgnCovarType {
    fn from(arg: CovarArg) -> Self {
        match arg {
            CovarArg::Sphere => FgnCovarType::Sphere,
            CovarArg::Diag => FgnCovarType::Diag,
            CovarArg::Full => FgnCovarType::Full,
            CovarArg::Chol => FgnCovarType::Chol,
        }
    }
}

/// A floating dtype.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DTypeArg {
    F32,
    F64,
}

impl From<DTypeArg> for DType {
    fn from(arg: DTypeArg) -> Self {
        match arg {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F64 => DType::F64,
        }
    }
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The original's state dict (`Feedforward_FGN_net` or a lone `FGN_layer`), saved with
    /// `safetensors.torch.save_file`.
    model: PathBuf,
    /// The original's covar_type (full and chol are both (Z, d, d): the file cannot tell).
    #[arg(long, value_enum)]
    covar: CovarArg,
    /// The original was built with non_lin=True: tanh on the hidden layers' linear part (never
    /// on a network's final layer `fl`, as in the original).
    #[arg(long)]
    non_lin: bool,
    /// The original was built with free_biases=False: biases follow the centers, b = -W·c.
    #[arg(long)]
    tied_biases: bool,
    /// The original's ordinal; only 2 (its default) describes a Gaussian.
    #[arg(long, default_value_t = 2.0)]
    ordinal: f64,
    /// Do not gate each layer by the previous layer's Gaussians (the original's network forward
    /// gates since September 2020).
    #[arg(long)]
    no_gate: bool,
    /// Dtype of the checkpoint (f64 keeps the imported precisions exact; predict converts).
    #[arg(long, value_enum, default_value = "f64")]
    dtype: DTypeArg,
    /// Where to write the checkpoint.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The original's `Feedforward_Classic_net` state dict, saved with
    /// `safetensors.torch.save_file`.
    classic: PathBuf,
    /// The covar_type of the FGN network to convert to.
    #[arg(long, value_enum)]
    covar: CovarArg,
    /// The original's init_factor: each layer's inv_covars starts at 1/(init_factor·Z).
    #[arg(long, default_value_t = DEFAULT_INIT_FACTOR)]
    init_factor: f64,
    /// No tanh on the hidden layers (the original FGN net built with non_lin=False; the
    /// classical net applies tanh, so by default the converted one does too).
    #[arg(long)]
    no_non_lin: bool,
    /// Do not gate each layer by the previous layer's Gaussians.
    #[arg(long)]
    no_gate: bool,
    /// Dtype of the checkpoint.
    #[arg(long, value_enum, default_value = "f64")]
    dtype: DTypeArg,
    /// Where to write the checkpoint.
    #[arg(long)]
    out: PathBuf,
}

/// Checks, before any work, that `out` (given as `option`) can be written: its directory
/// exists, it is not a directory, FIFO or device, it is none of `inputs`
/// ([`gauss_layer::files::check_output`]), and a file can be created in its directory (a
/// read-only one failed only at the save, after the whole import or prediction).
pub(crate) fn check_out_dir(option: &str, out: &Path, inputs: &[&Path]) -> Result<()> {
    gauss_layer::files::check_output(out, inputs)?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    examples_support::check_dir_writable(dir, &format!("{option} {}", out.display()))
}

fn dtype_name(dtype: DType) -> &'static str {
    if dtype == DType::F64 {
        "f64"
    } else {
        "f32"
    }
}

/// Saves `net` with the metadata of an imported network (input used as given).
fn save(net: &GaussNet, out: &Path, mut meta: BTreeMap<String, String>) -> Result<()> {
    meta.insert("input_scale".into(), "1".into());
    checkpoint::save_with_metadata(net, out, &meta)
        .with_context(|| format!("cannot save the checkpoint to {}", out.display()))
}

fn layer_summaries(net: &GaussNet) -> Vec<Value> {
    net.layers()
        .iter()
        .map(|l| {
            json!({
                "in_features": l.in_features(),
                "out_features": l.out_features(),
                "parameterization": l.config().precision.parameterization.name(),
                "tanh": l.config().tanh,
                "tied_bias": l.config().tied_bias,
            })
        })
        .collect()
}

/// `fgn-classifier import`.
pub fn import(args: ImportArgs) -> Result<Value> {
    check_out_dir("--out", &args.out, &[&args.model])?;
    let options = FgnImportOptions {
        covar_type: Some(args.covar.into()),
        non_lin: args.non_lin,
        free_biases: !args.tied_biases,
        ordinal: args.ordinal,
        parameterization: None,
        gate: !args.no_gate,
    };
    let dtype = DType::from(args.dtype);
    let (net, report) = import_fgn_model(&args.model, &Device::Cpu, dtype, &options)?;
    let mut meta = BTreeMap::new();
    meta.insert("source".into(), "pytorch-fgn-import".into());
    meta.insert("source_file".into(), args.model.display().to_string());
    meta.insert("covar_type".into(), report.covar_type.name().into());
    meta.insert("non_lin".into(), args.non_lin.to_string());
    meta.insert("free_biases".into(), (!args.tied_biases).to_string());
    save(&net, &args.out, meta)?;
    let mut out = serde_json::Map::new();
    out.insert("command".into(), json!("import"));
    out.insert("model".into(), json!(args.model.display().to_string()));
    out.insert("checkpoint".into(), json!(args.out.display().to_string()));
    out.insert("dtype".into(), json!(dtype_name(dtype)));
    out.insert("non_lin".into(), json!(args.non_lin));
    out.insert("free_biases".into(), json!(!args.tied_biases));
    out.insert("ordinal".into(), json!(args.ordinal));
    if let Value::Object(fields) = serde_json::to_value(&report)? {
        out.extend(fields);
    }
    Ok(Value::Object(out))
}

/// When the conversion failed because of `--init-factor` alone (the same conversion with
/// the original's default init_factor, 10, succeeds), the error in the command line's
/// terms: the layer whose initial precision `2σ²` (`2σ` for full), σ = 1/(init_factor·Z),
/// overflows, underflows or leaves the range a checkpoint holds. `None` when the failure has
/// another cause. Runs only on the error path (it converts a second time to learn each
/// layer's width Z).
fn init_factor_error(
    args: &ConvertArgs,
    options: &ConvertOptions,
    dtype: DType,
) -> Option<anyhow::Error> {
    let covar: FgnCovarType = args.covar.into();
    let reference = ConvertOptions {
        width: ConvertOptions::fgn_original(covar, DEFAULT_INIT_FACTOR).width,
        ..options.clone()
    };
    let net = convert_classic_net(&args.classic, &Device::Cpu, dtype, &reference).ok()?;
    let factor = args.init_factor;
    let precision = |z: usize| {
        let sigma = 1.0 / (factor * z as f64);
        match covar {
            FgnCovarType::Full => 2.0 * sigma,
            _ => 2.0 * sigma * sigma,
        }
    };
    // The layer of the most extreme precision (an overflow or underflow first).
    let widths: Vec<usize> = net.layers().iter().map(|l| l.out_features()).collect();
    // Reversed: `max_by` keeps the last of equals, so the first layer wins a tie.
    let (layer, z) = widths
        .into_iter()
        .enumerate()
        .rev()
        .max_by(|&(_, a), &(_, b)| {
            let extremity = |z: usize| {
                let p = precision(z);
                if p.is_finite() && p > 0.0 {
                    p.ln().abs()
                } else {
                    f64::INFINITY
                }
            };
            extremity(a).total_cmp(&extremity(b))
        })?;
    let value = precision(z);
    let formula = match covar {
        FgnCovarType::Full => "2σ",
        _ => "2σ²",
    };
    let (what, fix) = if value == 0.0 {
        ("underflows to 0 in f64".to_string(), "a smaller")
    } else if !value.is_finite() {
        ("overflows to inf in f64".to_string(), "a larger")
    } else if value > 1.0 {
        (
            format!("is {value:.2e}, too large for the checkpoint"),
            "a larger",
        )
    } else {
        (
            format!("is {value:.2e}, too small for the checkpoint"),
            "a smaller",
        )
    };
    Some(anyhow::anyhow!(
        "--init-factor {factor:e}: the initial precision of layer {layer} ({z} neurons), {formula} with σ = 1/(init_factor·{z}), {what}; give {fix} --init-factor (default {DEFAULT_INIT_FACTOR})"
    ))
}

/// `convert --init-factor` by default, the original's.
const DEFAULT_INIT_FACTOR: f64 = 10.0;

/// `fgn-classifier convert`.
pub fn convert(args: ConvertArgs) -> Result<Value> {
    check_out_dir("--out", &args.out, &[&args.classic])?;
    crate::validate::finite_positive("--init-factor", args.init_factor)?;
    let covar: FgnCovarType = args.covar.into();
    let mut options = ConvertOptions::fgn_original(covar, args.init_factor);
    options.tanh = !args.no_non_lin;
    options.gate = !args.no_gate;
    let dtype = DType::from(args.dtype);
    let net = match convert_classic_net(&args.classic, &Device::Cpu, dtype, &options) {
        Ok(net) => net,
        Err(e) => return Err(init_factor_error(&args, &options, dtype).unwrap_or_else(|| e.into())),
    };
    let mut meta = BTreeMap::new();
    meta.insert("source".into(), "pytorch-classic-convert".into());
    meta.insert("source_file".into(), args.classic.display().to_string());
    meta.insert("covar_type".into(), covar.name().into());
    meta.insert("init_factor".into(), args.init_factor.to_string());
    save(&net, &args.out, meta)?;
    let precision_scales = net
        .layers()
        .iter()
        .map(|l| options.width.precision_scale(l.out_features()))
        .collect::<gauss_layer::Result<Vec<f64>>>()?;
    Ok(json!({
        "command": "convert",
        "classic": args.classic.display().to_string(),
        "checkpoint": args.out.display().to_string(),
        "dtype": dtype_name(dtype),
        "covar_type": covar.name(),
        "init_factor": args.init_factor,
        "non_lin": options.tanh,
        "gate": options.gate,
        "input_batch_norm": net.config().input_batch_norm,
        "batch_norm": net.config().batch_norm,
        "precision_scales": precision_scales,
        "layers": layer_summaries(&net),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output directory that takes no new files is refused before the import (or
    /// prediction) runs, naming the option: procfs refuses new files even to root, whom
    /// permissions do not stop.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_unwritable_output_directory_is_refused_up_front() {
        for option in ["--out", "--output"] {
            let error = check_out_dir(option, Path::new("/proc/net.safetensors"), &[])
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with(&format!("{option} /proc/net.safetensors"))
                    && error.contains("cannot create files in the directory"),
                "{error}"
            );
        }
        let dir = std::env::temp_dir();
        check_out_dir("--out", &dir.join("fgn-interop-probe.safetensors"), &[]).unwrap();
    }
}
