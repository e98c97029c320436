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
//! the host and converted to f64, fixed, then copied back to the original device and dtype.
//! That is a (Z, d, d) transfer each way plus Z eigendecompositions of O(d³): cheap next to
//! a training step for moderate d, but not free; repairing every few steps is often enough.
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

use candle_core::{DType, Device, Tensor, Var};
use faer::{Mat, Side};

use crate::config::Parameterization;
use crate::error::{GaussError, Result};
use crate::precision::Precision;

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

/// Copies a (Z, d, d) tensor to the host as f64, returning (Z, d, row-major values).
pub(crate) fn to_host_matrices(matrices: &Tensor, what: &str) -> Result<(usize, usize, Vec<f64>)> {
    let dims = matrices.dims();
    if dims.len() != 3 || dims[1] != dims[2] {
        return Err(GaussError::shape(what, "(Z, d, d)", dims));
    }
    let values = matrices
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok((dims[0], dims[1], values))
}

/// Builds a tensor from host f64 values on the given device and dtype.
pub(crate) fn from_host(
    values: Vec<f64>,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// The symmetric part of one row-major d×d block as a faer matrix.
pub(crate) fn symmetric_block(values: &[f64], d: usize) -> Mat<f64> {
    Mat::from_fn(d, d, |i, j| 0.5 * (values[i * d + j] + values[j * d + i]))
}

/// Eigenvalues (ascending) and eigenvectors (columns) of a symmetric matrix.
pub(crate) fn symmetric_eigen(matrix: &Mat<f64>) -> Result<(Vec<f64>, Mat<f64>)> {
    let evd = matrix.self_adjoint_eigen(Side::Lower).map_err(|e| {
        GaussError::Candle(candle_core::Error::Msg(format!(
            "symmetric eigendecomposition failed: {e:?}"
        )))
    })?;
    let s = evd.S().column_vector();
    let values = (0..matrix.nrows()).map(|i| s[i]).collect();
    Ok((values, evd.U().to_owned()))
}

/// `U diag(f(λ)) Uᵀ` as row-major values.
pub(crate) fn from_eigen(
    eigenvalues: &[f64],
    eigenvectors: &Mat<f64>,
    map: impl Fn(f64) -> f64,
) -> Vec<f64> {
    let d = eigenvalues.len();
    let mapped: Vec<f64> = eigenvalues.iter().map(|&l| map(l)).collect();
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let v: f64 = (0..d)
                .map(|k| eigenvectors[(i, k)] * mapped[k] * eigenvectors[(j, k)])
                .sum();
            out[i * d + j] = v;
            out[j * d + i] = v;
        }
    }
    out
}

/// Checks `P = (A + Aᵀ)/2` for each of a batch of matrices.
///
/// # Shapes
/// `matrices`: (Z, d, d)
pub fn check_positive_definite_matrices(matrices: &Tensor) -> Result<PdReport> {
    let (z, d, values) = to_host_matrices(matrices, "precision matrices")?;
    let mut neurons = Vec::with_capacity(z);
    for neuron in 0..z {
        let block = symmetric_block(&values[neuron * d * d..(neuron + 1) * d * d], d);
        let (eigenvalues, _) = symmetric_eigen(&block)?;
        let min_eigenvalue = eigenvalues.first().copied().unwrap_or(f64::INFINITY);
        neurons.push(NeuronPd {
            neuron,
            positive_definite: min_eigenvalue > 0.0,
            min_eigenvalue,
        });
    }
    Ok(PdReport { neurons })
}

/// Checks each neuron's precision matrix (the effective one, see
/// [`Precision::precision_matrix`]) for positive definiteness.
pub fn check_positive_definite(precision: &Precision) -> Result<PdReport> {
    let matrices = match precision.parameterization() {
        // The raw tensor is what the optimizer moves; the width floor cannot fix an indefinite
        // base matrix, so look at the base.
        Parameterization::Direct => precision.raw().clone(),
        _ => precision.precision_matrix()?,
    };
    check_positive_definite_matrices(&matrices)
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
/// # Shapes
/// `matrices`: (Z, d, d) → (Z, d, d)
pub fn repair_matrices(matrices: &Tensor, min_eigenvalue: f64) -> Result<Tensor> {
    check_floor(min_eigenvalue)?;
    let (z, d, mut values) = to_host_matrices(matrices, "precision matrices")?;
    for neuron in 0..z {
        let block_values = &mut values[neuron * d * d..(neuron + 1) * d * d];
        if let Some(i) = block_values.iter().position(|v| !v.is_finite()) {
            return Err(GaussError::config(
                "matrices",
                format!(
                    "neuron {neuron} holds a non-finite entry ({} at ({}, {})), which no projection can repair",
                    block_values[i],
                    i / d,
                    i % d
                ),
            ));
        }
        let block = symmetric_block(block_values, d);
        let (eigenvalues, eigenvectors) = symmetric_eigen(&block)?;
        if eigenvalues.iter().all(|&l| l >= min_eigenvalue) {
            continue;
        }
        let fixed = from_eigen(&eigenvalues, &eigenvectors, |l| l.max(min_eigenvalue));
        block_values.copy_from_slice(&fixed);
    }
    from_host(values, matrices.dims(), matrices.dtype(), matrices.device())
}

/// The repaired raw tensor of a precision: for `direct`, [`repair_matrices`] of the raw `A`;
/// the other parameterizations are positive definite by construction and their raw tensor
/// is returned unchanged.
///
/// # Shapes
/// → the raw tensor's shape
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
pub fn repair_var_in_place(var: &Var, min_eigenvalue: f64) -> Result<PdReport> {
    check_floor(min_eigenvalue)?;
    let report = check_positive_definite_matrices(var.as_tensor())?;
    if report
        .neurons
        .iter()
        .any(|n| n.min_eigenvalue.is_nan() || n.min_eigenvalue < min_eigenvalue)
    {
        let repaired = repair_matrices(var.as_tensor(), min_eigenvalue)?;
        var.set(&repaired)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn repair_var_in_place_updates_the_var() {
        let var = Var::new(&[[[-1.0f32, 0.0], [0.0, 2.0]]], &Device::Cpu).unwrap();
        let before = repair_var_in_place(&var, 0.25).unwrap();
        assert!(!before.all_positive_definite());
        let after = var.as_tensor().to_vec3::<f32>().unwrap();
        assert_eq!(after, vec![vec![vec![0.25, 0.0], vec![0.0, 2.0]]]);
    }
}
