//! The λ-loss's `tr Σ` of a cholesky layer for [`LANES`] neurons at once: their d×d blocks
//! interleaved element by element (`block[(i·d + j)·LANES + lane]`), so every multiply-add of
//! the triangular inverse and of the gradient products is one vector operation across
//! neurons, whatever d is.
//!
//! faer's blocked routines ([`super::host`]) are the right tool for one large block. For the
//! small blocks of a layer's neurons they spend much of their time in recursion, copies and
//! edge kernels. Measured on one core of the 2-core CI-class machine (f64, per neuron, buffers
//! reused): at d = 64, `L⁻¹` 13.8 µs with faer against 5.5 µs here, and `L⁻¹` with the gradient
//! `tril(Mᵀ M Mᵀ)` 37.7 µs against 20.7 µs; at d = 128 faer wins (139 µs against 155 µs),
//! hence [`MAX_DIM`]. The loops run over lane vectors, [`BLOCK`] products side by side,
//! compiled for AVX2 beside the baseline (bit-identical: `crate::cpu::simd_kernel`, whose type
//! parameter is all the kernels' `T` is for). `cargo bench -p gauss-layer --bench
//! precision_stats` times the op that uses them.
//!
//! Per neuron, with `M = L⁻¹` (lower triangular):
//! - `tr Σ = ‖M‖²_F`, `M[i][j] = (δ_ij − Σ_{j≤k<i} L[i][k] M[k][j]) / L[i][i]`;
//! - `∂tr Σ/∂L = −2 tril(Σ Mᵀ)` with `Σ = Mᵀ M`: `Σ[a][b] = Σ_{k≥a} M[k][a] M[k][b]` (b ≤ a,
//!   mirrored) and `tril(Σ Mᵀ)[i][j] = Σ_{a≤j} Σ[i][a] M[j][a]`.

use std::cell::RefCell;

use crate::cpu::{simd_kernel, Real};

/// Neurons per interleaved group (one AVX-512 register of f64, two of AVX2).
pub(crate) const LANES: usize = 8;

/// Widest block the lane kernels take (measured faster than faer at 64, slower at 128: an
/// interleaved block of 128² lane vectors no longer fits the L2 cache).
pub(crate) const MAX_DIM: usize = 64;

/// One value of each of the [`LANES`] neurons.
pub(crate) type Lane = [f64; LANES];

/// The buffers of one group of lanes, reused from group to group: the triangles the kernels
/// never write (Mᵀ's strict lower, M's and the gradient's strict upper) stay zero after
/// [`Scratch::new`], so nothing is cleared between groups.
pub(crate) struct Scratch {
    d: usize,
    /// The lanes' `L` (lower triangles; see [`Scratch::fill_lower`]).
    lower: Vec<Lane>,
    inverse_t: Vec<Lane>,
    inverse: Vec<Lane>,
    covariance: Vec<Lane>,
    /// `∂tr Σ/∂L` after [`Scratch::trace_covariance`] with `gradient`.
    grad: Vec<Lane>,
}

thread_local! {
    /// Each thread's scratch, kept between calls (a training step runs the statistic twice
    /// per layer; building 5·d² zeroed lane vectors each time cost more than the kernels).
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's scratch for blocks of size `d` (built on first use and when
/// `d` changes).
pub(crate) fn with_scratch<R>(d: usize, f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut scratch = match cell.take() {
            Some(scratch) if scratch.d == d => scratch,
            _ => Scratch::new(d),
        };
        let out = f(&mut scratch);
        cell.replace(Some(scratch));
        out
    })
}

impl Scratch {
    pub(crate) fn new(d: usize) -> Self {
        let zeros = || vec![[0f64; LANES]; d * d];
        Self {
            d,
            lower: zeros(),
            inverse_t: zeros(),
            inverse: zeros(),
            covariance: zeros(),
            grad: zeros(),
        }
    }

    /// Sets the lower triangle of `L` for lanes `0..used` to `value(lane, i, j)` (j ≤ i) and
    /// that of the other lanes to the identity (their results are then d and −2 I).
    pub(crate) fn fill_lower(&mut self, used: usize, value: impl Fn(usize, usize, usize) -> f64) {
        let d = self.d;
        for i in 0..d {
            for j in 0..=i {
                let entry = &mut self.lower[i * d + j];
                for (lane, v) in entry.iter_mut().enumerate() {
                    *v = if lane < used {
                        value(lane, i, j)
                    } else if i == j {
                        1.0
                    } else {
                        0.0
                    };
                }
            }
        }
    }

    /// `tr Σ` of each lane's `L` and, with `gradient`, `∂tr Σ/∂L` for [`Scratch::gradient`].
    pub(crate) fn trace_covariance(&mut self, gradient: bool) -> Lane {
        let d = self.d;
        // Mᵀ, so that every inner loop below walks rows (contiguous lane vectors).
        lower_inverse_transposed::<f64>(&self.lower, &mut self.inverse_t, d);
        let mut trace = [0f64; LANES];
        for value in &self.inverse_t {
            for (t, v) in trace.iter_mut().zip(value) {
                *t += v * v;
            }
        }
        if gradient {
            for i in 0..d {
                for j in 0..=i {
                    self.inverse[i * d + j] = self.inverse_t[j * d + i];
                }
            }
            covariance_from_inverse::<f64>(&self.inverse_t, &mut self.covariance, d);
            trace_covariance_gradient::<f64>(&self.covariance, &self.inverse, &mut self.grad, d);
        }
        trace
    }

    /// `∂tr Σ/∂L[i][j]` of every lane (j ≤ i), after [`Scratch::trace_covariance`] with
    /// `gradient`.
    pub(crate) fn gradient(&self, i: usize, j: usize) -> &Lane {
        &self.grad[i * self.d + j]
    }
}

/// Products computed side by side in the kernels: independent accumulator chains that hide
/// the latency of the vector adds and share the loads of the common operand.
const BLOCK: usize = 4;

/// `acc += a ∘ b` lane by lane.
#[inline(always)]
fn multiply_add(acc: &mut Lane, a: &Lane, b: &Lane) {
    for l in 0..LANES {
        acc[l] += a[l] * b[l];
    }
}

/// `Σ_k shared[k] ∘ others[c][k]` for each `c` (every `others[c]` as long as `shared`).
#[inline(always)]
fn dots<const C: usize>(shared: &[Lane], others: [&[Lane]; C]) -> [Lane; C] {
    let mut acc = [[0f64; LANES]; C];
    let others = others.map(|o| &o[..shared.len()]);
    for (k, s) in shared.iter().enumerate() {
        for c in 0..C {
            multiply_add(&mut acc[c], s, &others[c][k]);
        }
    }
    acc
}

/// [`dots`] for `count ≤ BLOCK` rows `others(c)`, `c < count`, by blocks of [`BLOCK`].
#[inline(always)]
fn dots_of<'a>(
    shared: &[Lane],
    count: usize,
    others: impl Fn(usize) -> &'a [Lane],
) -> [Lane; BLOCK] {
    if count == BLOCK {
        return dots::<BLOCK>(shared, std::array::from_fn(&others));
    }
    let mut out = [[0f64; LANES]; BLOCK];
    for (c, o) in out.iter_mut().enumerate().take(count) {
        *o = dots::<1>(shared, [others(c)])[0];
    }
    out
}

simd_kernel! {
    /// `Mᵀ` with `M = L⁻¹`, column j of `M` (row j of `Mᵀ`) by forward substitution against
    /// the unit vector `e_j`: `M[i][j] = (δ_ij − Σ_{j≤k<i} L[i][k] M[k][j]) / L[i][i]`.
    /// Columns are solved [`BLOCK`] at a time from the block's first index `j₀`: the terms
    /// `k < j` read the still-zero strict lower triangle of `inverse_t`, so they add exactly 0.
    fn lower_inverse_transposed<T: Real>(lower: &[Lane], inverse_t: &mut [Lane], d: usize) {
        for j0 in (0..d).step_by(BLOCK) {
            let count = BLOCK.min(d - j0);
            for i in j0..d {
                let acc = {
                    let rows = &*inverse_t;
                    dots_of(&lower[i * d + j0..i * d + i], count, |c| {
                        &rows[(j0 + c) * d + j0..(j0 + c + 1) * d]
                    })
                };
                let diagonal = lower[i * d + i];
                for (c, acc) in acc.iter().enumerate().take(count) {
                    let j = j0 + c;
                    if i < j {
                        continue;
                    }
                    let start = if i == j { 1.0 } else { 0.0 };
                    let value = &mut inverse_t[j * d + i];
                    for l in 0..LANES {
                        value[l] = (start - acc[l]) / diagonal[l];
                    }
                }
            }
        }
    }
}

simd_kernel! {
    /// `Σ = Mᵀ M` (full, symmetric) from `Mᵀ`: `Σ[a][b] = Σ_{k≥a} Mᵀ[a][k] Mᵀ[b][k]` (b ≤ a).
    fn covariance_from_inverse<T: Real>(inverse_t: &[Lane], covariance: &mut [Lane], d: usize) {
        for a in 0..d {
            let row_a = &inverse_t[a * d + a..(a + 1) * d];
            for b0 in (0..=a).step_by(BLOCK) {
                let count = BLOCK.min(a + 1 - b0);
                let acc = dots_of(row_a, count, |c| &inverse_t[(b0 + c) * d + a..(b0 + c + 1) * d]);
                for (c, acc) in acc.iter().enumerate().take(count) {
                    covariance[a * d + b0 + c] = *acc;
                    covariance[(b0 + c) * d + a] = *acc;
                }
            }
        }
    }
}

simd_kernel! {
    /// `−2 tril(Σ Mᵀ)` into `grad` (strict upper triangle left zero):
    /// `(Σ Mᵀ)[i][j] = Σ_{a≤j} Σ[i][a] M[j][a]`, [`BLOCK`] columns at a time up to the block's
    /// last index (the terms `a > j` read the zero strict upper triangle of `M`).
    fn trace_covariance_gradient<T: Real>(
        covariance: &[Lane],
        inverse: &[Lane],
        grad: &mut [Lane],
        d: usize,
    ) {
        for i in 0..d {
            for j0 in (0..=i).step_by(BLOCK) {
                let count = BLOCK.min(i + 1 - j0);
                let end = j0 + count;
                let acc = dots_of(&covariance[i * d..i * d + end], count, |c| {
                    &inverse[(j0 + c) * d..(j0 + c) * d + end]
                });
                for (c, acc) in acc.iter().enumerate().take(count) {
                    grad[i * d + j0 + c] = acc.map(|v| -2.0 * v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::host;

    /// A lower-triangular block with a positive diagonal and mixed-sign entries, distinct per
    /// `seed`, with garbage above the diagonal (never read).
    fn block(d: usize, seed: usize) -> Vec<f64> {
        (0..d * d)
            .map(|k| {
                let (i, j) = (k / d, k % d);
                let noise = ((k * 7919 + seed * 104_729) % 17) as f64 / 17.0 - 0.5;
                match i.cmp(&j) {
                    std::cmp::Ordering::Equal => 0.5 + (seed + i) as f64 % 5.0 * 0.3,
                    std::cmp::Ordering::Greater => 0.2 * noise,
                    std::cmp::Ordering::Less => 1e3 * noise,
                }
            })
            .collect()
    }

    /// Against faer's inverse and triangular products (host.rs, themselves tested against the
    /// dense definitions), lane by lane, with partial groups, at sizes 1 to `MAX_DIM`, one
    /// scratch reused across groups of different contents (nothing left over from the last).
    #[test]
    fn trace_and_gradient_match_faer_for_every_lane() {
        for d in [1usize, 2, 5, 16, 33, MAX_DIM] {
            let mut scratch = Scratch::new(d);
            for (round, used) in [8usize, 3, 1, 7].into_iter().enumerate() {
                let blocks: Vec<Vec<f64>> = (0..used).map(|s| block(d, s + 10 * round)).collect();
                scratch.fill_lower(used, |lane, i, j| blocks[lane][i * d + j]);
                let trace = scratch.trace_covariance(true);
                for (lane, lower) in blocks.iter().enumerate() {
                    let m = host::lower_inverse(lower, d);
                    let expected_trace: f64 = m.iter().map(|v| v * v).sum();
                    let expected_grad = host::tril_covariance_times_inverse_transpose(&m, d);
                    assert!(
                        (trace[lane] - expected_trace).abs() <= 1e-12 * expected_trace.max(1.0),
                        "d {d} lane {lane}: {} vs {expected_trace}",
                        trace[lane]
                    );
                    let grad_scale = expected_grad.iter().fold(1f64, |m, v| m.max(v.abs()));
                    for i in 0..d {
                        for j in 0..=i {
                            let got = scratch.gradient(i, j)[lane];
                            let expected = -2.0 * expected_grad[i * d + j];
                            assert!(
                                (got - expected).abs() <= 1e-12 * grad_scale,
                                "d {d} lane {lane} ({i}, {j}): {got} vs {expected}"
                            );
                        }
                    }
                }
                // Unused lanes hold the identity: tr Σ = d, gradient −2 I.
                for (unused, &value) in trace.iter().enumerate().skip(used) {
                    assert_eq!(value, d as f64);
                    for i in 0..d {
                        for j in 0..=i {
                            let expected = if i == j { -2.0 } else { 0.0 };
                            assert_eq!(scratch.gradient(i, j)[unused], expected);
                        }
                    }
                }
            }
        }
    }

    /// The value alone (no gradient requested) is the same number.
    #[test]
    fn trace_without_gradient_is_the_same_value() {
        let blocks: Vec<Vec<f64>> = (0..LANES).map(|s| block(12, s)).collect();
        let mut scratch = Scratch::new(12);
        scratch.fill_lower(LANES, |lane, i, j| blocks[lane][i * 12 + j]);
        let with = scratch.trace_covariance(true);
        let without = scratch.trace_covariance(false);
        assert_eq!(with, without);
    }

    /// The same bits at both vector widths (`cpu::simd_kernel!`: baseline and, where the CPU
    /// has it, AVX2).
    #[test]
    fn both_vector_widths_give_the_same_bits() {
        use crate::cpu::{with_width, Width};
        let d = 37;
        let blocks: Vec<Vec<f64>> = (0..6).map(|s| block(d, s)).collect();
        let run = || {
            let mut scratch = Scratch::new(d);
            scratch.fill_lower(blocks.len(), |lane, i, j| blocks[lane][i * d + j]);
            let trace = scratch.trace_covariance(true);
            let grad: Vec<Lane> = (0..d * d)
                .map(|k| *scratch.gradient(k / d, k % d))
                .collect();
            (
                trace.map(f64::to_bits),
                grad.concat()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
            )
        };
        let widest = run();
        assert!(
            with_width(Width::Baseline, run) == widest,
            "the baseline width differs from the default"
        );
    }
}
