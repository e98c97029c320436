//! Input checks shared by the losses: every tensor argument is checked once, up front, so a
//! wrong call fails with an error naming the argument, the expected shape and the one that
//! came, instead of a broadcast error deep inside a computation.

use candle_core::{DType, Tensor};

use gauss_layer::{check_device, check_dtype, check_float_dtype, GaussError, Result};

/// Checks a batch of samples `x`: rank 2, at least one row, `width` columns when given.
/// Returns `(batch, width)`.
pub(crate) fn samples(x: &Tensor, what: &str, width: Option<usize>) -> Result<(usize, usize)> {
    let expected = || match width {
        Some(d) => format!("(batch, {d})"),
        None => "(batch, features)".to_string(),
    };
    let &[batch, features] = x.dims() else {
        return Err(GaussError::shape(what, expected(), x.dims()));
    };
    if width.is_some_and(|d| d != features) {
        return Err(GaussError::shape(what, expected(), x.dims()));
    }
    if batch == 0 {
        return Err(GaussError::EmptyBatch {
            what: what.to_string(),
            got: x.dims().to_vec(),
        });
    }
    Ok((batch, features))
}

/// Checks that `t` has a float dtype (F16, BF16, F32 or F64): the losses take logarithms and
/// exponentials, which Candle has no integer kernels for (it panics on them).
pub(crate) fn float_dtype(t: &Tensor, what: &str) -> Result<()> {
    check_float_dtype(what, t.dtype())
}

/// Checks a vector of length `len`.
pub(crate) fn vector(v: &Tensor, what: &str, len: usize) -> Result<()> {
    if v.dims() != [len] {
        return Err(GaussError::shape(what, format!("({len})"), v.dims()));
    }
    Ok(())
}

/// Checks a square `(d, d)` matrix.
pub(crate) fn square(m: &Tensor, what: &str, d: usize) -> Result<()> {
    if m.dims() != [d, d] {
        return Err(GaussError::shape(what, format!("({d}, {d})"), m.dims()));
    }
    Ok(())
}

/// Checks the arguments of a single-Gaussian NLL: samples `x` (N, d), a `mean` (d) and a
/// square `factor` (d, d) named `factor_what`, both in `x`'s dtype and on its device. Returns `d`.
pub(crate) fn gaussian_args(
    x: &Tensor,
    mean: &Tensor,
    factor: &Tensor,
    factor_what: &str,
) -> Result<usize> {
    let (_, d) = samples(x, "samples x", None)?;
    float_dtype(x, "samples x")?;
    vector(mean, "mean", d)?;
    square(factor, factor_what, d)?;
    check_dtype("mean", mean, x.dtype(), "samples x")?;
    check_dtype(factor_what, factor, x.dtype(), "samples x")?;
    check_device("mean", mean, x.device(), "samples x")?;
    check_device(factor_what, factor, x.device(), "samples x")?;
    Ok(d)
}

/// Checks a batch of square matrices `(Z, d, d)` with `Z >= 1`, returning `(Z, d)`.
pub(crate) fn square_batch(m: &Tensor, what: &str) -> Result<(usize, usize)> {
    match *m.dims() {
        [z, d, e] if d == e && z > 0 && d > 0 => Ok((z, d)),
        _ => Err(GaussError::shape(
            what,
            "(neurons, d, d) with at least one neuron",
            m.dims(),
        )),
    }
}

/// Checks that the triangular `factor` (d, d) is invertible: every diagonal entry finite and
/// non-zero (its log-determinant is the sum of their logs, so a zero would give ±∞ and NaN
/// gradients). Reads only the d diagonal entries on the host.
pub(crate) fn nonsingular_triangular(factor: &Tensor, what: &str) -> Result<()> {
    nonsingular_triangular_batch(&factor.unsqueeze(0)?, what)
}

/// [`nonsingular_triangular`] for a batch `factors` (Z, d, d), naming the neuron at fault.
/// Reads only the Z·d diagonal entries on the host.
pub(crate) fn nonsingular_triangular_batch(factors: &Tensor, what: &str) -> Result<()> {
    let diagonals = gauss_layer::ops::diagonal(factors)?
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    for (neuron, diagonal) in diagonals.iter().enumerate() {
        if let Some(i) = diagonal.iter().position(|v| !v.is_finite() || *v == 0.0) {
            let whose = if diagonals.len() == 1 {
                String::new()
            } else {
                format!("neuron {neuron}'s ")
            };
            return Err(GaussError::Numerical {
                what: what.to_string(),
                reason: format!(
                    "is singular or not finite: {whose}diagonal entry {i} is {}; a triangular factor needs a finite, non-zero diagonal",
                    diagonal[i]
                ),
            });
        }
    }
    Ok(())
}
