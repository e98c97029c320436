//! Import of networks trained with the original PyTorch FGN code (F. Grezes,
//! `Finite_Gaussian_Network_lib`: `FGN_layer`, `Feedforward_FGN_net`).
//!
//! # What the PyTorch code computes
//! Per layer it holds `weights` (Z, d), `biases` (Z), `centers` (Z, d) and `inv_covars`, and
//! computes `y = l(x) · g(x)` with `l = x·Wᵀ + b` (`tanh` of it when `non_lin=True`) and
//! `g = exp(-q)` (no `1/2`), where with `δ = x - c` and `σ = clamp(inv_covars, max = 1e8)`:
//!
//! | `covar_type` | `inv_covars` | `q` | `P` here (`q = m2/2`) |
//! |---|---|---|---|
//! | `sphere` | (Z) | `|δ|² σ_z²` | `2 σ_z² I` |
//! | `diag` | (Z, d) | `Σ_i δ_i² σ_zi²` | `diag(2 σ_z²)` |
//! | `full` | (Z, d, d) | `δᵀ A_z δ` | `A_z + A_zᵀ` (stored as `direct`, raw `2 A_z`) |
//! | `chol` | (Z, d, d) | `δᵀ L_z L_zᵀ δ`, `L_z = tril(A_z)` | `2 L_z L_zᵀ` |
//!
//! Note that sphere and diag *square* `inv_covars`: its sign is irrelevant. With
//! `free_biases=False` the PyTorch layer recomputes `b = -Σ_i W_zi c_zi` on every forward:
//! import such layers with [`FgnImportOptions::free_biases`] `= false` (a tied-bias layer here).
//! Neither `non_lin` nor `free_biases` is in the state dict: say which you used.
//!
//! # Exporting from PyTorch
//! ```python
//! # pip install safetensors
//! from safetensors.torch import save_file
//! state = {k: v.contiguous() for k, v in model.state_dict().items()}
//! save_file(state, "fgn.safetensors")
//! ```
//! A single `FGN_layer` saved this way has keys `weights`, `biases`, `centers`, `inv_covars`
//! (prefix `""`); inside a model they are prefixed by the module path, e.g.
//! `hidden_layers.0.centers`. A `Feedforward_FGN_net` has an input batch norm `ib.*`, hidden
//! modules `hidden_layers.{k}.*` (FGN layers, each followed by a `BatchNorm1d`; `Dropout` has no
//! tensors) and the final layer `fl.*`: [`import_fgn_net`] reads exactly that layout (names
//! configurable through [`FgnNetLayout`]). `num_batches_tracked` is ignored.
//!
//! That network's `forward` does not pass `prev_g` between layers, so [`FgnImportOptions::gate`]
//! defaults to `false`; set it when your model gated layers by the previous layer's Gaussians.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::BatchNorm;

use crate::config::{GaussLayerConfig, Parameterization};
use crate::error::{GaussError, Result};
use crate::layer::GaussLayer;
use crate::net::{GaussNet, GaussNetConfig};
use crate::precision::Precision;

/// The largest `inv_covars` value the PyTorch code uses (`clamp(max = 1/eps)`, `eps = 1e-8`).
pub const FGN_INV_COVAR_MAX: f64 = 1e8;

/// The PyTorch FGN `covar_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FgnCovarType {
    /// `inv_covars` (Z): one scale per neuron.
    Sphere,
    /// `inv_covars` (Z, d).
    Diag,
    /// `inv_covars` (Z, d, d): the precision itself.
    Full,
    /// `inv_covars` (Z, d, d): a factor, `tril` of it times its transpose.
    Chol,
}

/// How to read a PyTorch FGN state dict.
#[derive(Clone, Debug, PartialEq)]
pub struct FgnImportOptions {
    /// The layers' `covar_type`. `None` infers sphere (Z) and diag (Z, d) from the shape; a
    /// (Z, d, d) `inv_covars` needs `Some(Full)` or `Some(Chol)`.
    pub covar_type: Option<FgnCovarType>,
    /// The PyTorch `non_lin` flag (`tanh` on the linear part).
    pub non_lin: bool,
    /// The PyTorch `free_biases` flag; `false` imports a tied-bias layer (`b = -W·c`).
    pub free_biases: bool,
    /// Target parameterization; `None` picks sphere→sphere, diag→diag, full→direct,
    /// chol→cholesky (each exact). Another choice goes through
    /// [`Precision::from_precision_matrix`] and errors if `P` cannot be represented.
    pub parameterization: Option<Parameterization>,
    /// Gate each layer by the previous layer's Gaussians (see the module docs).
    pub gate: bool,
}

impl Default for FgnImportOptions {
    fn default() -> Self {
        Self {
            covar_type: None,
            non_lin: false,
            free_biases: true,
            parameterization: None,
            gate: false,
        }
    }
}

/// Module names of a `Feedforward_FGN_net` state dict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FgnNetLayout {
    /// The input batch norm (`ib`); read when present.
    pub input_norm: String,
    /// The list of hidden modules (`hidden_layers`), indexed `{hidden}.{k}`.
    pub hidden: String,
    /// The final FGN layer (`fl`).
    pub final_layer: String,
}

impl Default for FgnNetLayout {
    fn default() -> Self {
        Self {
            input_norm: "ib".into(),
            hidden: "hidden_layers".into(),
            final_layer: "fl".into(),
        }
    }
}

fn import_error(what: &str, reason: impl Into<String>) -> GaussError {
    GaussError::Checkpoint {
        path: what.to_string(),
        reason: reason.into(),
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn get<'a>(tensors: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    tensors
        .get(key)
        .ok_or_else(|| import_error("state dict", format!("tensor `{key}` is missing")))
}

/// Reads a safetensors state dict, converting every floating tensor to `dtype`.
pub fn load_state_dict(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let tensors =
        candle_core::safetensors::load(path, device).map_err(|e| GaussError::Checkpoint {
            path: path.display().to_string(),
            reason: format!("not a readable safetensors file: {e}"),
        })?;
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = if tensor.dtype().is_float() {
            tensor.to_dtype(dtype)?
        } else {
            tensor
        };
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Builds the [`GaussLayer`] equal to the PyTorch `FGN_layer` stored under `prefix`.
///
/// # Shapes
/// `{prefix}.weights` (Z, d), `{prefix}.biases` (Z), `{prefix}.centers` (Z, d),
/// `{prefix}.inv_covars` (Z) | (Z, 1) | (Z, d) | (Z, d, d)
pub fn fgn_layer_from_tensors(
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    options: &FgnImportOptions,
) -> Result<GaussLayer> {
    let weight = get(tensors, &join(prefix, "weights"))?.clone();
    let center = get(tensors, &join(prefix, "centers"))?.clone();
    let inv_covars = get(tensors, &join(prefix, "inv_covars"))?.clone();
    let (z, d) = match center.dims() {
        [z, d] => (*z, *d),
        other => return Err(GaussError::shape(join(prefix, "centers"), "(Z, d)", other)),
    };
    if weight.dims() != [z, d] {
        return Err(GaussError::shape(
            join(prefix, "weights"),
            format!("({z}, {d}) like `centers`"),
            weight.dims(),
        ));
    }
    let bias = if options.free_biases {
        let bias = get(tensors, &join(prefix, "biases"))?.clone();
        if bias.dims() != [z] {
            return Err(GaussError::shape(
                join(prefix, "biases"),
                format!("({z})"),
                bias.dims(),
            ));
        }
        Some(bias)
    } else {
        None
    };
    let inv_name = join(prefix, "inv_covars");
    let covar_type = match (options.covar_type, inv_covars.dims()) {
        (Some(t), _) => t,
        (None, [zz]) if *zz == z => FgnCovarType::Sphere,
        (None, [zz, 1]) if *zz == z && d != 1 => FgnCovarType::Sphere,
        (None, [zz, dd]) if *zz == z && *dd == d => FgnCovarType::Diag,
        (None, [zz, a, b]) if *zz == z && *a == d && *b == d => {
            return Err(import_error(
                "state dict",
                format!(
                    "`{inv_name}` is (Z, d, d): say whether covar_type is `full` or `chol` (FgnImportOptions::covar_type)"
                ),
            ))
        }
        (None, other) => {
            return Err(GaussError::shape(
                inv_name,
                format!("({z}), ({z}, {d}) or ({z}, {d}, {d})"),
                other,
            ))
        }
    };
    let expected: Vec<usize> = match covar_type {
        FgnCovarType::Sphere if inv_covars.rank() == 2 => vec![z, 1],
        FgnCovarType::Sphere => vec![z],
        FgnCovarType::Diag => vec![z, d],
        FgnCovarType::Full | FgnCovarType::Chol => vec![z, d, d],
    };
    if inv_covars.dims() != expected.as_slice() {
        return Err(GaussError::shape(
            inv_name,
            format!("{expected:?} for covar_type {covar_type:?}"),
            inv_covars.dims(),
        ));
    }
    let natural = match covar_type {
        FgnCovarType::Sphere => Parameterization::Sphere,
        FgnCovarType::Diag => Parameterization::Diag,
        FgnCovarType::Full => Parameterization::Direct,
        FgnCovarType::Chol => Parameterization::Cholesky,
    };
    let parameterization = options.parameterization.unwrap_or(natural);
    let config = GaussLayerConfig {
        parameterization,
        tanh: options.non_lin,
        tied_bias: !options.free_biases,
        ..Default::default()
    };
    config.validate()?;

    let precision = match covar_type {
        FgnCovarType::Sphere | FgnCovarType::Diag => {
            // P = 2 σ², σ = clamp(inv_covars, max = 1e8): the PyTorch code squares σ.
            let sigma = inv_covars.clamp(f64::MIN, FGN_INV_COVAR_MAX)?;
            let scale = (sigma.sqr()? * 2.0)?;
            let scale = if covar_type == FgnCovarType::Sphere {
                scale.flatten_all()?
            } else {
                scale
            };
            let min = scale
                .flatten_all()?
                .min(0)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            if min <= 0.0 || !min.is_finite() {
                return Err(import_error(
                    "state dict",
                    format!("`{inv_name}` holds a zero: a neuron of infinite width is not representable"),
                ));
            }
            if parameterization == natural {
                Precision::from_raw(scale.log()?, d, &config)?
            } else {
                let full = if covar_type == FgnCovarType::Sphere {
                    let eye = Tensor::eye(d, scale.dtype(), scale.device())?;
                    eye.unsqueeze(0)?
                        .broadcast_mul(&scale.reshape((z, 1, 1))?)?
                } else {
                    diag_embed(&scale)?
                };
                Precision::from_precision_matrix(&full, &config)?
            }
        }
        FgnCovarType::Full => {
            // q = δᵀ A δ, so m2 = 2q = δᵀ (A + Aᵀ) δ.
            if parameterization == Parameterization::Direct {
                Precision::from_raw((inv_covars * 2.0)?, d, &config)?
            } else {
                let p = (&inv_covars + inv_covars.transpose(1, 2)?)?;
                Precision::from_precision_matrix(&p, &config)?
            }
        }
        FgnCovarType::Chol => {
            let l = lower_triangle(&inv_covars)?;
            let p = (l.matmul(&l.transpose(1, 2)?)? * 2.0)?;
            Precision::from_precision_matrix(&p, &config)?
        }
    };
    let weight = Some(weight);
    GaussLayer::new(weight, bias, center, precision, config)
}

/// `tril` of a batch of square matrices.
fn lower_triangle(a: &Tensor) -> Result<Tensor> {
    let d = a.dim(1)?;
    let mask = Tensor::tril2(d, a.dtype(), a.device())?;
    Ok(a.broadcast_mul(&mask.unsqueeze(0)?)?)
}

/// (Z, d) → (Z, d, d) diagonal matrices.
fn diag_embed(diag: &Tensor) -> Result<Tensor> {
    let d = diag.dim(1)?;
    let eye = Tensor::eye(d, diag.dtype(), diag.device())?;
    Ok(eye.unsqueeze(0)?.broadcast_mul(&diag.unsqueeze(1)?)?)
}

fn batch_norm_from_tensors(
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    eps: f64,
) -> Result<BatchNorm> {
    let running_mean = get(tensors, &join(prefix, "running_mean"))?.clone();
    let running_var = get(tensors, &join(prefix, "running_var"))?.clone();
    let n = running_mean.elem_count();
    let weight = get(tensors, &join(prefix, "weight"))?.clone();
    let bias = get(tensors, &join(prefix, "bias"))?.clone();
    BatchNorm::new(n, running_mean, running_var, weight, bias, eps)
        .map_err(|e| import_error("state dict", format!("batch norm `{prefix}`: {e}")))
}

/// Imports a `Feedforward_FGN_net` state dict (see the module docs for the layout).
pub fn fgn_net_from_tensors(
    tensors: &HashMap<String, Tensor>,
    layout: &FgnNetLayout,
    options: &FgnImportOptions,
) -> Result<GaussNet> {
    let eps = 1e-5; // torch.nn.BatchNorm1d default
    let input_norm = if tensors.contains_key(&join(&layout.input_norm, "running_mean")) {
        Some(batch_norm_from_tensors(tensors, &layout.input_norm, eps)?)
    } else {
        None
    };
    let hidden_prefix = format!("{}.", layout.hidden);
    let mut indices = BTreeSet::new();
    for key in tensors.keys() {
        if let Some(rest) = key.strip_prefix(&hidden_prefix) {
            let index = rest.split('.').next().and_then(|k| k.parse::<usize>().ok());
            match index {
                Some(k) => {
                    indices.insert(k);
                }
                None => {
                    return Err(import_error(
                        "state dict",
                        format!(
                            "tensor `{key}`: expected `{}.<index>.<name>`",
                            layout.hidden
                        ),
                    ))
                }
            }
        }
    }
    let mut layers = Vec::new();
    let mut norms: Vec<Option<BatchNorm>> = Vec::new();
    for k in indices {
        let prefix = format!("{}.{k}", layout.hidden);
        if tensors.contains_key(&join(&prefix, "inv_covars")) {
            if layers.len() > norms.len() {
                norms.push(None);
            }
            layers.push(fgn_layer_from_tensors(tensors, &prefix, options)?);
        } else if tensors.contains_key(&join(&prefix, "running_mean")) {
            if layers.len() != norms.len() + 1 {
                return Err(import_error(
                    "state dict",
                    format!("batch norm `{prefix}` does not follow an FGN layer"),
                ));
            }
            norms.push(Some(batch_norm_from_tensors(tensors, &prefix, eps)?));
        } else {
            return Err(import_error(
                "state dict",
                format!("module `{prefix}` is neither an FGN layer (`inv_covars`) nor a batch norm (`running_mean`)"),
            ));
        }
    }
    if layers.len() > norms.len() {
        norms.push(None);
    }
    let final_layer = fgn_layer_from_tensors(tensors, &layout.final_layer, options)?;
    let batch_norm = norms.iter().any(Option::is_some);
    if batch_norm && norms.iter().any(Option::is_none) {
        return Err(import_error(
            "state dict",
            "some hidden FGN layers are followed by a batch norm and some are not; GaussNet needs all or none",
        ));
    }
    let hidden: Vec<usize> = layers.iter().map(GaussLayer::out_features).collect();
    let in_features = layers.first().unwrap_or(&final_layer).in_features();
    let layer_config = layers
        .first()
        .map(|l| l.config().clone())
        .unwrap_or_else(|| final_layer.config().clone());
    let config = GaussNetConfig {
        in_features,
        hidden,
        out_features: final_layer.out_features(),
        output_layer: Some(final_layer.config().clone()),
        layer: layer_config,
        input_batch_norm: input_norm.is_some(),
        batch_norm,
        batch_norm_eps: eps,
        dropout: 0.0,
        gate: options.gate,
    };
    layers.push(final_layer);
    GaussNet::from_parts(config, input_norm, layers, norms)
}

/// Reads a `Feedforward_FGN_net` exported to safetensors (see the module docs).
pub fn import_fgn_net(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
    options: &FgnImportOptions,
) -> Result<GaussNet> {
    let path = path.as_ref();
    let tensors = load_state_dict(path, device, dtype)?;
    fgn_net_from_tensors(&tensors, &FgnNetLayout::default(), options).map_err(|e| match e {
        GaussError::Checkpoint { reason, .. } => GaussError::Checkpoint {
            path: path.display().to_string(),
            reason,
        },
        other => other,
    })
}

/// Reads one `FGN_layer` stored under `prefix` of a safetensors state dict.
pub fn import_fgn_layer(
    path: impl AsRef<Path>,
    prefix: &str,
    device: &Device,
    dtype: DType,
    options: &FgnImportOptions,
) -> Result<GaussLayer> {
    let path = path.as_ref();
    let tensors = load_state_dict(path, device, dtype)?;
    fgn_layer_from_tensors(&tensors, prefix, options).map_err(|e| match e {
        GaussError::Checkpoint { reason, .. } => GaussError::Checkpoint {
            path: path.display().to_string(),
            reason,
        },
        other => other,
    })
}
