//! The FGN initial raw tensor: `P ≈ scale · I` with a tiny symmetric random perturbation.

use candle_core::{DType, Device, Tensor};

use super::inverse::raw_from_precision_block;
use super::Precision;
use crate::config::{GaussLayerConfig, Parameterization, PrecisionConfig};
use crate::error::{GaussError, Result};
use crate::init::{self, InitStream};
use crate::linalg::host;

/// The standard normal noise of the perturbation: `count` values from the seeded host
/// stream, or from Candle's generator on `device` (read back to the host) without a seed.
fn noise(config: &GaussLayerConfig, count: usize, device: &Device) -> Result<Vec<f64>> {
    match config.init.seed {
        Some(seed) => {
            let mut rng = init::stream_rng(seed, InitStream::Precision);
            init::normal(&mut rng, count, 0.0, 1.0)
        }
        None => host::to_host_values(&Tensor::randn(0f32, 1f32, count, device)?),
    }
}

/// `log(scale · (1 + eps · n))`, the perturbed log-precision of one draw `n`; an `eps` so
/// large that `1 + eps · n ≤ 0` is named (the log would be NaN, refused later as a raw value
/// with no word about the perturbation).
fn perturbed_log(scale: f64, eps: f64, n: f64) -> Result<f64> {
    let factor = 1.0 + eps * n;
    if factor > 0.0 {
        return Ok((scale * factor).ln());
    }
    Err(perturbation_too_large(
        eps,
        format!("1 + perturbation · n = {factor:e} ≤ 0 for the draw n = {n:.3}"),
    ))
}

fn perturbation_too_large(eps: f64, why: String) -> GaussError {
    GaussError::config(
        "init.perturbation",
        format!(
            "{eps} is too large: {why}, so the initial precision is not positive definite; it is meant to be tiny (the default is 1e-3)"
        ),
    )
}

/// direct stores `P` itself, so its initial diagonal (`scale` perturbed) must be a normal
/// number of the dtype: a smaller one rounds towards 0 when cast (`precision_scale` 1e-300 in
/// f32 gave `P = 0`). The other forms store logarithms or factors, which the raw-value bounds
/// check ([`super::bounds`]) covers.
fn check_direct_diagonal(
    raw: &[f64],
    d: usize,
    dtype: DType,
    scale: f64,
    neuron: usize,
) -> Result<()> {
    let smallest = crate::linalg::min_positive_normal(dtype);
    match (0..d).map(|i| raw[i * d + i]).find(|&v| v < smallest) {
        None => Ok(()),
        Some(v) => Err(GaussError::config(
            "init.precision_scale",
            format!(
                "{scale:e} is too small for a direct precision in {dtype:?}: neuron {neuron} would start with the diagonal entry {v:e}, below the smallest normal {dtype:?} ({smallest:e}), which rounds towards 0"
            ),
        )),
    }
}

/// diag, sphere, lowrank and expm store `ln P` (diag's `θ = ln scale` at the start), which
/// the raw-value bounds keep within `±½ ln M` of the dtype ([`super::bounds`]). In f16 that is
/// ±5.5449 (P between 1/255.9 and 255.9), so the default scale `1/d` does not fit past d = 255: say
/// so in the init's terms, with the ways out, rather than as a raw value out of range.
fn check_log_scale(config: &GaussLayerConfig, scale: f64, d: usize, dtype: DType) -> Result<()> {
    let stores_log = matches!(
        config.precision.parameterization,
        Parameterization::Diag
            | Parameterization::Sphere
            | Parameterization::LowRank { .. }
            | Parameterization::Expm
    );
    let bound = super::bounds::log_bound(dtype);
    // A scale that is not positive and finite is the config validation's to refuse.
    let log = scale.ln();
    if !stores_log || !log.is_finite() || log.abs() <= bound {
        return Ok(());
    }
    let given = match config.init.precision_scale {
        Some(_) => format!("{scale:e}"),
        None => format!("the default 1/d = {scale:e} (d = {d})"),
    };
    Err(GaussError::config(
        "init.precision_scale",
        format!(
            "{given} does not fit the {} parameterization in {dtype:?}: it stores ln P, which {dtype:?} holds within ±{bound:.4} (P from {:.4e} to {:.4e}); set init.precision_scale within that range{}",
            config.precision.parameterization,
            (-bound).exp(),
            bound.exp(),
            // A wider dtype widens the range, where there is one.
            match dtype {
                DType::F16 => ", or build the layer in f32",
                // bf16's range is f32's: only f64 widens it.
                DType::BF16 | DType::F32 => ", or build the layer in f64",
                _ => "",
            }
        ),
    ))
}

impl Precision {
    /// The FGN initial raw tensor: `P ≈ scale · I` with a tiny symmetric random perturbation
    /// of relative size `config.init.perturbation` (`scale = config.init.precision_scale`,
    /// default `1/d`), mapped through the inverse of the parameterization. The noise comes from
    /// the seeded host stream of the precision when `config.init.seed` is set (the same bits
    /// on every device), else from Candle's generator on `device`.
    ///
    /// diag and sphere draw and build only their (Z, d) and (Z) values. The full forms map
    /// one d×d block at a time on the host (f64, faer), so the host holds one block in f64
    /// beside the result.
    ///
    /// # Shapes
    /// → the raw shape for (Z, d) (see [`Precision::raw_shape`])
    ///
    /// # Errors
    /// Invalid sizes or config; a `precision_scale` whose matrix the parameterization cannot
    /// represent (e.g. below the Cholesky `factor_diag_floor`).
    pub fn initial_raw(
        z: usize,
        d: usize,
        config: &GaussLayerConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        config.validate_sizes(d, z)?;
        let scale = config.init.precision_scale.unwrap_or(1.0 / d as f64);
        let eps = config.init.perturbation;
        let shape = Self::raw_shape(config.precision.parameterization, z, d);
        check_log_scale(config, scale, d, dtype)?;
        let values = match config.precision.parameterization {
            // log p = log(scale · (1 + eps · n)), one draw per diagonal entry (diag) or neuron.
            Parameterization::Diag | Parameterization::Sphere => {
                let count = shape.iter().product();
                noise(config, count, device)?
                    .into_iter()
                    .map(|n| perturbed_log(scale, eps, n))
                    .collect::<Result<_>>()?
            }
            // θ as for diag; U = 0.1 · √(scale/d) · N, so each column adds about 1% of the
            // diagonal along its direction (‖u‖² ≈ 0.01 · scale) whatever d: a small low-rank
            // term with a gradient (at U = 0 the gradient of m2 with respect to U, 2 δ δᵀ U,
            // would vanish), not a random narrowing of the Gaussian at the start.
            Parameterization::LowRank { rank } => {
                let noise = noise(config, z * d * (rank + 1), device)?;
                let column_scale = 0.1 * (scale / d as f64).sqrt();
                let mut values = Vec::with_capacity(noise.len());
                for row in noise.chunks_exact(rank + 1) {
                    values.push(perturbed_log(scale, eps, row[0])?);
                    values.extend(row[1..].iter().map(|n| column_scale * n));
                }
                values
            }
            _ => {
                let noise = noise(config, z * d * d, device)?;
                // The initial P is the base precision: no width floor in the inverse map.
                let base_config = PrecisionConfig {
                    width_floor: None,
                    ..config.precision
                };
                let mut values = Vec::with_capacity(z * d * d);
                let mut block = vec![0.0; d * d];
                for neuron in 0..z {
                    let n = &noise[neuron * d * d..(neuron + 1) * d * d];
                    for i in 0..d {
                        for j in 0..d {
                            let eye = if i == j { 1.0 } else { 0.0 };
                            let off = 0.5 * (n[i * d + j] + n[j * d + i]);
                            block[i * d + j] = scale * (eye + eps * off);
                        }
                    }
                    let raw = raw_from_precision_block(&block, d, base_config, neuron, 0.0)
                        .map_err(|e| match e {
                            GaussError::NotPositiveDefinite { .. } if eps > 0.0 => {
                                perturbation_too_large(
                                    eps,
                                    format!("the perturbed matrix of neuron {neuron} has a non-positive eigenvalue ({e})"),
                                )
                            }
                            other => other,
                        })?;
                    if config.precision.parameterization == Parameterization::Direct {
                        // direct keeps the block as it is, so the perturbation's effect is
                        // checked here, as the factoring forms' inverse map checks it: else a
                        // perturbation that breaks P was reported as a scale too small for
                        // the diagonal it had made negative.
                        if eps > 0.0 && host::cholesky_lower(&raw, d).is_none() {
                            return Err(perturbation_too_large(
                                eps,
                                format!("the perturbed matrix of neuron {neuron} is not positive definite"),
                            ));
                        }
                        check_direct_diagonal(&raw, d, dtype, scale, neuron)?;
                    }
                    values.extend(raw);
                }
                values
            }
        };
        host::from_host(values, &shape, dtype, device)
    }
}
