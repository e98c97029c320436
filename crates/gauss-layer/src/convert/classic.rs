//! A whole `Feedforward_Classic_net` state dict → a [`GaussNet`], as the original
//! `convert_classic_to_fgn` builds its FGN state dict: every `Linear` converted, every other
//! module (the batch norms) copied.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{layer_from_parts, ConvertOptions};
use crate::error::Result;
use crate::import::{
    assemble, batch_norm, cast_net, in_file, join, load_state_dict, parse_feedforward, state_error,
    FgnNetLayout, ModuleKind, StateDict,
};
use crate::layer::GaussLayer;
use crate::net::GaussNet;

fn linear(
    dict: &StateDict,
    prefix: &str,
    tanh: bool,
    options: &ConvertOptions,
) -> Result<GaussLayer> {
    let weight = dict.host(&join(prefix, "weight"))?;
    let [z, _] = weight.dims[..] else {
        return Err(crate::error::GaussError::shape(
            format!("tensor `{}`", dict.key(&join(prefix, "weight"))),
            "(out_features, in_features)",
            &weight.dims,
        ));
    };
    let bias = if dict.contains(&join(prefix, "bias")) {
        Some(dict.host_shaped(&join(prefix, "bias"), &[z])?.tensor()?)
    } else {
        None
    };
    layer_from_parts(weight.tensor()?, bias, tanh, options)
}

fn net_in_f64(
    dict: &StateDict,
    layout: &FgnNetLayout,
    options: &ConvertOptions,
) -> Result<GaussNet> {
    if dict.contains(&join(&layout.final_layer, "inv_covars")) {
        return Err(state_error(format!(
            "`{}` is already an FGN layer (it has `inv_covars`): import this state dict instead of converting it",
            dict.key(&layout.final_layer)
        )));
    }
    let classify = |prefix: &str| {
        if dict.contains(&join(prefix, "running_mean")) {
            Some(ModuleKind::Norm)
        } else if dict.contains(&join(prefix, "weight")) {
            Some(ModuleKind::Layer)
        } else {
            None
        }
    };
    let found = parse_feedforward(dict, layout, &classify, "weight", "Feedforward_Classic_net")?;
    let mut hidden = Vec::with_capacity(found.hidden.len());
    for (prefix, norm) in &found.hidden {
        let layer = linear(dict, prefix, options.tanh, options)?;
        let norm = norm
            .as_ref()
            .map(|n| batch_norm(dict, n, layer.out_features(), layout.batch_norm_eps))
            .transpose()?;
        hidden.push((layer, norm));
    }
    let final_layer = linear(dict, &found.final_layer, false, options)?;
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
    assemble(
        input_norm,
        hidden,
        final_layer,
        options.gate,
        layout.batch_norm_eps,
    )
}

/// Converts a `Feedforward_Classic_net` state dict (`ib.*`, `hidden_layers.{k}.weight/bias`
/// and their batch norms, `fl.weight/bias`; the layout of [`crate::import`], a `module.`
/// prefix ignored): each `Linear` becomes a Gaussian layer (see the module docs), each batch
/// norm is kept. The network has the dtype and device of `{final_layer}.weight`; the
/// conversion runs in f64 on the host first.
///
/// # Errors
/// [`crate::GaussError::Checkpoint`] when the state dict is not such a network (listing the
/// prefixes found) or is an FGN state dict already; [`crate::GaussError::Shape`] for a
/// misshapen tensor; [`crate::GaussError::InvalidConfig`] for a non-positive width.
pub fn classic_net_from_tensors(
    tensors: &HashMap<String, Tensor>,
    layout: &FgnNetLayout,
    options: &ConvertOptions,
) -> Result<GaussNet> {
    let dict = StateDict::new(tensors);
    let net = net_in_f64(&dict, layout, options)?;
    let (dtype, device) = dict
        .get(&join(&layout.final_layer, "weight"))
        .map(|t| (t.dtype(), t.device().clone()))
        .unwrap_or((DType::F32, Device::Cpu));
    cast_net(net, &device, dtype)
}

/// Reads a `Feedforward_Classic_net` saved with `safetensors.torch.save_file` and converts it
/// (see [`classic_net_from_tensors`]), on `device` in `dtype`.
///
/// # Errors
/// As [`crate::import::load_state_dict`] and [`classic_net_from_tensors`]; every error names
/// the file.
pub fn convert_classic_net(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
    options: &ConvertOptions,
) -> Result<GaussNet> {
    let path = path.as_ref();
    let result = (|| {
        let tensors = load_state_dict(path, &Device::Cpu, DType::F64)?;
        let dict = StateDict::new(&tensors);
        let net = net_in_f64(&dict, &FgnNetLayout::default(), options)?;
        cast_net(net, device, dtype)
    })();
    result.map_err(|e| in_file(path, e))
}
