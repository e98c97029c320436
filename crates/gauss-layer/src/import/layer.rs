//! One `FGN_layer`: its tensors → a [`GaussLayer`] with the same outputs (module docs table).

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::state_dict::{join, state_error, Host, StateDict};
use super::{FgnCovarType, FgnImportOptions, FGN_INV_COVAR_MAX};
use crate::config::{GaussLayerConfig, PrecisionConfig};
use crate::error::{GaussError, Result};
use crate::layer::GaussLayer;
use crate::precision::Precision;
use crate::repair;

/// Relative asymmetry below which a `chol` `inv_covars` with a non-zero upper triangle is
/// taken for a `full` one (a `chol` layer of the original keeps its upper triangle at its
/// initial zeros, or holds unrelated values there; it is never symmetric).
const SYMMETRY_TOLERANCE: f64 = 1e-4;

/// Builds the [`GaussLayer`] equal to the original `FGN_layer` stored under `prefix` (see the
/// module docs for the conventions). The layer has the dtype and device of
/// `{prefix}.centers`; the precision is computed in f64 on the host first.
///
/// `options.non_lin` applies to this layer (the caller drops it for a network's final layer).
///
/// # Shapes
/// `{prefix}.weights` (Z, d), `{prefix}.biases` (Z) (ignored with tied biases),
/// `{prefix}.centers` (Z, d), `{prefix}.inv_covars` (Z) | (Z, 1) (sphere) | (Z, d) (diag) |
/// (Z, d, d) (full, chol).
///
/// # Errors
/// [`GaussError::Checkpoint`] for a missing, non-float or non-finite tensor, an ambiguous or
/// implausible covariance type (a lower-triangular `full`, a symmetric `chol`), a neuron of
/// zero or non-positive-definite precision; [`GaussError::Shape`] naming the tensor;
/// [`GaussError::InvalidConfig`] for `ordinal ≠ 2`.
pub fn fgn_layer_from_tensors(
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    options: &FgnImportOptions,
) -> Result<GaussLayer> {
    options.validate()?;
    let dict = StateDict::new(tensors);
    let centers_key = dict.key(&join(prefix, "centers"));
    let like = dict
        .get(&join(prefix, "centers"))
        .ok_or_else(|| state_error(format!("tensor `{centers_key}` is missing")))?;
    let (device, dtype) = (like.device().clone(), like.dtype());
    let (layer, _) = import_layer(&dict, prefix, options, options.non_lin)?;
    cast_lone_layer(&layer, &device, dtype)
}

/// The layer in f64 on the CPU, and the covariance type read.
pub(crate) fn import_layer(
    dict: &StateDict,
    prefix: &str,
    options: &FgnImportOptions,
    tanh: bool,
) -> Result<(GaussLayer, FgnCovarType)> {
    options.validate()?;
    let name = |n: &str| join(prefix, n);
    let centers = dict.host(&name("centers"))?;
    let (z, d) = match centers.dims[..] {
        [z, d] if z > 0 && d > 0 => (z, d),
        _ => {
            return Err(GaussError::shape(
                format!("tensor `{}`", dict.key(&name("centers"))),
                "(Z, d) with Z, d >= 1",
                &centers.dims,
            ))
        }
    };
    let weights = dict.host_shaped(&name("weights"), &[z, d])?;
    let biases = if options.free_biases {
        Some(dict.host_shaped(&name("biases"), &[z])?)
    } else {
        None
    };
    let inv_key = dict.key(&name("inv_covars"));
    let inv_covars = dict.host(&name("inv_covars"))?;
    let covar_type = resolve_covar_type(options.covar_type, &inv_covars.dims, z, d, &inv_key)?;
    let natural = covar_type.parameterization();
    let parameterization = options.parameterization.unwrap_or(natural);
    let config = GaussLayerConfig {
        precision: PrecisionConfig::with_parameterization(parameterization),
        tanh,
        tied_bias: !options.free_biases,
        ..Default::default()
    };
    config.validate()?;
    let precision = precision_from_inv_covars(
        &inv_covars,
        covar_type,
        z,
        d,
        &config,
        parameterization == natural,
        &inv_key,
    )?;
    let bias = biases.map(|b| b.tensor()).transpose()?;
    let layer = GaussLayer::new(
        Some(weights.tensor()?),
        bias,
        centers.tensor()?,
        precision,
        config,
    )?;
    Ok((layer, covar_type))
}

fn resolve_covar_type(
    given: Option<FgnCovarType>,
    dims: &[usize],
    z: usize,
    d: usize,
    key: &str,
) -> Result<FgnCovarType> {
    let covar_type = match (given, dims) {
        (Some(t), _) => t,
        (None, [zz]) if *zz == z => FgnCovarType::Sphere,
        (None, [zz, 1]) if *zz == z && d != 1 => FgnCovarType::Sphere,
        (None, [zz, dd]) if *zz == z && *dd == d => FgnCovarType::Diag,
        (None, [zz, a, b]) if *zz == z && *a == d && *b == d => {
            return Err(state_error(format!(
                "`{key}` is ({z}, {d}, {d}), which is either covar_type `full` or `chol` (the state dict does not say which): name it (FgnImportOptions::covar_type, CLI --covar)"
            )))
        }
        (None, other) => {
            return Err(GaussError::shape(
                format!("tensor `{key}`"),
                format!("({z}), ({z}, {d}) or ({z}, {d}, {d})"),
                other,
            ))
        }
    };
    let ok = match covar_type {
        FgnCovarType::Sphere => dims == [z] || (dims == [z, 1]),
        FgnCovarType::Diag => dims == [z, d],
        FgnCovarType::Full | FgnCovarType::Chol => dims == [z, d, d],
    };
    if !ok {
        let expected = match covar_type {
            FgnCovarType::Sphere => format!("({z})"),
            FgnCovarType::Diag => format!("({z}, {d})"),
            FgnCovarType::Full | FgnCovarType::Chol => format!("({z}, {d}, {d})"),
        };
        return Err(GaussError::shape(
            format!("tensor `{key}`"),
            format!("{expected} for covar_type `{covar_type}`"),
            dims,
        ));
    }
    Ok(covar_type)
}

/// `P = 2·clamp(A, max = 1e8)²` elementwise (sphere, diag); each value must give a finite,
/// positive precision.
fn squared_scales(values: &[f64], key: &str, d_per_neuron: usize) -> Result<Vec<f64>> {
    values
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            let s = a.min(FGN_INV_COVAR_MAX);
            let p = 2.0 * s * s;
            if p > 0.0 && p.is_finite() {
                Ok(p)
            } else {
                Err(state_error(format!(
                    "`{key}` of neuron {} is {a:e}: the original's neuron is {} (P = 2·inv_covars² = {p:e}), which no Gaussian represents",
                    i / d_per_neuron,
                    if p == 0.0 { "infinitely wide (g = 1 everywhere)" } else { "infinitely narrow" }
                )))
            }
        })
        .collect()
}

/// (Z, d) → (Z, d, d) with the rows on the diagonals.
fn diagonal_matrices(diagonals: &[f64], z: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; z * d * d];
    for n in 0..z {
        for i in 0..d {
            out[n * d * d + i * d + i] = diagonals[n * d + i];
        }
    }
    out
}

fn precision_from_inv_covars(
    inv_covars: &Host,
    covar_type: FgnCovarType,
    z: usize,
    d: usize,
    config: &GaussLayerConfig,
    natural: bool,
    key: &str,
) -> Result<Precision> {
    let a = &inv_covars.data;
    let matrices = |values: Vec<f64>| -> Result<Tensor> {
        Ok(Tensor::from_vec(
            values,
            (z, d, d),
            &candle_core::Device::Cpu,
        )?)
    };
    match covar_type {
        FgnCovarType::Sphere => {
            let p = squared_scales(a, key, 1)?;
            if natural {
                let raw = Tensor::from_vec(p, z, &candle_core::Device::Cpu)?.log()?;
                return Precision::from_raw(raw, d, config);
            }
            let diagonals: Vec<f64> = p.iter().flat_map(|&v| std::iter::repeat_n(v, d)).collect();
            Precision::from_precision_matrix(
                &matrices(diagonal_matrices(&diagonals, z, d))?,
                config,
            )
        }
        FgnCovarType::Diag => {
            let p = squared_scales(a, key, d)?;
            if natural {
                let raw = Tensor::from_vec(p, (z, d), &candle_core::Device::Cpu)?.log()?;
                return Precision::from_raw(raw, d, config);
            }
            Precision::from_precision_matrix(&matrices(diagonal_matrices(&p, z, d))?, config)
        }
        FgnCovarType::Full => {
            if d > 1 && is_lower_triangular(a, z, d) {
                return Err(state_error(format!(
                    "`{key}` is lower triangular with zeros above the diagonal, which is how covar_type `chol` stores its factor; a `full` layer of the original keeps a symmetric matrix. If the model was built with covar_type='chol', import it as `chol`"
                )));
            }
            // q = δᵀ A δ, so m² = 2q = δᵀ (A + Aᵀ) δ.
            let mut p = vec![0.0; z * d * d];
            for n in 0..z {
                for i in 0..d {
                    for j in 0..d {
                        p[n * d * d + i * d + j] =
                            a[n * d * d + i * d + j] + a[n * d * d + j * d + i];
                    }
                }
            }
            let p = matrices(p)?;
            let report = repair::check_positive_definite_matrices(&p)?;
            if let Some(bad) = report.failures().first() {
                return Err(state_error(format!(
                    "`{key}`: A + Aᵀ of neuron {} is not positive definite (smallest eigenvalue {:e}), so the original's exp(−δᵀAδ) grows without bound in some direction and is no Gaussian. If the model was built with covar_type='chol' (also (Z, d, d)), import it as `chol`",
                    bad.neuron, bad.min_eigenvalue
                )));
            }
            if natural {
                // Direct stores raw R with P = (R + Rᵀ)/2: R = 2A gives A + Aᵀ exactly.
                let raw = (inv_covars.tensor()? * 2.0)?;
                return Precision::from_raw(raw, d, config);
            }
            Precision::from_precision_matrix(&p, config)
        }
        FgnCovarType::Chol => {
            if d > 1 && looks_full(a, z, d) {
                return Err(state_error(format!(
                    "`{key}` is symmetric with a non-zero upper triangle, which is how covar_type `full` stores its matrix; `chol` reads only the lower triangle of a factor (the original's chol layers keep zeros or unrelated values above the diagonal). If the model was built with covar_type='full', import it as `full`"
                )));
            }
            // q = δᵀ L Lᵀ δ with L = tril(A), so P = 2 L Lᵀ.
            let mut p = vec![0.0; z * d * d];
            for n in 0..z {
                let l = |i: usize, k: usize| a[n * d * d + i * d + k];
                for i in 0..d {
                    for j in 0..=i {
                        let s: f64 = (0..=j).map(|k| l(i, k) * l(j, k)).sum::<f64>() * 2.0;
                        p[n * d * d + i * d + j] = s;
                        p[n * d * d + j * d + i] = s;
                    }
                }
                if let Some(i) = (0..d).find(|&i| l(i, i) == 0.0) {
                    return Err(state_error(format!(
                        "`{key}` of neuron {n} has a zero on the diagonal (row {i}): P = 2·tril(A)·tril(A)ᵀ is singular, an infinitely wide Gaussian in some direction, which no Gaussian here represents"
                    )));
                }
            }
            Precision::from_precision_matrix(&matrices(p)?, config).map_err(|e| {
                state_error(format!(
                    "`{key}`: P = 2·tril(A)·tril(A)ᵀ cannot be stored: {e}"
                ))
            })
        }
    }
}

/// Every matrix has zeros strictly above the diagonal and some non-zero strictly below.
fn is_lower_triangular(a: &[f64], z: usize, d: usize) -> bool {
    let mut below = false;
    for n in 0..z {
        for i in 0..d {
            for j in 0..d {
                let v = a[n * d * d + i * d + j];
                if j > i && v != 0.0 {
                    return false;
                }
                if j < i && v != 0.0 {
                    below = true;
                }
            }
        }
    }
    below
}

/// Every matrix is symmetric (to [`SYMMETRY_TOLERANCE`] of its largest entry) and some has a
/// non-zero entry above the diagonal.
fn looks_full(a: &[f64], z: usize, d: usize) -> bool {
    let mut upper = false;
    for n in 0..z {
        let m = &a[n * d * d..(n + 1) * d * d];
        let scale = m.iter().fold(0.0f64, |s, v| s.max(v.abs()));
        for i in 0..d {
            for j in i + 1..d {
                let (u, l) = (m[i * d + j], m[j * d + i]);
                if (u - l).abs() > SYMMETRY_TOLERANCE * scale {
                    return false;
                }
                upper |= u != 0.0;
            }
        }
    }
    upper
}

/// Every value of `tensors` (named as in the errors) is finite in `dtype`: a center of 1e300
/// or a weight of 1e39 converted to f32 would become ±∞ and the layer would only produce NaN.
pub(crate) fn check_tensors_fit_dtype(tensors: &[(String, Tensor)], dtype: DType) -> Result<()> {
    let limit = crate::linalg::max_finite(dtype);
    for (name, tensor) in tensors {
        let values = tensor
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        if let Some(i) = values
            .iter()
            .position(|v| !v.is_finite() || v.abs() > limit)
        {
            let v = values[i];
            return Err(state_error(format!(
                "tensor `{name}` (as converted) holds {v:e} at flat index {i}, which is not finite in {dtype:?}; import in a wider dtype (f64)"
            )));
        }
    }
    Ok(())
}

/// [`cast_layer`] for a layer imported on its own, after the check a network's cast runs
/// ([`check_tensors_fit_dtype`]), so a lone layer is refused where the same file imported as
/// a model is.
pub(crate) fn cast_lone_layer(
    layer: &GaussLayer,
    device: &candle_core::Device,
    dtype: DType,
) -> Result<GaussLayer> {
    let mut tensors = Vec::with_capacity(4);
    if let Some(w) = layer.weight() {
        tensors.push(("weight".to_string(), w.clone()));
    }
    if let Some(b) = layer.bias() {
        tensors.push(("bias".to_string(), b.clone()));
    }
    tensors.push(("center".to_string(), layer.center().clone()));
    let precision = layer.precision();
    tensors.push((
        Precision::tensor_name(precision.parameterization()).to_string(),
        precision.raw().clone(),
    ));
    check_tensors_fit_dtype(&tensors, dtype)?;
    cast_layer(layer, device, dtype)
}

/// The same layer with its tensors on `device` in `dtype`.
pub(crate) fn cast_layer(
    layer: &GaussLayer,
    device: &candle_core::Device,
    dtype: DType,
) -> Result<GaussLayer> {
    let move_to = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
    let precision = layer.precision();
    let precision = precision.with_raw(move_to(precision.raw())?)?;
    GaussLayer::new(
        layer.weight().map(move_to).transpose()?,
        layer.bias().map(move_to).transpose()?,
        move_to(layer.center())?,
        precision,
        layer.config().clone(),
    )
}

/// Whether stored biases equal `−W·c` (a layer trained with `free_biases=False` saves the
/// biases of its last forward): to 1e-5 of the largest `|W_zi c_zi|` sum.
pub(crate) fn biases_look_tied(dict: &StateDict, prefix: &str) -> bool {
    let get = |n: &str| dict.host(&join(prefix, n)).ok();
    let (Some(w), Some(c), Some(b)) = (get("weights"), get("centers"), get("biases")) else {
        return false;
    };
    if w.dims != c.dims || w.dims.len() != 2 || b.dims != [w.dims[0]] {
        return false;
    }
    let (z, d) = (w.dims[0], w.dims[1]);
    let mut worst = 0.0f64;
    let mut scale = 0.0f64;
    for n in 0..z {
        let row = n * d..(n + 1) * d;
        let dot: f64 = w.data[row.clone()]
            .iter()
            .zip(&c.data[row.clone()])
            .map(|(x, y)| x * y)
            .sum();
        let size: f64 = w.data[row.clone()]
            .iter()
            .zip(&c.data[row])
            .map(|(x, y)| (x * y).abs())
            .sum();
        worst = worst.max((b.data[n] + dot).abs());
        scale = scale.max(size);
    }
    scale > 0.0 && worst <= 1e-5 * scale
}
