//! Checks of the command line before any work: a bad value stops the program at once with
//! one line naming the option, the value given and what would be accepted, instead of
//! training for minutes and then failing (or, worse, saving a network of NaN).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use gauss_layer::GaussNet;

/// The options of `train` that must hold before training starts.
pub struct TrainOptions<'a> {
    pub lr: f64,
    pub batch_size: usize,
    pub epochs: usize,
    pub hidden: &'a [usize],
    pub lambda_sigma: f64,
    pub lambda_l2: f64,
    /// The checkpoint path, when one will be written.
    pub out: Option<&'a Path>,
    /// The files training reads (the IDX files of `--mnist`/`--data-dir` and of every
    /// `--ood` directory), which `out` must not be.
    pub inputs: &'a [PathBuf],
}

/// Every check of `train`'s options (see the module docs).
pub fn train(options: &TrainOptions) -> Result<()> {
    finite_positive("--lr", options.lr)?;
    at_least_one("--batch-size", options.batch_size)?;
    at_least_one("--epochs", options.epochs)?;
    if let Some(i) = options.hidden.iter().position(|&w| w == 0) {
        bail!(
            "--hidden must be >= 1 for every hidden layer, got 0 (value {} of {:?})",
            i + 1,
            options.hidden
        );
    }
    finite_non_negative("--lambda-sigma", options.lambda_sigma)?;
    finite_non_negative("--lambda-l2", options.lambda_l2)?;
    if let Some(out) = options.out {
        writable_output(out)?;
        let inputs: Vec<&Path> = options.inputs.iter().map(PathBuf::as_path).collect();
        gauss_layer::files::check_output(out, &inputs).context("--out")?;
    }
    Ok(())
}

/// `value` is finite and > 0.
pub fn finite_positive(option: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{option} must be a finite number > 0, got {value}");
    }
    Ok(())
}

/// `value` is finite and >= 0.
pub fn finite_non_negative(option: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value >= 0.0) {
        bail!("{option} must be a finite number >= 0, got {value}");
    }
    Ok(())
}

/// `value` >= 1.
pub fn at_least_one(option: &str, value: usize) -> Result<()> {
    if value == 0 {
        bail!("{option} must be >= 1, got 0");
    }
    Ok(())
}

/// The directory of `out` exists and a file can be created in it; `out` itself is not a
/// directory. Checked by creating (and removing) a probe file, which is what the save does.
pub fn writable_output(out: &Path) -> Result<()> {
    if out.is_dir() {
        bail!("--out {} is a directory; give a file path", out.display());
    }
    gauss_layer::files::check_output(out, &[])?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "--out {}: the directory {} does not exist (create it first)",
            out.display(),
            dir.display()
        );
    }
    examples_support::check_dir_writable(&dir, &format!("--out {}", out.display()))
}

/// The pixel scale recorded in a checkpoint's metadata (`input_scale`), `default` when absent.
pub fn recorded_input_scale(metadata: &BTreeMap<String, String>, default: f64) -> Result<f64> {
    let Some(text) = metadata.get("input_scale") else {
        return Ok(default);
    };
    let scale: f64 = text
        .parse()
        .with_context(|| format!("checkpoint metadata `input_scale` is {text:?}, not a number"))?;
    if !(scale.is_finite() && scale > 0.0) {
        bail!("checkpoint metadata `input_scale` must be finite and > 0, got {text}");
    }
    Ok(scale)
}

/// [`gauss_layer::checkpoint::load`], with the way on where the file is a safetensors file
/// without this library's metadata: most often a network of the original PyTorch FGN code,
/// which `import` (or, classical, `convert`) turns into a checkpoint.
pub fn load_checkpoint(
    path: &Path,
    device: &Device,
    dtype: Option<DType>,
) -> Result<gauss_layer::checkpoint::LoadedCheckpoint> {
    gauss_layer::checkpoint::load(path, device, dtype).map_err(|error| {
        let foreign = matches!(
            &error,
            gauss_layer::GaussError::Checkpoint { reason, .. } if reason.contains("`format` is missing")
        );
        if foreign {
            anyhow::anyhow!(
                "{error}; a state dict of the original PyTorch FGN code becomes one with `fgn-classifier import`, a classical one with `fgn-classifier convert`"
            )
        } else {
            error.into()
        }
    })
}

/// Says on stderr when a checkpoint loaded in another dtype than it was stored in without
/// being asked (an f64 checkpoint on Metal, which has no f64, runs in f32).
pub fn note_converted_dtype(loaded: &gauss_layer::checkpoint::LoadedCheckpoint, device: &Device) {
    let stored = loaded.stored_dtype;
    let running = gauss_layer::checkpoint::default_load_dtype(stored, device);
    if running != stored {
        eprintln!(
            "note: the checkpoint holds {stored:?} parameters; {device:?} has no {stored:?}, so they run in {running:?}"
        );
    }
}

/// Every parameter of a trained network is finite; otherwise training diverged and nothing
/// should be saved. The test runs on the parameters' device (`t − t` is 0 exactly where `t` is
/// finite, NaN elsewhere) and reads one scalar in the working dtype; only a failure copies
/// tensors to the host to name the parameter and value.
pub fn finite_network(net: &GaussNet, lr: f64) -> Result<()> {
    let tensors = net.named_tensors();
    let mut probe: Option<Tensor> = None;
    for (_, tensor) in &tensors {
        let zero = tensor.sub(tensor)?.sum_all()?.to_dtype(DType::F32)?;
        probe = Some(match probe {
            Some(sum) => (sum + zero)?,
            None => zero,
        });
    }
    match probe {
        Some(sum) if sum.to_scalar::<f32>()? != 0.0 => {}
        _ => return Ok(()),
    }
    for (name, tensor) in tensors {
        let values = tensor
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            bail!(
                "training diverged: parameter `{name}` became {bad}; nothing was saved (try a smaller --lr than {lr:e})"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(lr: f64) -> TrainOptions<'static> {
        TrainOptions {
            lr,
            batch_size: 64,
            epochs: 1,
            hidden: &[64],
            lambda_sigma: 0.0,
            lambda_l2: 0.0,
            out: None,
            inputs: &[],
        }
    }

    /// `--out` naming one of the IDX files training reads (plain or .gz) is refused before
    /// any work: it was overwritten by the checkpoint, and the data set was gone. A new file
    /// in the data directory is fine.
    #[test]
    fn an_output_that_is_a_training_input_is_refused() {
        for compressed in [false, true] {
            let dir = crate::idx::tests::write_set(
                &format!("out-is-input-{compressed}"),
                4,
                2,
                compressed,
            );
            let inputs = crate::idx::input_files(&dir, &["train", "t10k"]);
            assert_eq!(inputs.len(), 4, "{inputs:?}");
            for input in &inputs {
                let e = train(&TrainOptions {
                    out: Some(input),
                    inputs: &inputs,
                    ..options(1e-2)
                })
                .unwrap_err();
                let e = format!("{e:#}");
                assert!(e.starts_with("--out") && e.contains("input"), "{e}");
            }
            let fresh = dir.join("net.safetensors");
            train(&TrainOptions {
                out: Some(&fresh),
                inputs: &inputs,
                ..options(1e-2)
            })
            .unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn bad_numbers_are_refused_with_the_option_name() {
        for lr in [f64::NAN, f64::INFINITY, -1.0, 0.0] {
            let e = train(&options(lr)).unwrap_err().to_string();
            assert!(e.contains("--lr"), "{e}");
        }
        train(&options(1e-2)).unwrap();
        let e = train(&TrainOptions {
            batch_size: 0,
            ..options(1e-2)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--batch-size"), "{e}");
        let e = train(&TrainOptions {
            epochs: 0,
            ..options(1e-2)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--epochs"), "{e}");
        let e = train(&TrainOptions {
            hidden: &[8, 0],
            ..options(1e-2)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--hidden"), "{e}");
        let e = train(&TrainOptions {
            lambda_sigma: f64::NAN,
            ..options(1e-2)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--lambda-sigma"), "{e}");
        let e = train(&TrainOptions {
            lambda_l2: -1.0,
            ..options(1e-2)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--lambda-l2"), "{e}");
    }

    #[test]
    fn output_directory_must_exist_and_take_files() {
        let missing = std::env::temp_dir()
            .join(format!("fgn-no-such-dir-{}", std::process::id()))
            .join("net.safetensors");
        let e = writable_output(&missing).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = writable_output(&std::env::temp_dir())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a directory"), "{e}");
        writable_output(&std::env::temp_dir().join("net.safetensors")).unwrap();
    }

    #[test]
    fn a_non_finite_parameter_is_named_and_a_finite_network_passes() {
        use candle_nn::{VarBuilder, VarMap};
        use gauss_layer::GaussNetConfig;
        let varmap = VarMap::new();
        let config = GaussNetConfig {
            in_features: 3,
            hidden: vec![4],
            out_features: 2,
            ..Default::default()
        };
        let net = GaussNet::new(
            config,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        finite_network(&net, 1e-2).unwrap();
        // A huge but finite value is still finite (t − t is 0, not NaN).
        let (name, center) = net
            .named_tensors()
            .into_iter()
            .find(|(n, _)| n.ends_with("center"))
            .unwrap();
        let var = varmap.data().lock().unwrap().get(&name).unwrap().clone();
        let shape = center.dims().to_vec();
        let mut values = vec![1e30f32; center.elem_count()];
        var.set(&Tensor::from_vec(values.clone(), shape.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        finite_network(&net, 1e-2).unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            values[1] = bad;
            var.set(&Tensor::from_vec(values.clone(), shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let err = finite_network(&net, 1e-2).unwrap_err().to_string();
            assert!(err.contains(&name) && err.contains("diverged"), "{err}");
        }
    }

    #[test]
    fn recorded_scale_must_be_a_positive_number() {
        let mut meta = BTreeMap::new();
        assert_eq!(recorded_input_scale(&meta, 16.0).unwrap(), 16.0);
        meta.insert("input_scale".to_string(), "255".to_string());
        assert_eq!(recorded_input_scale(&meta, 16.0).unwrap(), 255.0);
        for bad in ["nan", "-1", "0", "inf", "x"] {
            meta.insert("input_scale".to_string(), bad.to_string());
            assert!(recorded_input_scale(&meta, 16.0).is_err(), "{bad}");
        }
    }

    /// A network of the original PyTorch FGN code given where a checkpoint belongs (`eval`,
    /// `predict`): the error says which command turns it into one.
    #[test]
    fn a_pytorch_state_dict_is_pointed_to_import() {
        let state_dict = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data/interop/net_diag_base/model.safetensors");
        let Err(error) = load_checkpoint(&state_dict, &Device::Cpu, None) else {
            panic!("a state dict loaded as a checkpoint");
        };
        let error = error.to_string();
        assert!(
            error.contains("`format` is missing") && error.contains("`fgn-classifier import`"),
            "{error}"
        );
    }
}
