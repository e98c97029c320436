//! A `Feedforward_FGN_net` (or a lone `FGN_layer`): module layout, batch norms, the network.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::BatchNorm;

use super::layer::{
    biases_look_tied, cast_layer, cast_lone_layer, check_tensors_fit_dtype, import_layer,
};
use super::state_dict::{in_file, join, list_prefixes, load_state_dict, state_error, StateDict};
use super::{FgnImportOptions, FgnImportReport, FgnLayerReport, FgnModelKind, FgnNetLayout};
use crate::error::Result;
use crate::layer::GaussLayer;
use crate::net::GaussNet;

/// Which original network a feed-forward state dict holds: an FGN one (imported) or a
/// classical one (converted, [`crate::convert`]). The module layout is the same; the tensor
/// that marks a layer differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NetKind {
    /// `Feedforward_FGN_net`: layers hold `inv_covars`.
    Fgn,
    /// `Feedforward_Classic_net`: layers are `Linear`s (`weight`).
    Classic,
}

impl NetKind {
    /// The tensor that marks a layer of this kind.
    fn layer_leaf(self) -> &'static str {
        match self {
            NetKind::Fgn => "inv_covars",
            NetKind::Classic => "weight",
        }
    }

    /// The original's class name.
    fn model_name(self) -> &'static str {
        match self {
            NetKind::Fgn => "Feedforward_FGN_net",
            NetKind::Classic => "Feedforward_Classic_net",
        }
    }

    /// What the module under `prefix` holds, judged by its tensors (`None`: neither a layer
    /// nor a batch norm). A classical batch norm has a `weight` too, so `running_mean` is
    /// asked first there.
    fn classify(self, dict: &StateDict, prefix: &str) -> Option<ModuleKind> {
        let norm = dict.contains(&join(prefix, "running_mean"));
        let layer = dict.contains(&join(prefix, self.layer_leaf()));
        match (self, layer, norm) {
            (NetKind::Fgn, true, _) | (NetKind::Classic, true, false) => Some(ModuleKind::Layer),
            (_, _, true) => Some(ModuleKind::Norm),
            _ => None,
        }
    }

    /// Refuses a state dict of the other kind, saying which function reads it.
    fn check_final_layer(self, dict: &StateDict, layout: &FgnNetLayout) -> Result<()> {
        let fgn = dict.contains(&join(&layout.final_layer, "inv_covars"));
        match self {
            NetKind::Fgn if !fgn && dict.contains(&join(&layout.final_layer, "weight")) => {
                Err(state_error(format!(
                    "`{}` is a classical Linear layer (`weight`, no `inv_covars`): this looks like a Feedforward_Classic_net state dict, which converts (gauss_layer::convert::convert_classic_net, CLI `convert`) rather than imports",
                    dict.key(&layout.final_layer)
                )))
            }
            NetKind::Classic if fgn => Err(state_error(format!(
                "`{}` is already an FGN layer (it has `inv_covars`): import this state dict instead of converting it",
                dict.key(&layout.final_layer)
            ))),
            _ => Ok(()),
        }
    }
}

/// What a module of `hidden_layers` holds, judged by its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModuleKind {
    /// A layer (`inv_covars` for FGN, `weight` for a classical `Linear`).
    Layer,
    /// A `BatchNorm1d` (`running_mean`).
    Norm,
}

/// The modules of a feed-forward state dict, checked against the original's layout.
#[derive(Clone, Debug)]
pub(crate) struct Feedforward {
    /// `ib`, when its tensors are present.
    pub input_norm: Option<String>,
    /// Each hidden layer's prefix and the prefix of the batch norm after it, if any.
    pub hidden: Vec<(String, Option<String>)>,
    /// `fl`.
    pub final_layer: String,
    /// The `drop_p > 0` layout.
    pub dropout: bool,
}

/// Reads the module layout of `Feedforward_FGN_net` / `Feedforward_Classic_net`:
/// `hidden_layers.{k}` holds, without dropout, layer j at `2j` and its batch norm (or an
/// identity, no tensors) at `2j + 1`; with dropout, a `Dropout` at 0 and layer j at `1 + 3j`,
/// its batch norm at `2 + 3j`, a `Dropout` at `3 + 3j`. `kind` tells a module's kind from its
/// tensors ([`NetKind::classify`]).
fn parse_feedforward(
    dict: &StateDict,
    layout: &FgnNetLayout,
    kind: NetKind,
) -> Result<Feedforward> {
    let (layer_leaf, model_name) = (kind.layer_leaf(), kind.model_name());
    let classify = |prefix: &str| kind.classify(dict, prefix);
    if classify(&layout.final_layer) != Some(ModuleKind::Layer) {
        return Err(state_error(format!(
            "no final layer: tensor `{}` is missing, so this is not a {model_name} state dict. Layers (tensors `*.{layer_leaf}`) were found under: {}; all module prefixes: {}",
            dict.key(&join(&layout.final_layer, layer_leaf)),
            list_prefixes(&dict.prefixes_holding(layer_leaf)),
            list_prefixes(&dict.module_prefixes()),
        )));
    }
    let input_norm = dict
        .contains(&join(&layout.input_norm, "running_mean"))
        .then(|| layout.input_norm.clone());
    let hidden_prefix = format!("{}.", layout.hidden);
    let mut modules: BTreeMap<usize, ModuleKind> = BTreeMap::new();
    for name in dict.names() {
        let Some(rest) = name.strip_prefix(&hidden_prefix) else {
            continue;
        };
        let index = rest.split('.').next().and_then(|k| k.parse::<usize>().ok());
        let Some(k) = index else {
            return Err(state_error(format!(
                "tensor `{}`: expected `{}.<index>.<name>`",
                dict.key(name),
                layout.hidden
            )));
        };
        if modules.contains_key(&k) {
            continue;
        }
        let prefix = format!("{}.{k}", layout.hidden);
        let kind = classify(&prefix).ok_or_else(|| {
            let names: Vec<&str> = dict
                .names()
                .filter(|n| n.starts_with(&format!("{prefix}.")))
                .collect();
            state_error(format!(
                "module `{}` holds {names:?}, which is neither a layer (`{layer_leaf}`) nor a batch norm (`running_mean`)",
                dict.key(&prefix)
            ))
        })?;
        modules.insert(k, kind);
    }
    let first_layer = modules
        .iter()
        .find(|(_, kind)| **kind == ModuleKind::Layer)
        .map(|(k, _)| *k);
    let dropout = match (layout.dropout, first_layer) {
        (Some(d), _) => d,
        (None, None) | (None, Some(0)) => false,
        (None, Some(1)) => true,
        (None, Some(k)) => {
            return Err(state_error(format!(
                "the first hidden layer is module `{}.{k}`; the original puts it at index 0 (drop_p = 0) or 1 (drop_p > 0, after the input Dropout)",
                layout.hidden
            )))
        }
    };
    let (offset, stride) = if dropout { (1, 3) } else { (0, 2) };
    let layout_words = if dropout {
        format!("with dropout (drop_p > 0) the original puts hidden layer j at `{h}.{{1 + 3j}}` and its batch norm at `{h}.{{2 + 3j}}`", h = layout.hidden)
    } else {
        format!("without dropout (drop_p = 0) the original puts hidden layer j at `{h}.{{2j}}` and its batch norm at `{h}.{{2j + 1}}`", h = layout.hidden)
    };
    let mut hidden: Vec<(String, Option<String>)> = Vec::new();
    for (&k, &kind) in &modules {
        let slot = k.checked_sub(offset).map(|s| (s / stride, s % stride));
        let prefix = format!("{}.{k}", layout.hidden);
        match (kind, slot) {
            (ModuleKind::Layer, Some((j, 0))) if j == hidden.len() => {
                hidden.push((prefix, None));
            }
            (ModuleKind::Norm, Some((j, 1))) if j + 1 == hidden.len() => {
                if let Some(last) = hidden.last_mut() {
                    last.1 = Some(prefix);
                }
            }
            _ => {
                let what = match kind {
                    ModuleKind::Layer => "a layer",
                    ModuleKind::Norm => "a batch norm",
                };
                return Err(state_error(format!(
                    "module `{}` is {what} where the layout does not allow one: {layout_words} (FgnNetLayout::dropout sets the layout when the inference is wrong)",
                    dict.key(&prefix)
                )));
            }
        }
    }
    let with_norm = hidden.iter().filter(|(_, n)| n.is_some()).count();
    if with_norm != 0 && with_norm != hidden.len() {
        return Err(state_error(format!(
            "{with_norm} of {} hidden layers are followed by a batch norm; a GaussNet has one after every hidden layer or after none",
            hidden.len()
        )));
    }
    Ok(Feedforward {
        input_norm,
        hidden,
        final_layer: layout.final_layer.clone(),
        dropout,
    })
}

/// A `BatchNorm1d` in eval mode, f64 on the CPU; `width` is the size it must have. Without
/// `weight` and `bias` (`affine=False`) it gets 1 and 0.
fn batch_norm(dict: &StateDict, prefix: &str, width: usize, eps: f64) -> Result<BatchNorm> {
    let get = |n: &str| dict.host_shaped(&join(prefix, n), &[width]);
    let mean = get("running_mean")?;
    let var = get("running_var")?;
    if let Some(i) = var.data.iter().position(|&v| v + eps <= 0.0) {
        return Err(state_error(format!(
            "tensor `{}` is {} at index {i}: a variance must be >= 0",
            dict.key(&join(prefix, "running_var")),
            var.data[i]
        )));
    }
    let (weight, bias) = if dict.contains(&join(prefix, "weight")) {
        (get("weight")?.tensor()?, get("bias")?.tensor()?)
    } else {
        (
            Tensor::ones(width, DType::F64, &Device::Cpu)?,
            Tensor::zeros(width, DType::F64, &Device::Cpu)?,
        )
    };
    Ok(BatchNorm::new(
        width,
        mean.tensor()?,
        var.tensor()?,
        weight,
        bias,
        eps,
    )?)
}

fn cast_norm(norm: &BatchNorm, device: &Device, dtype: DType) -> Result<BatchNorm> {
    let move_to = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
    let n = norm.running_mean().elem_count();
    let (weight, bias) = match norm.weight_and_bias() {
        Some((w, b)) => (move_to(w)?, move_to(b)?),
        None => (
            Tensor::ones(n, dtype, device)?,
            Tensor::zeros(n, dtype, device)?,
        ),
    };
    Ok(BatchNorm::new(
        n,
        move_to(norm.running_mean())?,
        move_to(norm.running_var())?,
        weight,
        bias,
        norm.eps(),
    )?)
}

/// The same network with every tensor on `device` in `dtype`.
pub(crate) fn cast_net(net: GaussNet, device: &Device, dtype: DType) -> Result<GaussNet> {
    check_fits_dtype(&net, dtype)?;
    let layers = net
        .layers()
        .iter()
        .map(|l| cast_layer(l, device, dtype))
        .collect::<Result<Vec<_>>>()?;
    let input_norm = net
        .input_norm()
        .map(|n| cast_norm(n, device, dtype))
        .transpose()?;
    let norms = net
        .norms()
        .iter()
        .map(|n| n.as_ref().map(|n| cast_norm(n, device, dtype)).transpose())
        .collect::<Result<Vec<_>>>()?;
    GaussNet::from_parts(net.config().clone(), input_norm, layers, norms)
}

/// Every value of `net` (f64, CPU) is finite in `dtype`: a center of 1e300 or a weight of
/// 1e39 converted to f32 would become ±∞ and the network would only produce NaN.
fn check_fits_dtype(net: &GaussNet, dtype: DType) -> Result<()> {
    check_tensors_fit_dtype(&net.named_tensors(), dtype)
}

/// Reads a feed-forward state dict of `kind` into a network (f64, CPU), for import and
/// conversion alike: refuses the other kind, checks the module layout
/// ([`parse_feedforward`]), reads each hidden layer with `read_layer(prefix, false)` and the
/// batch norm after it, the final layer with `read_layer(prefix, true)`, the input batch
/// norm, and assembles them ([`GaussNet::from_layers`]). Returns the network and the layout found.
pub(crate) fn assemble_feedforward(
    dict: &StateDict,
    layout: &FgnNetLayout,
    kind: NetKind,
    gate: bool,
    read_layer: &mut dyn FnMut(&str, bool) -> Result<GaussLayer>,
) -> Result<(GaussNet, Feedforward)> {
    kind.check_final_layer(dict, layout)?;
    let found = parse_feedforward(dict, layout, kind)?;
    let mut hidden = Vec::with_capacity(found.hidden.len());
    for (prefix, norm) in &found.hidden {
        let layer = read_layer(prefix, false)?;
        let norm = norm
            .as_ref()
            .map(|n| batch_norm(dict, n, layer.out_features(), layout.batch_norm_eps))
            .transpose()?;
        hidden.push((layer, norm));
    }
    let final_layer = read_layer(&found.final_layer, true)?;
    let input_norm = found
        .input_norm
        .as_ref()
        .map(|n| {
            let width = hidden
                .first()
                .map_or(final_layer.in_features(), |(l, _)| l.in_features());
            batch_norm(dict, n, width, layout.batch_norm_eps)
        })
        .transpose()?;
    let net = GaussNet::from_layers(
        input_norm,
        hidden,
        final_layer,
        gate,
        layout.batch_norm_eps,
        "in the order of the state dict",
    )?;
    Ok((net, found))
}

fn layer_report(prefix: &str, layer: &GaussLayer) -> FgnLayerReport {
    FgnLayerReport {
        prefix: prefix.to_string(),
        in_features: layer.in_features(),
        out_features: layer.out_features(),
        parameterization: layer.config().precision.parameterization,
        tanh: layer.config().tanh,
        tied_bias: layer.config().tied_bias,
    }
}

/// The network in f64 on the CPU and its report.
fn net_in_f64(
    dict: &StateDict,
    layout: &FgnNetLayout,
    options: &FgnImportOptions,
) -> Result<(GaussNet, FgnImportReport)> {
    options.validate()?;
    let mut reports = Vec::new();
    let mut covar_type = None;
    // The original builds `fl` without `non_lin`; the covariance type reported is the first
    // layer's.
    let mut read_layer = |prefix: &str, is_final: bool| {
        let (layer, t) = import_layer(dict, prefix, options, options.non_lin && !is_final)?;
        covar_type.get_or_insert(t);
        reports.push(layer_report(prefix, &layer));
        Ok(layer)
    };
    let (net, found) =
        assemble_feedforward(dict, layout, NetKind::Fgn, options.gate, &mut read_layer)?;
    let mut notes = Vec::new();
    let mut prefixes = found
        .hidden
        .iter()
        .map(|(p, _)| p)
        .chain([&found.final_layer]);
    if options.free_biases && prefixes.all(|p| biases_look_tied(dict, p)) {
        notes.push(tied_note());
    }
    let Some(covar_type) = covar_type else {
        return Err(state_error("no FGN layer was read"));
    };
    let report = FgnImportReport {
        kind: FgnModelKind::Net,
        covar_type,
        layers: reports,
        input_batch_norm: net.config().input_batch_norm,
        batch_norm: net.config().batch_norm,
        dropout: found.dropout,
        gate: options.gate,
        stripped_prefix: dict.stripped_prefix().map(str::to_string),
        notes,
    };
    Ok((net, report))
}

fn tied_note() -> String {
    "every layer's stored biases equal −W·c (to 1e-5), as those of a model trained with free_biases=False or just converted from a classical net: the outputs are the same either way, but if the original used free_biases=False, import it with tied biases (FgnImportOptions::free_biases = false, CLI --tied-biases) so that they keep following the centers when training goes on".to_string()
}

/// A lone layer as a network with no hidden layer (f64, CPU) and its report.
fn lone_layer_in_f64(
    dict: &StateDict,
    options: &FgnImportOptions,
) -> Result<(GaussNet, FgnImportReport)> {
    let (layer, covar_type) = import_layer(dict, "", options, options.non_lin)?;
    let mut notes = Vec::new();
    if options.free_biases && biases_look_tied(dict, "") {
        notes.push(tied_note());
    }
    let reports = vec![layer_report("", &layer)];
    // One layer has no previous Gaussians to gate by, whatever the options ask.
    let gate = false;
    let net = GaussNet::from_layers(None, Vec::new(), layer, gate, 1e-5, "")?;
    let report = FgnImportReport {
        kind: FgnModelKind::Layer,
        covar_type,
        layers: reports,
        input_batch_norm: false,
        batch_norm: false,
        dropout: false,
        gate,
        stripped_prefix: dict.stripped_prefix().map(str::to_string),
        notes,
    };
    Ok((net, report))
}

/// Runs `build` on `tensors` read as a state dict (it computes in f64 on the host), then
/// casts the network to the dtype and device of the tensor that `like` names (f32 on the CPU
/// when it is missing).
pub(crate) fn net_from_tensors<R>(
    tensors: &HashMap<String, Tensor>,
    build: impl FnOnce(&StateDict) -> Result<(GaussNet, R)>,
    like: impl FnOnce(&R) -> String,
) -> Result<(GaussNet, R)> {
    let dict = StateDict::new(tensors);
    let (net, extra) = build(&dict)?;
    let (dtype, device) = dict
        .get(&like(&extra))
        .map(|t| (t.dtype(), t.device().clone()))
        .unwrap_or((DType::F32, Device::Cpu));
    Ok((cast_net(net, &device, dtype)?, extra))
}

/// Reads the state dict in `path` in f64 on the host, runs `build` on it and casts the network
/// to `device` and `dtype`; every error names the file.
pub(crate) fn net_from_file<R>(
    path: &Path,
    device: &Device,
    dtype: DType,
    build: impl FnOnce(&StateDict) -> Result<(GaussNet, R)>,
) -> Result<(GaussNet, R)> {
    let result = (|| {
        let tensors = load_state_dict(path, &Device::Cpu, DType::F64)?;
        let (net, extra) = build(&StateDict::new(&tensors))?;
        Ok((cast_net(net, device, dtype)?, extra))
    })();
    result.map_err(|e| in_file(path, e))
}

/// Imports a `Feedforward_FGN_net` state dict (see the module docs for the layout and the
/// conventions). The network has the dtype and device of `{final_layer}.centers`; everything
/// is computed in f64 on the host first.
///
/// # Errors
/// [`GaussError::Checkpoint`](crate::GaussError::Checkpoint) when the state dict is not such a network (the message lists
/// the module prefixes it found, e.g. a lone layer's), its modules do not follow the
/// original's layout, or a layer cannot be imported (see [`super::fgn_layer_from_tensors`]);
/// [`GaussError::Shape`](crate::GaussError::Shape) for a misshapen tensor, naming it.
pub fn fgn_net_from_tensors(
    tensors: &HashMap<String, Tensor>,
    layout: &FgnNetLayout,
    options: &FgnImportOptions,
) -> Result<GaussNet> {
    let build = |dict: &StateDict| net_in_f64(dict, layout, options);
    let like = |_: &FgnImportReport| join(&layout.final_layer, "centers");
    Ok(net_from_tensors(tensors, build, like)?.0)
}

/// Imports whatever the state dict holds: a `Feedforward_FGN_net` (when `{final_layer}.*` is
/// present) or a lone `FGN_layer` (top-level `inv_covars`, imported as a network with no
/// hidden layer, `non_lin` applying to it). Returns the network, in the dtype and device of
/// the tensors, and a report of what was found and assumed.
///
/// # Errors
/// As [`fgn_net_from_tensors`]; a state dict that is neither lists the prefixes it found.
pub fn fgn_model_from_tensors(
    tensors: &HashMap<String, Tensor>,
    layout: &FgnNetLayout,
    options: &FgnImportOptions,
) -> Result<(GaussNet, FgnImportReport)> {
    let build = |dict: &StateDict| model_in_f64(dict, layout, options);
    let like = |report: &FgnImportReport| match report.kind {
        FgnModelKind::Net => join(&layout.final_layer, "centers"),
        FgnModelKind::Layer => "centers".to_string(),
    };
    net_from_tensors(tensors, build, like)
}

fn model_in_f64(
    dict: &StateDict,
    layout: &FgnNetLayout,
    options: &FgnImportOptions,
) -> Result<(GaussNet, FgnImportReport)> {
    options.validate()?;
    let is_net = dict.contains(&join(&layout.final_layer, "inv_covars"));
    if !is_net && dict.contains("inv_covars") {
        lone_layer_in_f64(dict, options)
    } else {
        net_in_f64(dict, layout, options)
    }
}

/// Reads a `Feedforward_FGN_net` or a lone `FGN_layer` saved with
/// `safetensors.torch.save_file` (see [`fgn_model_from_tensors`]), on `device` in `dtype`.
///
/// # Errors
/// As [`load_state_dict`] and [`fgn_model_from_tensors`]; every error names the file.
pub fn import_fgn_model(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
    options: &FgnImportOptions,
) -> Result<(GaussNet, FgnImportReport)> {
    let build = |dict: &StateDict| model_in_f64(dict, &FgnNetLayout::default(), options);
    net_from_file(path.as_ref(), device, dtype, build)
}

/// Reads a `Feedforward_FGN_net` saved with `safetensors.torch.save_file`, on `device` in
/// `dtype` (computed in f64 first).
///
/// # Errors
/// As [`load_state_dict`] and [`fgn_net_from_tensors`]; a lone layer's file is refused with
/// the prefixes found; every error names the file.
pub fn import_fgn_net(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
    options: &FgnImportOptions,
) -> Result<GaussNet> {
    let build = |dict: &StateDict| net_in_f64(dict, &FgnNetLayout::default(), options);
    Ok(net_from_file(path.as_ref(), device, dtype, build)?.0)
}

/// Reads one `FGN_layer` stored under `prefix` (`""` for a layer saved on its own), on
/// `device` in `dtype` (computed in f64 first); `options.non_lin` applies to it.
///
/// # Errors
/// As [`load_state_dict`] and [`super::fgn_layer_from_tensors`]; every error names the file.
pub fn import_fgn_layer(
    path: impl AsRef<Path>,
    prefix: &str,
    device: &Device,
    dtype: DType,
    options: &FgnImportOptions,
) -> Result<GaussLayer> {
    let path = path.as_ref();
    let result = (|| {
        let tensors = load_state_dict(path, &Device::Cpu, DType::F64)?;
        let dict = StateDict::new(&tensors);
        if !dict.contains(&join(prefix, "inv_covars")) {
            return Err(state_error(format!(
                "no FGN layer under prefix {}: layers (tensors `*.inv_covars`) were found under: {}",
                list_prefixes(&[prefix.to_string()]),
                list_prefixes(&dict.prefixes_holding("inv_covars"))
            )));
        }
        let (layer, _) = import_layer(&dict, prefix, options, options.non_lin)?;
        cast_lone_layer(&layer, device, dtype)
    })();
    result.map_err(|e| in_file(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lone layer whose weight 1e5 exceeds f16's largest finite value (65504) is refused in
    /// f16 by `import_fgn_layer`, as `import_fgn_model` refuses the same file, naming the
    /// tensor; in f32 it imports with the weight intact.
    #[test]
    fn a_lone_layer_that_overflows_the_dtype_is_refused() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gauss-lone-f16-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| crate::GaussError::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
        let path = dir.join("layer.safetensors");
        let cpu = Device::Cpu;
        let tensors: HashMap<String, Tensor> = [
            ("weights", Tensor::new(&[[1e5f32, 1.0]], &cpu)?),
            ("biases", Tensor::new(&[0.0f32], &cpu)?),
            ("centers", Tensor::new(&[[0.0f32, 0.0]], &cpu)?),
            ("inv_covars", Tensor::new(&[[1.0f32, 1.0]], &cpu)?),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
        candle_core::safetensors::save(&tensors, &path)?;
        let options = FgnImportOptions::default();
        let layer = import_fgn_layer(&path, "", &cpu, DType::F16, &options);
        let model = import_fgn_model(&path, &cpu, DType::F16, &options);
        let f32_layer = import_fgn_layer(&path, "", &cpu, DType::F32, &options);
        std::fs::remove_dir_all(&dir).ok();
        let text = layer.expect_err("1e5 is not finite in f16").to_string();
        assert!(
            text.contains("`weight`") && text.contains("F16") && text.contains("layer.safetensors"),
            "{text}"
        );
        assert!(model.is_err(), "the model importer refuses the same file");
        let weight = f32_layer?.weight().expect("a weight").to_vec2::<f32>()?;
        assert_eq!(weight, vec![vec![1e5f32, 1.0]]);
        Ok(())
    }
}
