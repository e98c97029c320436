//! The one conditioning check behind the automatic choice between the expanded and the
//! projected (or naive) form, on the CPU where reading the parameters costs nothing.
//!
//! The expanded form computes `m2` as a sum of terms of size about `‖P‖ (|x̃| + |c̃|)²` with
//! `x̃ = x − c̄`, `c̃ = c − c̄` (c̄ the mean center), so near a neuron, where `m2` is small,
//! it loses digits in two ways:
//! - the spread of the centers: an absolute error of a few `eps · |c̃_z|² · ‖P_z‖`;
//! - the conditioning of `P`: with `x − c_z = δ`, the terms of `δᵀ P δ` are up to
//!   `‖P‖ |δ|²` while their sum can be as small as `λ_min |δ|²`, a relative error of a few
//!   `eps · κ(P_z)`.
//!
//! [`Conditioning::measure`] bounds both per neuron (`‖P‖_∞` from the factor's norms, `κ`
//! from a LINPACK-style estimate of `‖L⁻¹‖` by one triangular solve with a greedy ±1
//! right-hand side) and [`Conditioning::expanded_is_accurate`] holds when the worst neuron
//! stays within limits that keep the expanded form's error near 1e-5 in f32 and 1e-10 in f64
//! at the unit width scale of `g = exp(−m2/2)`. The projected form keeps its digits in both
//! cases (its error grows with `√κ`, from one product by the factor).

use candle_core::DType;
use rayon::prelude::*;

use super::expanded::Source;
use super::factors::Factors;
use crate::cpu::{row_mean, Real, Sizes};
use crate::linalg::host;

/// Largest `max_z |c̃_z|² ‖P_z‖` for which the expanded form counts as accurate: keeps its
/// absolute error in `m2` near 1e-5 (f32) and 1e-10 (f64).
fn spread_limit(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e5,
        _ => 64.0,
    }
}

/// Largest estimated `κ(P_z)` for which the expanded form counts as accurate: keeps its
/// relative error in `m2` near 1e-5 (f32) and 1e-10 (f64). Measured (ignored test
/// `calibrate_condition_limit`, inputs one Mahalanobis unit from their center, d = 2, 16, 64):
/// the f32 expanded error is about `eps · κ` to `4 eps · κ` (1.0e-6–5.8e-6 at κ = 1e2,
/// 1.1e-5–4.4e-5 at 1e3, 3e-3–9e-2 at 1e6), the projected form's at most 3e-5 up to 1e6.
fn condition_limit(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e5,
        _ => 256.0,
    }
}

/// The worst neuron's two measures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Conditioning {
    /// `max_z |c̃_z|² · ‖P_z‖_∞` (an upper bound of `‖P_z‖_∞` for factors).
    pub spread: f64,
    /// `max_z` of the estimated `κ(P_z) = ‖P_z‖ ‖P_z⁻¹‖` (∞ when a matrix does not factor).
    pub condition: f64,
}

impl Conditioning {
    /// Both measures for the centers and the op's precision input (factor or matrix).
    pub(crate) fn measure<T: Real>(center: &[T], input: &[T], source: Source, s: Sizes) -> Self {
        let dim = s.dim;
        let mean = row_mean(center, s.neurons, dim);
        let factors = match source {
            Source::Factor(map) => Some(Factors::new(input, map, s)),
            Source::Matrix => None,
        };
        // One neuron's [spread, condition] measures; non-finite ones count as infinite.
        let neuron_measures = |z: usize, row: &mut Vec<T>, lower: &mut Vec<f64>| -> [f64; 2] {
            let spread: f64 = center[z * dim..(z + 1) * dim]
                .iter()
                .zip(&mean)
                .map(|(&c, m)| (c.to_f64() - m).powi(2))
                .sum();
            let (norm, inverse_norm) = match &factors {
                Some(factors) => {
                    for i in 0..dim {
                        factors.write_row(z, i, row);
                        for (l, &v) in lower[i * dim..(i + 1) * dim].iter_mut().zip(row.iter()) {
                            *l = v.to_f64();
                        }
                    }
                    let norm = infinity_norm(lower, dim) * one_norm(lower, dim);
                    if factors.is_lower_triangular() {
                        (norm, lower_inverse_norm_estimate(lower, dim).powi(2))
                    } else {
                        let p = gram(lower, dim);
                        (norm, matrix_inverse_norm_estimate(&p, dim))
                    }
                }
                None => {
                    let block = &input[z * dim * dim..(z + 1) * dim * dim];
                    let p: Vec<f64> = (0..dim * dim)
                        .map(|k| {
                            let (i, j) = (k / dim, k % dim);
                            0.5 * (block[i * dim + j].to_f64() + block[j * dim + i].to_f64())
                        })
                        .collect();
                    (
                        infinity_norm(&p, dim),
                        matrix_inverse_norm_estimate(&p, dim),
                    )
                }
            };
            let measures = [spread * norm, norm * inverse_norm];
            if measures.iter().all(|v| v.is_finite()) {
                measures
            } else {
                [f64::INFINITY; 2]
            }
        };
        // O(Z·d²) per call for lower-triangular factors (O(Z·d³) for matrices and other
        // factors, which need a Gram product and a factorization): neurons in parallel (each with its own row buffers), the worst kept.
        let [spread, condition] = (0..s.neurons)
            .into_par_iter()
            .map_init(
                || (vec![T::zero(); dim], vec![0f64; dim * dim]),
                |(row, lower), z| neuron_measures(z, row, lower),
            )
            .reduce(|| [0.0; 2], |a, b| [a[0].max(b[0]), a[1].max(b[1])]);
        Conditioning { spread, condition }
    }

    /// Whether the expanded form keeps its digits in `dtype` (see the module docs).
    pub(crate) fn expanded_is_accurate(&self, dtype: DType) -> bool {
        self.spread <= spread_limit(dtype) && self.condition <= condition_limit(dtype)
    }
}

/// `‖A‖_∞`: the largest absolute row sum of a row-major d×d matrix.
fn infinity_norm(a: &[f64], dim: usize) -> f64 {
    a.chunks_exact(dim.max(1))
        .map(|row| row.iter().map(|v| v.abs()).sum::<f64>())
        .fold(0.0, f64::max)
}

/// `‖A‖_1`: the largest absolute column sum.
fn one_norm(a: &[f64], dim: usize) -> f64 {
    (0..dim)
        .map(|j| (0..dim).map(|i| a[i * dim + j].abs()).sum::<f64>())
        .fold(0.0, f64::max)
}

/// `F Fᵀ` of a row-major d×d matrix.
fn gram(f: &[f64], dim: usize) -> Vec<f64> {
    let mut p = vec![0f64; dim * dim];
    for i in 0..dim {
        for j in 0..=i {
            let v: f64 = f[i * dim..(i + 1) * dim]
                .iter()
                .zip(&f[j * dim..(j + 1) * dim])
                .map(|(a, b)| a * b)
                .sum();
            p[i * dim + j] = v;
            p[j * dim + i] = v;
        }
    }
    p
}

/// An estimate of `‖L⁻¹‖_∞` for a lower-triangular `L` (row-major): solve `L y = b` by
/// forward substitution choosing each `b_i = ±1` against the running sum so that `|y_i|`
/// grows (the LINPACK heuristic); `‖y‖_∞ ≤ ‖L⁻¹‖_∞` and is usually within a small factor.
/// ∞ for a zero or non-finite pivot.
fn lower_inverse_norm_estimate(lower: &[f64], dim: usize) -> f64 {
    let mut y = vec![0f64; dim];
    let mut largest = 0f64;
    for i in 0..dim {
        let sum: f64 = lower[i * dim..i * dim + i]
            .iter()
            .zip(&y[..i])
            .map(|(l, v)| l * v)
            .sum();
        let b = if sum > 0.0 { -1.0 } else { 1.0 };
        let pivot = lower[i * dim + i];
        if pivot == 0.0 || !pivot.is_finite() {
            return f64::INFINITY;
        }
        y[i] = (b - sum) / pivot;
        largest = largest.max(y[i].abs());
    }
    largest
}

/// An estimate of `‖P⁻¹‖` for a symmetric `P` (row-major) through its Cholesky factor in
/// f64; ∞ when `P` is not positive definite (the expanded form cannot be trusted there).
fn matrix_inverse_norm_estimate(p: &[f64], dim: usize) -> f64 {
    match host::cholesky_lower(p, dim) {
        Some(lower) => lower_inverse_norm_estimate(&lower, dim).powi(2),
        None => f64::INFINITY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::factors::FactorMap;

    #[test]
    fn the_estimate_finds_a_diagonal_condition_number() {
        // L = diag(1, 1e-3): P = diag(1, 1e-6), κ = 1e6 exactly.
        let lower = [1.0, 0.0, 0.0, 1e-3];
        let s = Sizes {
            batch: 1,
            dim: 2,
            neurons: 1,
        };
        let center = [0.0, 0.0];
        let m = Conditioning::measure(&center, &lower, Source::Factor(FactorMap::Identity), s);
        assert!((m.condition / 1e6 - 1.0).abs() < 1e-9, "{m:?}");
        assert_eq!(m.spread, 0.0);
        assert!(!m.expanded_is_accurate(DType::F32));
        // The same P as a matrix.
        let p = [1.0, 0.0, 0.0, 1e-6];
        let m = Conditioning::measure(&center, &p, Source::Matrix, s);
        assert!((m.condition / 1e6 - 1.0).abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn identity_precisions_near_their_mean_pass_and_far_centers_fail() {
        let s = Sizes {
            batch: 1,
            dim: 2,
            neurons: 2,
        };
        let eye = [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        let near = [0.5f32, 0.0, -0.5, 0.0];
        let m = Conditioning::measure(&near, &eye, Source::Factor(FactorMap::Identity), s);
        assert!(m.expanded_is_accurate(DType::F32), "{m:?}");
        let far = [50.0f32, 0.0, -50.0, 0.0];
        let m = Conditioning::measure(&far, &eye, Source::Factor(FactorMap::Identity), s);
        assert!(!m.expanded_is_accurate(DType::F32), "{m:?}");
        assert!(m.expanded_is_accurate(DType::F64), "{m:?}");
    }

    #[test]
    fn an_indefinite_matrix_is_never_accurate() {
        let s = Sizes {
            batch: 1,
            dim: 2,
            neurons: 1,
        };
        let p = [1.0f64, 2.0, 2.0, 1.0];
        let m = Conditioning::measure(&[0.0, 0.0], &p, Source::Matrix, s);
        assert!(m.condition.is_infinite() && !m.expanded_is_accurate(DType::F64));
    }
}
