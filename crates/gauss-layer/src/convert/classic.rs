//! A whole `Feedforward_Classic_net` state dict → a [`GaussNet`], as the original
//! `convert_classic_to_fgn` builds its FGN state dict: every `Linear` converted, every other
//! module (the batch norms) copied.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{layer_from_parts, ConvertOptions};
use crate::error::{GaussError, Result};
use crate::import::{
    assemble_feedforward, join, net_from_file, net_from_tensors, FgnNetLayout, NetKind, StateDict,
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
        return Err(GaussError::shape(
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

/// The network in f64 on the CPU (the layout and assembly of [`crate::import`]).
fn net_in_f64(
    dict: &StateDict,
    layout: &FgnNetLayout,
    options: &ConvertOptions,
) -> Result<(GaussNet, ())> {
    let mut read_layer =
        |prefix: &str, is_final: bool| linear(dict, prefix, options.tanh && !is_final, options);
    let (net, _) = assemble_feedforward(
        dict,
        layout,
        NetKind::Classic,
        options.gate,
        &mut read_layer,
    )?;
    Ok((net, ()))
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
    let build = |dict: &StateDict| net_in_f64(dict, layout, options);
    let like = |_: &()| join(&layout.final_layer, "weight");
    Ok(net_from_tensors(tensors, build, like)?.0)
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
    let build = |dict: &StateDict| net_in_f64(dict, &FgnNetLayout::default(), options);
    Ok(net_from_file(path.as_ref(), device, dtype, build)?.0)
}
