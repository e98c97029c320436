//! Positive-definiteness check and repair for the `direct` parameterization.
//!
//! `direct` stores `A` and uses `P = (A + Aᵀ)/2`, which an optimizer step can push out of the
//! positive-definite cone. [`check_positive_definite`] reports, per neuron, whether `P` is
//! positive definite and its smallest eigenvalue; [`repair_positive_definite`] projects every
//! offending `P` back onto the cone with an eigenvalue floor (eigenvalues below the floor are
//! raised to it, eigenvectors kept: the nearest matrix in Frobenius norm with that floor).
//! Call them after optimizer steps, e.g. through [`repair_var_in_place`].
//!
//! # Device round trip
//! The eigendecompositions run on the CPU through `faer`, in f64: the matrices are copied to
//! the host (then converted to f64 there), fixed, then copied back to the original device and
//! dtype. That is a (Z, d, d) transfer each way plus Z eigendecompositions of O(d³): cheap
//! next to a training step for moderate d, but not free; repairing every few steps is often
//! enough. [`ensure_positive_definite`], which the losses call on every step, copies nothing:
//! on a GPU it factors on the device and reads one scalar back.
//!
//! A matrix holding NaN or infinite values is an error here ([`GaussError::Numerical`]),
//! never a NaN repair.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::repair;
//! // One neuron with eigenvalues 3 and -1 (not PD).
//! let a = Tensor::new(&[[[1.0f64, 2.0], [2.0, 1.0]]], &Device::Cpu)?;
//! let report = repair::check_positive_definite_matrices(&a)?;
//! assert!(!report.all_positive_definite());
//! assert!((report.min_eigenvalue() + 1.0).abs() < 1e-12);
//! let fixed = repair::repair_matrices(&a, 1e-3)?;
//! assert!(repair::check_positive_definite_matrices(&fixed)?.all_positive_definite());
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use rayon::prelude::*;

use crate::config::Parameterization;
use crate::error::{check_float_dtype, GaussError, Result};
use crate::layer::GaussLayer;
use crate::linalg::{self, host};
use crate::precision::Precision;
use crate::route::{backend, Backend};

/// Positive-definiteness of one neuron's precision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NeuronPd {
    /// Index of the neuron.
    pub neuron: usize,
    /// Whether every eigenvalue of `P` is `> 0`.
    pub positive_definite: bool,
    /// The smallest eigenvalue of `P`.
    pub min_eigenvalue: f64,
}

/// Per-neuron positive-definiteness of a layer's precisions.
#[derive(Clone, Debug, PartialEq)]
pub struct PdReport {
    /// One entry per neuron, in neuron order.
    pub neurons: Vec<NeuronPd>,
}

impl PdReport {
    /// Whether every neuron's `P` is positive definite.
    pub fn all_positive_definite(&self) -> bool {
        self.neurons.iter().all(|n| n.positive_definite)
    }

    /// The neurons whose `P` is not positive definite.
    pub fn failures(&self) -> Vec<NeuronPd> {
        self.neurons
            .iter()
            .filter(|n| !n.positive_definite)
            .copied()
            .collect()
    }

    /// The smallest eigenvalue over all neurons (`+∞` for an empty layer).
    pub fn min_eigenvalue(&self) -> f64 {
        self.neurons
            .iter()
            .map(|n| n.min_eigenvalue)
            .fold(f64::INFINITY, f64::min)
    }

    /// `Ok` when all are positive definite, otherwise [`GaussError::NotPositiveDefinite`]
    /// naming the first offending neuron.
    ///
    /// # Errors
    /// [`GaussError::NotPositiveDefinite`] naming the first offending neuron.
    pub fn into_result(self) -> Result<()> {
        match self.failures().first() {
            None => Ok(()),
            Some(n) => Err(GaussError::NotPositiveDefinite {
                neuron: n.neuron,
                min_eigenvalue: n.min_eigenvalue,
            }),
        }
    }
}

/// Checks `P = (A + Aᵀ)/2` for each of a batch of matrices.
///
/// # Shapes
/// `matrices`: (Z, d, d)
///
/// # Errors
/// A tensor that is not (Z, d, d) or not of a float dtype; NaN or infinite entries
/// ([`GaussError::Numerical`]).
pub fn check_positive_definite_matrices(matrices: &Tensor) -> Result<PdReport> {
    let (z, d, values) = host::to_host_matrices(matrices, "precision matrices")?;
    // Eigenvalues only, neurons in parallel: this runs after every optimizer step of a
    // `direct` layer.
    let neurons = (0..z)
        .into_par_iter()
        .map(|neuron| -> Result<NeuronPd> {
            let block = host::symmetric_block(&values[neuron * d * d..(neuron + 1) * d * d], d);
            let min_eigenvalue = host::symmetric_eigenvalues(&block, neuron)?
                .into_iter()
                .fold(f64::INFINITY, f64::min);
            Ok(NeuronPd {
                neuron,
                positive_definite: min_eigenvalue > 0.0,
                min_eigenvalue,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PdReport { neurons })
}

/// Checks each neuron's precision matrix (the effective one, see
/// [`Precision::precision_matrix`]) for positive definiteness.
///
/// # Errors
/// As [`check_positive_definite_matrices`]; for expm an overflowing exponential.
pub fn check_positive_definite(precision: &Precision) -> Result<PdReport> {
    let matrices = match precision.parameterization() {
        // The raw tensor is what the optimizer moves; the width floor cannot fix an indefinite
        // base matrix, so look at the base.
        Parameterization::Direct => precision.raw().clone(),
        _ => precision.precision_matrix()?,
    };
    check_positive_definite_matrices(&matrices)
}

/// Errors with [`GaussError::NotPositiveDefinite`] (naming the first offending neuron) when a
/// `direct` precision is not positive definite; every other parameterization is positive
/// definite by construction and passes without work.
///
/// On the CPU this factors each neuron's `(A + Aᵀ)/2` with faer (Z Cholesky factorizations of
/// O(d³/3), no copy of the tensor beyond its f64 view). On other devices (and on the portable
/// path) it factors in tensor ops on the device (a blocked Cholesky) and reads back one
/// scalar, the count of positive pivots, in the working dtype: no (Z, d, d) transfer; only a
/// failure copies the matrices to the host to name the neuron and its eigenvalue.
///
/// # Errors
/// [`GaussError::NotPositiveDefinite`]; a matrix with NaN or infinite entries.
pub fn ensure_positive_definite(precision: &Precision) -> Result<()> {
    if precision.parameterization() != Parameterization::Direct {
        return Ok(());
    }
    let raw = precision.raw();
    // The portable path runs the device-side check on the CPU too (what a GPU runs).
    let route = backend(raw.device(), raw.dtype(), precision.config().portable);
    let all_factor = if route == Backend::CpuFused {
        let (z, d, values) = host::to_host_matrices(raw, "precision matrices")?;
        (0..z).all(|n| host::cholesky_lower(&values[n * d * d..(n + 1) * d * d], d).is_some())
    } else {
        let factor =
            linalg::cholesky_routed(&linalg::symmetrize(raw)?, precision.config().portable)?;
        all_pivots_positive(&linalg::diagonal(&factor)?)?
    };
    if all_factor {
        return Ok(());
    }
    let report = check_positive_definite_matrices(raw)?;
    report.clone().into_result()?;
    // The eigenvalues say positive definite where the factorization failed: the smallest is
    // too close to 0 for the working dtype. Report it as such.
    let worst = report
        .neurons
        .iter()
        .min_by(|a, b| a.min_eigenvalue.total_cmp(&b.min_eigenvalue))
        .copied();
    Err(match worst {
        Some(n) => GaussError::NotPositiveDefinite {
            neuron: n.neuron,
            min_eigenvalue: n.min_eigenvalue,
        },
        None => GaussError::config("precision", "has no neurons"),
    })
}

/// Whether every pivot of a tensor-op Cholesky factorization is `> 0`, NaN-safe on every
/// device: a failed pivot is NaN, and min/max reductions may drop NaN (CUDA's do), so the
/// pivots are first compared `> 0` (NaN compares false) and the smallest of those 0/1 flags
/// is read: one scalar, exact for any count. (A sum of the flags in the working dtype was
/// not: bf16 counts exactly only to 256 and f16 to 2048, so every larger half-precision
/// layer was refused.) The flags are f32, which every device reduces.
fn all_pivots_positive(pivots: &Tensor) -> Result<bool> {
    if pivots.elem_count() == 0 {
        return Ok(true);
    }
    let smallest_flag = pivots
        .gt(&pivots.zeros_like()?)?
        .to_dtype(DType::F32)?
        .min_all()?;
    Ok(linalg::read_scalar(&smallest_flag)? == 1.0)
}

fn check_floor(min_eigenvalue: f64) -> Result<()> {
    if !min_eigenvalue.is_finite() || min_eigenvalue <= 0.0 {
        return Err(GaussError::config(
            "min_eigenvalue",
            format!("must be finite and > 0, got {min_eigenvalue}"),
        ));
    }
    Ok(())
}

/// Projects each `P = (A + Aᵀ)/2` whose smallest eigenvalue is below `min_eigenvalue` onto
/// the matrices with all eigenvalues `≥ min_eigenvalue`; neurons already above the floor keep
/// their `A` unchanged. Returns a tensor on the device and in the dtype of `matrices`.
/// A matrix with a non-finite entry is an error naming the neuron (nothing can repair it).
///
/// The eigenvalues are raised to `min_eigenvalue + 2·u·√d·λ_max` (`u` the dtype's unit
/// roundoff): rounding the repaired matrix to its dtype moves its eigenvalues by at most
/// `u·√d·λ_max` (Weyl's bound on the rounding error's norm), so the matrix stored in its
/// dtype keeps every eigenvalue above `min_eigenvalue` (by at least `u·√d·λ_max`), also for a
/// floor below the dtype's resolution (1e-12 in f32 against λ_max = 3), and the next check
/// ([`repair_var_if_needed`]) finds nothing to repair. Raised to the floor itself, rounding
/// left f32 matrices just below it (0.997e-6 for the floor 1e-6), so every later check
/// repaired them again.
///
/// # Shapes
/// `matrices`: (Z, d, d) → (Z, d, d)
///
/// # Errors
/// A `min_eigenvalue` that is not finite and > 0; as [`check_positive_definite_matrices`];
/// a repaired entry beyond the dtype's largest finite value ([`GaussError::Numerical`]).
pub fn repair_matrices(matrices: &Tensor, min_eigenvalue: f64) -> Result<Tensor> {
    check_floor(min_eigenvalue)?;
    let (_, d, mut values) = host::to_host_matrices(matrices, "precision matrices")?;
    // Neurons in parallel; the first error in neuron order is reported.
    let outcomes: Vec<Result<()>> = values
        .par_chunks_mut((d * d).max(1))
        .enumerate()
        .map(|(neuron, block_values)| {
            repair_block(neuron, block_values, d, min_eigenvalue, matrices.dtype())
        })
        .collect();
    outcomes.into_iter().collect::<Result<()>>()?;
    host::from_host(values, matrices.dims(), matrices.dtype(), matrices.device())
}

/// Repairs one neuron's row-major block in place (see [`repair_matrices`]); the block will be
/// stored in `dtype`.
fn repair_block(
    neuron: usize,
    block_values: &mut [f64],
    d: usize,
    floor: f64,
    dtype: DType,
) -> Result<()> {
    if let Some(i) = block_values.iter().position(|v| !v.is_finite()) {
        return Err(GaussError::Numerical {
            what: "repair_matrices".to_string(),
            reason: format!(
                "neuron {neuron} holds a non-finite entry ({} at ({}, {})), which no projection can repair",
                block_values[i],
                i / d,
                i % d
            ),
        });
    }
    // A Cholesky factorization of sym(P) − floor·I exists exactly when every eigenvalue is
    // above the floor: a fraction of an eigendecomposition's cost for the neurons (most of
    // them after an optimizer step) that need nothing.
    let mut shifted = block_values.to_vec();
    (0..d).for_each(|i| shifted[i * d + i] -= floor);
    if host::cholesky_lower(&shifted, d).is_some() {
        return Ok(());
    }
    let block = host::symmetric_block(block_values, d);
    let (eigenvalues, eigenvectors) = host::symmetric_eigen(&block, neuron)?;
    if eigenvalues.iter().all(|&l| l >= floor) {
        return Ok(());
    }
    let largest = eigenvalues.iter().fold(floor, |m, l| m.max(l.abs()));
    let raised = floor + 2.0 * linalg::unit_roundoff(dtype) * (d as f64).sqrt() * largest;
    let fixed = host::from_eigen(&eigenvalues, &eigenvectors, |l| l.max(raised));
    // A floor (or an input) near the dtype's largest value repairs to entries the dtype
    // cannot hold: they would be stored as ∞ and the "repaired" layer would compute NaN.
    let largest_finite = linalg::max_finite(dtype);
    if let Some(i) = fixed.iter().position(|v| v.abs() > largest_finite) {
        return Err(GaussError::Numerical {
            what: "repair_matrices".to_string(),
            reason: format!(
                "the repaired matrix of neuron {neuron} has the entry {:e} at ({}, {}), beyond the largest finite {dtype:?} ({largest_finite:e}); lower min_eigenvalue (now {floor:e}) or rescale",
                fixed[i],
                i / d,
                i % d
            ),
        });
    }
    block_values.copy_from_slice(&fixed);
    Ok(())
}

/// The repaired raw tensor of a precision: for `direct`, [`repair_matrices`] of the raw `A`;
/// the other parameterizations are positive definite by construction and their raw tensor
/// is returned unchanged.
///
/// # Shapes
/// → the raw tensor's shape
///
/// # Errors
/// As [`repair_matrices`].
pub fn repair_positive_definite(precision: &Precision, min_eigenvalue: f64) -> Result<Tensor> {
    check_floor(min_eigenvalue)?;
    match precision.parameterization() {
        Parameterization::Direct => repair_matrices(precision.raw(), min_eigenvalue),
        _ => Ok(precision.raw().clone()),
    }
}

/// Repairs a `direct` precision stored in a candle [`Var`] (the raw `A`, e.g. from a
/// `VarMap`) in place with [`Var::set`], so the optimizer keeps training the same variable.
/// Returns the report from before the repair.
///
/// # Shapes
/// `var`: (Z, d, d)
///
/// # Errors
/// As [`repair_matrices`]; a `Var::set` failure (another shape or dtype).
pub fn repair_var_in_place(var: &Var, min_eigenvalue: f64) -> Result<PdReport> {
    check_floor(min_eigenvalue)?;
    let report = check_positive_definite_matrices(var.as_tensor())?;
    if below_floor(&report, min_eigenvalue) {
        let repaired = repair_matrices(var.as_tensor(), min_eigenvalue)?;
        var.set(&repaired)?;
    }
    Ok(report)
}

/// Repairs `var` (a `direct` raw precision, (Z, d, d)) only when some neuron's smallest
/// eigenvalue is below `min_eigenvalue`, and says whether it did.
///
/// The test is a Cholesky factorization of `(A + Aᵀ)/2 − min_eigenvalue·I`, which exists
/// exactly when every eigenvalue is above the floor: on the CPU with faer per neuron, on other
/// devices in tensor ops with one scalar read back (NaN-safe). Only a failed test copies the
/// matrices to the host for [`repair_var_in_place`]. After an optimizer step that kept every
/// neuron positive definite (most steps) this costs one factorization and no (Z, d, d)
/// transfer, so a training loop on a GPU can call it after every step.
///
/// # Errors
/// As [`repair_var_in_place`].
pub fn repair_var_if_needed(var: &Var, min_eigenvalue: f64) -> Result<bool> {
    check_floor(min_eigenvalue)?;
    let raw = var.as_tensor();
    // Candle's tensor-op factorization panics on integer tensors.
    check_float_dtype("precision matrices", raw.dtype())?;
    let above_floor = if backend(raw.device(), raw.dtype(), false) == Backend::CpuFused {
        above_floor_on_host(raw, min_eigenvalue)?
    } else {
        above_floor_in_tensor_ops(raw, min_eigenvalue)?
    };
    if above_floor {
        return Ok(false);
    }
    // The factorization fails for an eigenvalue at the floor too, which needs no repair: say
    // whether one was made.
    let report = repair_var_in_place(var, min_eigenvalue)?;
    Ok(below_floor(&report, min_eigenvalue))
}

/// The variables of `varmap` that hold the raw precision of the `direct` layers among
/// `layers`, in the layers' order: what a training loop passes to [`repair_var_if_needed`]
/// after each optimizer step. Found by tensor identity, so any `VarBuilder` prefix works (a
/// `GaussNet` at the root, a layer under `"model.gauss"`). Empty when no layer is `direct`.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use gauss_layer::{gauss_layer, repair, GaussLayerConfig, Parameterization, PrecisionConfig};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let config = GaussLayerConfig {
///     precision: PrecisionConfig {
///         parameterization: Parameterization::Direct,
///         ..Default::default()
///     },
///     ..Default::default()
/// };
/// let layer = gauss_layer(3, 2, config, vb.pp("model").pp("gauss"))?;
/// let direct = repair::direct_vars(&varmap, [&layer])?;
/// assert_eq!(direct.len(), 1);
/// // After each optimizer step:
/// for var in &direct {
///     repair::repair_var_if_needed(var, 1e-3)?;
/// }
/// # Ok::<(), gauss_layer::GaussError>(())
/// ```
///
/// # Errors
/// [`GaussError::Data`] when a `direct` layer's precision is not a variable of `varmap` (the
/// layer was built over another `VarMap`, or loaded from a file without one: it then has
/// nothing to train).
pub fn direct_vars<'a>(
    varmap: &VarMap,
    layers: impl IntoIterator<Item = &'a GaussLayer>,
) -> Result<Vec<Var>> {
    let data = varmap.data().lock().map_err(|_| GaussError::Data {
        origin: "varmap".into(),
        reason: "its lock is poisoned (a thread panicked while holding it)".into(),
    })?;
    layers
        .into_iter()
        .enumerate()
        .filter(|(_, layer)| layer.precision().parameterization() == Parameterization::Direct)
        .map(|(i, layer)| {
            let id = layer.precision().raw().id();
            data.values()
                .find(|var| var.as_tensor().id() == id)
                .cloned()
                .ok_or_else(|| GaussError::Data {
                    origin: "varmap".into(),
                    reason: format!(
                        "the direct precision of layer {i} ({:?}) is not one of its variables (the layer was built over another VarMap, or loaded without one)",
                        layer.precision().raw().dims()
                    ),
                })
        })
        .collect()
}

/// Whether some neuron of `report` has its smallest eigenvalue below `floor` (or NaN).
fn below_floor(report: &PdReport, floor: f64) -> bool {
    report
        .neurons
        .iter()
        .any(|n| n.min_eigenvalue.is_nan() || n.min_eigenvalue < floor)
}

/// Whether every `(A + Aᵀ)/2 − floor·I` of a (Z, d, d) batch has a Cholesky factor (faer).
fn above_floor_on_host(raw: &Tensor, floor: f64) -> Result<bool> {
    let (_, d, values) = host::to_host_matrices(raw, "direct precision")?;
    // Neurons in parallel, as the eigenvalue check this replaces after every step.
    Ok(values.par_chunks((d * d).max(1)).all(|block| {
        let mut shifted: Vec<f64> = (0..d * d)
            .map(|k| 0.5 * (block[k] + block[(k % d) * d + k / d]))
            .collect();
        (0..d).for_each(|i| shifted[i * d + i] -= floor);
        host::cholesky_lower(&shifted, d).is_some()
    }))
}

/// As [`above_floor_on_host`], factoring in tensor ops on the tensor's device.
fn above_floor_in_tensor_ops(raw: &Tensor, floor: f64) -> Result<bool> {
    let d = linalg::square_dim(raw, "direct precision", Some(3))?;
    let eye = linalg::eye_like(d, raw)?;
    let shifted = linalg::symmetrize(raw)?.broadcast_sub(&(eye * floor)?)?;
    all_pivots_positive(&linalg::diagonal(&linalg::cholesky(&shifted)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PrecisionConfig;
    use candle_core::Device;

    /// `direct_vars` finds the direct layers' variables under any prefix, skips the other
    /// parameterizations, and refuses a layer whose precision is not in the map.
    #[test]
    fn direct_vars_are_found_by_identity_under_any_prefix() {
        use crate::config::GaussLayerConfig;
        use crate::layer::gauss_layer;
        use candle_nn::VarBuilder;
        let config = |parameterization| GaussLayerConfig {
            precision: PrecisionConfig {
                parameterization,
                ..Default::default()
            },
            ..Default::default()
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let first = gauss_layer(3, 4, config(Parameterization::Direct), vb.pp("a.b")).unwrap();
        let middle = gauss_layer(4, 4, config(Parameterization::Cholesky), vb.pp("c")).unwrap();
        let last = gauss_layer(4, 2, config(Parameterization::Direct), vb.pp("d")).unwrap();
        let found = direct_vars(&varmap, [&first, &middle, &last]).unwrap();
        let ids: Vec<_> = found.iter().map(|var| var.as_tensor().id()).collect();
        assert_eq!(
            ids,
            vec![first.precision().raw().id(), last.precision().raw().id()]
        );
        // The variable is the layer's tensor: a repair through it is what the layer computes with.
        let broken = Tensor::new(&[[[1.0f32, 2.0], [2.0, 1.0]]; 2], &Device::Cpu).unwrap();
        let small = gauss_layer(2, 2, config(Parameterization::Direct), vb.pp("e")).unwrap();
        let var = direct_vars(&varmap, [&small]).unwrap().remove(0);
        var.set(&broken).unwrap();
        assert!(!check_positive_definite(small.precision())
            .unwrap()
            .all_positive_definite());
        assert!(repair_var_if_needed(&var, 1e-3).unwrap());
        assert!(check_positive_definite(small.precision())
            .unwrap()
            .all_positive_definite());
        // Not one of the map's variables.
        let other = VarMap::new();
        let elsewhere = gauss_layer(
            3,
            2,
            config(Parameterization::Direct),
            VarBuilder::from_varmap(&other, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let err = direct_vars(&varmap, [&middle, &elsewhere]).unwrap_err();
        assert!(matches!(err, GaussError::Data { .. }), "{err}");
        assert!(err.to_string().contains("layer 1 ([2, 3, 3])"), "{err}");
    }

    /// A direct layer's config on the portable path (the tensor-op check GPUs run).
    fn portable_direct() -> crate::config::GaussLayerConfig {
        crate::config::GaussLayerConfig {
            precision: PrecisionConfig {
                parameterization: Parameterization::Direct,
                portable: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn portable_check_catches_nan_pivots() {
        // Issue 21's reproduction: [[1, 2], [2, 1]] (eigenvalues 3 and −1) has a NaN second
        // pivot, which a min reduction may drop; the check must still fail on neuron 1.
        let config = portable_direct();
        for raw in [
            Tensor::new(
                &[[[2.0f32, 0.0], [0.0, 2.0]], [[1.0, 2.0], [2.0, 1.0]]],
                &Device::Cpu,
            )
            .unwrap(),
            Tensor::new(
                &[[[2.0f32, 0.0], [0.0, 2.0]], [[1.0, 2.0], [2.0, 1.0]]],
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap(),
        ] {
            let precision = Precision::from_raw(raw, 2, &config).unwrap();
            match ensure_positive_definite(&precision) {
                Err(GaussError::NotPositiveDefinite { neuron: 1, .. }) => {}
                other => panic!("expected neuron 1 not positive definite, got {other:?}"),
            }
        }
    }

    /// Half-precision layers past 256 (bf16) or 2048 (f16) pivots: the pivots were counted
    /// in the working dtype, which stops counting exactly there, so `P = I/2` was "not
    /// positive definite (smallest eigenvalue 0.5)" and the repair copied to the host on
    /// every call. The check reads the smallest 0/1 flag now.
    #[test]
    fn half_precision_checks_hold_for_many_pivots() {
        let config = portable_direct();
        // Z·d = 8·300 = 2400 pivots: past both limits.
        let (z, d) = (8, 300);
        let half_identity = (Tensor::eye(d, DType::F32, &Device::Cpu).unwrap() * 0.5)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((z, 1, 1))
            .unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let raw = half_identity.to_dtype(dtype).unwrap();
            let precision = Precision::from_raw(raw.clone(), d, &config).unwrap();
            ensure_positive_definite(&precision)
                .unwrap_or_else(|e| panic!("{dtype:?}: I/2 refused: {e}"));
            assert!(above_floor_in_tensor_ops(&raw, 0.25).unwrap(), "{dtype:?}");
            assert!(!above_floor_in_tensor_ops(&raw, 0.75).unwrap(), "{dtype:?}");
            // One failed pivot among the 2400 is still seen.
            let broken = raw
                .slice_assign(
                    &[3..4, 5..6, 5..6],
                    &Tensor::new(&[[[-1.0f32]]], &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
            let precision = Precision::from_raw(broken, d, &config).unwrap();
            match ensure_positive_definite(&precision) {
                Err(GaussError::NotPositiveDefinite { neuron: 3, .. }) => {}
                other => panic!("{dtype:?}: expected neuron 3 refused, got {other:?}"),
            }
        }
    }

    /// Integer matrices are dtype errors in every entry point (`repair_var_if_needed` panicked
    /// in Candle's tensor-op factorization; the others returned `Ok`), and a repair whose
    /// result the dtype cannot hold is refused: f32 entries of 3e38 raised past f32's largest
    /// value, or a floor of 1e300 in f32, came back as ∞.
    #[test]
    fn integer_matrices_and_unrepresentable_repairs_are_errors() {
        let ints = Tensor::zeros((1, 2, 2), DType::U8, &Device::Cpu).unwrap();
        let var = Var::from_tensor(&ints).unwrap();
        for result in [
            repair_var_if_needed(&var, 1e-3).map(|_| ()),
            repair_var_in_place(&var, 1e-3).map(|_| ()),
            repair_matrices(&ints, 1e-3).map(|_| ()),
            check_positive_definite_matrices(&ints).map(|_| ()),
        ] {
            match result {
                Err(GaussError::DType { got: DType::U8, .. }) => {}
                other => panic!("expected a U8 dtype error, got {other:?}"),
            }
        }
        let huge = Tensor::new(&[[[3e38f32, 3e38], [3e38, -3e38]]], &Device::Cpu).unwrap();
        let small = Tensor::new(&[[[1.0f32, 0.0], [0.0, 1.0]]], &Device::Cpu).unwrap();
        for (matrices, floor) in [(&huge, 1e-3), (&small, 1e300)] {
            match repair_matrices(matrices, floor) {
                Err(GaussError::Numerical { reason, .. }) => {
                    assert!(reason.contains("beyond the largest finite F32"), "{reason}")
                }
                other => panic!("floor {floor:e}: expected a Numerical error, got {other:?}"),
            }
        }
        // A floor the dtype holds still repairs.
        assert!(repair_matrices(&huge.affine(1e-30, 0.0).unwrap(), 1e-3).is_ok());
    }

    #[test]
    fn repair_if_needed_leaves_good_matrices_alone() {
        // diag(2, 3) is above the floor 0.5: untouched. [[1, 2], [2, 1]] (eigenvalue −1) is
        // repaired to [[1.75, 1.25], [1.25, 1.75]] (see the test above).
        let good = Var::new(&[[[2.0f64, 0.1], [0.0, 3.0]]], &Device::Cpu).unwrap();
        assert!(!repair_var_if_needed(&good, 0.5).unwrap());
        assert_eq!(
            good.as_tensor().to_vec3::<f64>().unwrap(),
            vec![vec![vec![2.0, 0.1], vec![0.0, 3.0]]]
        );
        let bad = Var::new(&[[[1.0f64, 2.0], [2.0, 1.0]]], &Device::Cpu).unwrap();
        assert!(repair_var_if_needed(&bad, 0.5).unwrap());
        let fixed = bad.as_tensor().to_vec3::<f64>().unwrap();
        assert!((fixed[0][0][0] - 1.75).abs() < 1e-12 && (fixed[0][0][1] - 1.25).abs() < 1e-12);
        // An eigenvalue above 0 but below the floor also counts: diag(0.1, 1) → floor 0.5.
        let low = Var::new(&[[[0.1f64, 0.0], [0.0, 1.0]]], &Device::Cpu).unwrap();
        // The device route (tensor-op factorization, what GPUs run) agrees with the host's.
        for (raw, expected) in [(good.as_tensor(), true), (low.as_tensor(), false)] {
            assert_eq!(above_floor_in_tensor_ops(raw, 0.5).unwrap(), expected);
            assert_eq!(above_floor_on_host(raw, 0.5).unwrap(), expected);
        }
        let indefinite = Tensor::new(&[[[1.0f32, 2.0], [2.0, 1.0]]], &Device::Cpu).unwrap();
        assert!(!above_floor_in_tensor_ops(&indefinite, 0.5).unwrap());
        assert!(repair_var_if_needed(&low, 0.5).unwrap());
        // Raised to the floor plus the rounding margin 2·u·√2·1 (3e-16 in f64).
        let fixed = low.as_tensor().to_vec3::<f64>().unwrap();
        assert!(
            fixed[0][0][0] > 0.5 && fixed[0][0][0] - 0.5 < 1e-15,
            "{fixed:?}"
        );
        assert_eq!(
            (fixed[0][0][1], fixed[0][1][0], fixed[0][1][1]),
            (0.0, 0.0, 1.0)
        );
        // Repaired, it is above the floor: the next check repairs nothing.
        assert!(!repair_var_if_needed(&low, 0.5).unwrap());
        assert_eq!(low.as_tensor().to_vec3::<f64>().unwrap(), fixed);
        // An eigenvalue exactly at the floor fails the factorization but needs no repair:
        // nothing changes, and the call says so.
        let at_floor = Var::new(&[[[0.5f64, 0.0], [0.0, 1.0]]], &Device::Cpu).unwrap();
        assert!(!repair_var_if_needed(&at_floor, 0.5).unwrap());
        assert_eq!(
            at_floor.as_tensor().to_vec3::<f64>().unwrap(),
            vec![vec![vec![0.5, 0.0], vec![0.0, 1.0]]]
        );
    }

    #[test]
    fn repaired_matrices_stay_above_the_floor_in_their_dtype() {
        // [[1, 2], [2, 1]] (eigenvalues 3, −1) repaired to the floor 1e-12: raised exactly to
        // it, the matrix is 1.5·[[1, 1], [1, 1]] + O(1e-12), which f32 rounds to a singular
        // matrix. The margin of `repair_matrices` keeps it positive definite in f32 and f64.
        for dtype in [DType::F32, DType::F64] {
            let a = Tensor::new(&[[[1.0f64, 2.0], [2.0, 1.0]]], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let fixed = repair_matrices(&a, 1e-12).unwrap();
            assert_eq!(fixed.dtype(), dtype);
            let report = check_positive_definite_matrices(&fixed).unwrap();
            let smallest = report.neurons[0].min_eigenvalue;
            assert!(
                smallest >= 1e-12,
                "{dtype:?}: smallest eigenvalue {smallest:e}"
            );
            ensure_positive_definite(
                &Precision::from_raw(
                    fixed,
                    2,
                    PrecisionConfig::with_parameterization(Parameterization::Direct),
                )
                .unwrap(),
            )
            .unwrap();
        }
    }

    #[test]
    fn repaired_f32_matrices_stay_above_a_floor_above_the_resolution() {
        // Indefinite f32 blocks A_ij = sin(1.3 i + 0.7 j + 5 n) − 0.2 (fixed values) repaired to
        // the floor 1e-6: raised exactly to it, rounding to f32 left their smallest eigenvalue
        // just below it (e.g. 0.9975e-6), so `repair_var_if_needed` repaired them again on
        // every call. Now they stay above the floor in f32 and a second call does nothing.
        let floor = 1e-6;
        for d in [2usize, 3, 4, 8] {
            let values: Vec<f32> = (0..3 * d * d)
                .map(|k| {
                    let (n, i, j) = (k / (d * d), k % (d * d) / d, k % d);
                    ((1.3 * i as f64 + 0.7 * j as f64 + 5.0 * n as f64).sin() - 0.2) as f32
                })
                .collect();
            let a = Tensor::from_vec(values, (3, d, d), &Device::Cpu).unwrap();
            assert!(!check_positive_definite_matrices(&a)
                .unwrap()
                .all_positive_definite());
            let fixed = repair_matrices(&a, floor).unwrap();
            assert_eq!(fixed.dtype(), DType::F32);
            let smallest = check_positive_definite_matrices(&fixed)
                .unwrap()
                .min_eigenvalue();
            assert!(smallest >= floor, "d {d}: smallest eigenvalue {smallest:e}");
            let var = Var::from_tensor(&fixed).unwrap();
            assert!(!repair_var_if_needed(&var, floor).unwrap(), "d {d}");
            assert_eq!(
                var.as_tensor().to_vec3::<f32>().unwrap(),
                fixed.to_vec3::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn report_names_the_smallest_eigenvalue() {
        // diag(2, 3) is PD (min 2); [[0, 1], [1, 0]] has eigenvalues ±1.
        let a = Tensor::new(
            &[[[2.0f64, 0.0], [0.0, 3.0]], [[0.0, 1.0], [1.0, 0.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let report = check_positive_definite_matrices(&a).unwrap();
        assert!(report.neurons[0].positive_definite);
        assert!((report.neurons[0].min_eigenvalue - 2.0).abs() < 1e-12);
        assert!(!report.neurons[1].positive_definite);
        assert!((report.neurons[1].min_eigenvalue + 1.0).abs() < 1e-12);
        match report.into_result() {
            Err(GaussError::NotPositiveDefinite { neuron, .. }) => assert_eq!(neuron, 1),
            other => panic!("expected NotPositiveDefinite, got {other:?}"),
        }
    }

    #[test]
    fn repair_raises_eigenvalues_and_keeps_good_neurons() {
        // Neuron 1: eigenvalues 1 ± 2 along (1, ±1)/√2; the floor 0.5 replaces -1 by 0.5:
        // P = 3 vvᵀ + 0.5 wwᵀ = [[1.75, 1.25], [1.25, 1.75]].
        let a = Tensor::new(
            &[[[2.0f64, 0.1], [0.0, 3.0]], [[1.0, 2.0], [2.0, 1.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let fixed = repair_matrices(&a, 0.5).unwrap().to_vec3::<f64>().unwrap();
        assert_eq!(fixed[0], vec![vec![2.0, 0.1], vec![0.0, 3.0]]);
        let expected = [[1.75, 1.25], [1.25, 1.75]];
        for i in 0..2 {
            for j in 0..2 {
                assert!((fixed[1][i][j] - expected[i][j]).abs() < 1e-12);
            }
        }
        assert!(repair_matrices(&a, 0.0).is_err());
    }

    #[test]
    fn nan_matrices_are_errors_not_nan_repairs() {
        let a = Tensor::new(&[[[f64::NAN, 0.0], [0.0, 1.0]]], &Device::Cpu).unwrap();
        assert!(matches!(
            repair_matrices(&a, 0.1),
            Err(GaussError::Numerical { .. })
        ));
        assert!(check_positive_definite_matrices(&a).is_err());
    }

    #[test]
    fn ensure_positive_definite_names_the_neuron() {
        use crate::config::GaussLayerConfig;
        let config = GaussLayerConfig::with_parameterization(Parameterization::Direct);
        let good = Tensor::new(&[[[2.0f32, 0.5], [0.5, 1.0]]], &Device::Cpu).unwrap();
        let both = Tensor::new(
            &[[[2.0f32, 0.5], [0.5, 1.0]], [[1.0, 2.0], [2.0, 1.0]]],
            &Device::Cpu,
        )
        .unwrap();
        ensure_positive_definite(&Precision::from_raw(good, 2, &config).unwrap()).unwrap();
        match ensure_positive_definite(&Precision::from_raw(both, 2, &config).unwrap()) {
            Err(GaussError::NotPositiveDefinite {
                neuron: 1,
                min_eigenvalue,
            }) => assert!((min_eigenvalue + 1.0).abs() < 1e-6),
            other => panic!("expected neuron 1 not positive definite, got {other:?}"),
        }
    }

    #[test]
    fn repair_var_in_place_updates_the_var() {
        let var = Var::new(&[[[-1.0f32, 0.0], [0.0, 2.0]]], &Device::Cpu).unwrap();
        let before = repair_var_in_place(&var, 0.25).unwrap();
        assert!(!before.all_positive_definite());
        // The floor 0.25 plus the margin 2·u·√2·2 (3.4e-7 in f32) for rounding.
        let after = var.as_tensor().to_vec3::<f32>().unwrap();
        assert!(
            after[0][0][0] > 0.25 && after[0][0][0] < 0.250001,
            "{after:?}"
        );
        assert_eq!(
            (after[0][0][1], after[0][1][0], after[0][1][1]),
            (0.0, 0.0, 2.0)
        );
    }
}
