//! An unbiased estimate of `tr Σ` for cholesky precisions (Hutchinson): for probes `V`
//! (d × k) with independent ±1 entries, `E[‖L⁻¹V‖²_F / k] = tr(L⁻ᵀL⁻¹) = tr Σ`.
//!
//! The exact `tr Σ` needs a triangular inverse and, for its gradient, `tril(Mᵀ M Mᵀ)` with
//! `M = L⁻¹`: about 2.7 d³ multiply-adds per neuron and step, which at MNIST width
//! (d = 784, Z = 64) is ~80 G per step and dominates training. The estimate needs two
//! triangular solves with k right-hand sides and one d × k × d product: about 2 d² k, so
//! 1/60 of the exact cost at d = 784, k = 16. Its gradient,
//! `∂(‖W‖²/k)/∂L = −(2/k) tril(L⁻ᵀ W Wᵀ)` with `W = L⁻¹V`, is the exact gradient of the
//! estimate, so it is an unbiased estimate of the exact gradient: stochastic gradient
//! descent sees only a little more noise. The variance of one estimate is
//! `2(‖Σ‖²_F − Σᵢ Σᵢᵢ²)/k` (Rademacher probes).
//!
//! The fused CPU op below works from the raw tensor (the positive map of the diagonal
//! included, as the statistics op does); its portable twin is [`estimate_in_tensor_ops`],
//! which GPUs run (through the routed triangular inverse: the CUDA kernel, or the tensor-op
//! recursion on Metal and with `portable: true`; O(d³), the same value and gradient).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::maps;
use crate::config::PositiveMap;
use crate::cpu::{row_major, with_row_major, Real};
use crate::error::{GaussError, Result};
use crate::linalg;
use crate::linalg::host;

/// The Candle op: inputs raw (Z, d, d) and probes (Z, d, k), output (Z) estimates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TraceCovarianceEstimate {
    pub positive_map: PositiveMap,
    pub floor: f64,
}

/// `(L, W = L⁻¹V)` of one neuron, row-major in f64 (L: d × d, W: d × k).
fn solve(
    map: TraceCovarianceEstimate,
    raw: &[f64],
    probes: &[f64],
    d: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut lower = vec![0f64; d * d];
    for i in 0..d {
        lower[i * d..i * d + i].copy_from_slice(&raw[i * d..i * d + i]);
        lower[i * d + i] = maps::value(map.positive_map, raw[i * d + i]) + map.floor;
    }
    let mut w = probes.to_vec();
    host::solve_lower_in_place(&lower, &mut w, d, k);
    (lower, w)
}

/// The gradient of `‖L⁻¹V‖²/k` with respect to the raw block (row-major d × d).
fn gradient(
    map: TraceCovarianceEstimate,
    raw: &[f64],
    probes: &[f64],
    d: usize,
    k: usize,
) -> Vec<f64> {
    let (lower, w) = solve(map, raw, probes, d, k);
    // Y = L⁻ᵀ W: Lᵀ is upper triangular (the transpose view of the row-major L).
    let mut y = w.clone();
    host::solve_lower_transpose_in_place(&lower, &mut y, d, k);
    let mut outer = host::scaled_outer_product(&y, &w, d, k, -2.0 / k as f64);
    for i in 0..d {
        for j in i + 1..d {
            outer[i * d + j] = 0.0;
        }
        outer[i * d + i] *= maps::slope(map.positive_map, raw[i * d + i]);
    }
    outer
}

impl TraceCovarianceEstimate {
    fn sizes(raw: &Layout, probes: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        match (raw.dims(), probes.dims()) {
            (&[z, d, e], &[pz, pd, k]) if d == e && pz == z && pd == d && k > 0 => Ok((z, d, k)),
            (r, p) => bail!(
                "trace estimate: expected raw (Z, d, d) and probes (Z, d, k ≥ 1), got {r:?} and {p:?}"
            ),
        }
    }

    fn forward<T: Real>(&self, raw: &[T], probes: &[T], z: usize, d: usize, k: usize) -> Vec<T> {
        (0..z)
            .into_par_iter()
            .map(|n| {
                let block = to_f64(&raw[n * d * d..(n + 1) * d * d]);
                let v = to_f64(&probes[n * d * k..(n + 1) * d * k]);
                let (_, w) = solve(*self, &block, &v, d, k);
                T::from_f64(w.iter().map(|x| x * x).sum::<f64>() / k as f64)
            })
            .collect()
    }

    fn backward<T: Real>(
        &self,
        raw: &[T],
        probes: &[T],
        upstream: &[T],
        dims: (usize, usize, usize),
    ) -> Vec<T> {
        let (z, d, k) = dims;
        let mut out = vec![T::zero(); z * d * d];
        out.par_chunks_mut((d * d).max(1))
            .enumerate()
            .for_each(|(n, block_out)| {
                let block = to_f64(&raw[n * d * d..(n + 1) * d * d]);
                let v = to_f64(&probes[n * d * k..(n + 1) * d * k]);
                let scale = upstream[n].to_f64();
                for (o, g) in block_out.iter_mut().zip(gradient(*self, &block, &v, d, k)) {
                    *o = T::from_f64(scale * g);
                }
            });
        out
    }
}

fn to_f64<T: Real>(values: &[T]) -> Vec<f64> {
    values.iter().map(|v| v.to_f64()).collect()
}

impl CustomOp2 for TraceCovarianceEstimate {
    fn name(&self) -> &'static str {
        "trace-covariance-estimate"
    }

    fn cpu_fwd(
        &self,
        raw: &CpuStorage,
        raw_layout: &Layout,
        probes: &CpuStorage,
        probes_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (z, d, k) = Self::sizes(raw_layout, probes_layout)?;
        let out = match (raw, probes) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(self.forward(
                &row_major::<f32>(raw, raw_layout)?,
                &row_major::<f32>(probes, probes_layout)?,
                z,
                d,
                k,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(self.forward(
                &row_major::<f64>(raw, raw_layout)?,
                &row_major::<f64>(probes, probes_layout)?,
                z,
                d,
                k,
            )),
            (r, p) => bail!(
                "{}: raw and probes must both be f32 or both f64, got {:?} and {:?}",
                self.name(),
                r.dtype(),
                p.dtype()
            ),
        };
        Ok((out, Shape::from(z)))
    }

    fn bwd(
        &self,
        raw: &Tensor,
        probes: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dims = Self::sizes(raw.layout(), probes.layout())?;
        let (z, d, _) = dims;
        let grad = grad.to_dtype(raw.dtype())?.contiguous()?;
        let out = match raw.dtype() {
            DType::F32 => {
                let values = with_row_major::<f32, _>(raw, |r| {
                    with_row_major::<f32, _>(probes, |p| {
                        with_row_major::<f32, _>(&grad, |g| Ok(self.backward(r, p, g, dims)))
                    })
                })?;
                Tensor::from_vec(values, (z, d, d), raw.device())?
            }
            DType::F64 => {
                let values = with_row_major::<f64, _>(raw, |r| {
                    with_row_major::<f64, _>(probes, |p| {
                        with_row_major::<f64, _>(&grad, |g| Ok(self.backward(r, p, g, dims)))
                    })
                })?;
                Tensor::from_vec(values, (z, d, d), raw.device())?
            }
            other => bail!("{}: supports f32 and f64, got {other:?}", self.name()),
        };
        // The probes are constants: no gradient.
        Ok((Some(out), None))
    }
}

/// The portable twin of the fused op: `‖L⁻¹V‖²_F / k` from the factor `L` in tensor ops.
///
/// # Shapes
/// `factor`: (Z, d, d), `probes`: (Z, d, k) → (Z)
pub(crate) fn estimate_in_tensor_ops(
    factor: &Tensor,
    probes: &Tensor,
    portable: bool,
) -> Result<Tensor> {
    let k = probes.dim(2)? as f64;
    let w = linalg::matmul(&linalg::tril_inverse_routed(factor, portable)?, probes)?;
    Ok((crate::linalg::sum_accumulated(&w.sqr()?, (1, 2))? / k)?)
}

/// The generator of CPU probes once [`seed_trace_probes`] has run (Candle's CPU generator,
/// the thread's, seeded by the OS, cannot be seeded).
static SEEDED_PROBES: Mutex<Option<StdRng>> = Mutex::new(None);

/// Makes the random probes of Hutchinson trace estimates
/// ([`Precision::trace_covariance_estimate`](crate::Precision::trace_covariance_estimate),
/// the λ-loss's `TraceEstimator::Hutchinson`) on the CPU a fixed sequence from `seed`, so a
/// training run that uses them can be repeated (as `torch.manual_seed` does). Until it is
/// called they come from Candle's CPU generator, which cannot be seeded. Process-wide; on
/// CUDA, seed Candle's generator with `Device::set_seed`.
///
/// ```
/// # fn main() -> gauss_layer::Result<()> {
/// use candle_core::{DType, Device, Tensor};
/// use gauss_layer::{Parameterization, Precision, PrecisionConfig};
///
/// // One neuron, d = 6, a factor with off-diagonal entries (so the estimate depends on
/// // the probes).
/// let values: Vec<f64> = (0..36).map(|k| (k as f64 * 0.37).sin()).collect();
/// let raw = Tensor::from_vec(values, (1, 6, 6), &Device::Cpu)?;
/// let config = PrecisionConfig::with_parameterization(Parameterization::Cholesky);
/// let precision = Precision::from_raw(raw, 6, config)?;
/// gauss_layer::seed_trace_probes(7);
/// let first = precision.trace_covariance_estimate(8)?.to_vec1::<f64>()?;
/// gauss_layer::seed_trace_probes(7);
/// assert_eq!(precision.trace_covariance_estimate(8)?.to_vec1::<f64>()?, first);
/// # Ok(())
/// # }
/// ```
pub fn seed_trace_probes(seed: u64) {
    // A poisoned lock only means another thread panicked mid-draw: the generator is usable.
    let mut generator = SEEDED_PROBES.lock().unwrap_or_else(|e| e.into_inner());
    *generator = Some(StdRng::seed_from_u64(seed));
}

/// Rademacher probes (independent ±1) of shape (Z, d, k), drawn on `like`'s device in its
/// dtype: on the CPU from the [`seed_trace_probes`] generator once seeded, else from
/// Candle's generator of that device.
///
/// # Shapes
/// `like`: any float tensor → (Z, d, k)
pub(crate) fn rademacher_probes(z: usize, d: usize, k: usize, like: &Tensor) -> Result<Tensor> {
    // A probe count whose (Z, d, k) tensor no allocation holds (or whose size overflows
    // usize, which panicked in the shape product) is a setting to refuse.
    let limit = crate::config::MAX_TENSOR_ELEMENTS;
    if z.checked_mul(d)
        .and_then(|n| n.checked_mul(k))
        .is_none_or(|n| n > limit)
    {
        return Err(GaussError::config(
            "probes",
            format!(
                "{k} probe vectors for {z} neurons over {d} inputs need a tensor of more than the {limit} elements one allocation holds; use fewer probes"
            ),
        ));
    }
    if like.device().is_cpu() {
        let mut generator = SEEDED_PROBES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(generator) = generator.as_mut() {
            let signs: Vec<f32> = (0..z * d * k)
                .map(|_| {
                    if generator.random_bool(0.5) {
                        1.0
                    } else {
                        -1.0
                    }
                })
                .collect();
            return Ok(Tensor::from_vec(signs, (z, d, k), like.device())?.to_dtype(like.dtype())?);
        }
    }
    let uniform = Tensor::zeros((z, d, k), like.dtype(), like.device())?.rand_like(0.0, 1.0)?;
    let signs = uniform.ge(0.5)?.to_dtype(like.dtype())?;
    Ok(signs.affine(2.0, -1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GaussLayerConfig, Parameterization};
    use crate::precision::Precision;
    use candle_core::{Device, Var};

    /// A (Z, 8, 8) raw cholesky tensor with a lower triangle of moderate values.
    fn raw(z: usize) -> Tensor {
        let values: Vec<f64> = (0..z * 64)
            .map(|k| ((k as f64 * 0.7331).sin() * 0.6) + if k % 9 == 0 { 0.8 } else { 0.0 })
            .collect();
        Tensor::from_vec(values, (z, 8, 8), &Device::Cpu).unwrap()
    }

    /// Sylvester's Hadamard matrix of order 8, for every neuron: ±1 entries with
    /// `H Hᵀ = 8 I`, so `‖L⁻¹H‖²/8 = tr(L⁻¹ H Hᵀ L⁻ᵀ)/8 = tr Σ` exactly.
    fn hadamard_probes(z: usize) -> Tensor {
        let mut h = vec![1f64];
        let mut n = 1;
        while n < 8 {
            let mut next = vec![0f64; 4 * n * n];
            for i in 0..n {
                for j in 0..n {
                    let v = h[i * n + j];
                    next[i * 2 * n + j] = v;
                    next[i * 2 * n + j + n] = v;
                    next[(i + n) * 2 * n + j] = v;
                    next[(i + n) * 2 * n + j + n] = -v;
                }
            }
            h = next;
            n *= 2;
        }
        let values: Vec<f64> = (0..z).flat_map(|_| h.clone()).collect();
        Tensor::from_vec(values, (z, 8, 8), &Device::Cpu).unwrap()
    }

    fn config() -> GaussLayerConfig {
        GaussLayerConfig::with_parameterization(Parameterization::Cholesky)
    }

    fn op(config: &GaussLayerConfig) -> TraceCovarianceEstimate {
        TraceCovarianceEstimate {
            positive_map: config.precision.positive_map,
            floor: config.precision.factor_diag_floor,
        }
    }

    #[test]
    fn hadamard_probes_give_the_exact_trace_and_gradient() {
        // Closed form: with H Hᵀ = k I the estimate is tr Σ itself, so value and gradient
        // must equal the exact statistic's (the fused exact op), to f64 rounding.
        let config = config();
        let var = Var::from_tensor(&raw(3)).unwrap();
        let probes = hadamard_probes(3);
        let estimate = var.as_tensor().apply_op2(&probes, op(&config)).unwrap();
        let exact = Precision::from_raw(var.as_tensor().clone(), 8, &config)
            .unwrap()
            .trace_covariance()
            .unwrap();
        let rel = crate::testing::relative_error(&estimate, &exact).unwrap();
        assert!(rel < 1e-12, "value: relative error {rel}");
        let grad_estimate = estimate.sum_all().unwrap().backward().unwrap();
        let grad_exact = exact.sum_all().unwrap().backward().unwrap();
        let (a, b) = (
            grad_estimate.get(var.as_tensor()).unwrap(),
            grad_exact.get(var.as_tensor()).unwrap(),
        );
        let rel = crate::testing::relative_error(a, b).unwrap();
        assert!(rel < 1e-10, "gradient: relative error {rel}");
    }

    #[test]
    fn fused_op_matches_its_portable_twin_with_random_probes() {
        // The same probes through the fused op and the tensor-op twin (f64 and f32).
        let config = config();
        // f64: a unit test on Device::Cpu (`raw` builds there)
        for dtype in [DType::F64, DType::F32] {
            let var = Var::from_tensor(&raw(4).to_dtype(dtype).unwrap()).unwrap();
            let probes = rademacher_probes(4, 8, 5, var.as_tensor()).unwrap();
            let fused = var.as_tensor().apply_op2(&probes, op(&config)).unwrap();
            let precision = Precision::from_raw(var.as_tensor().clone(), 8, &config).unwrap();
            let factor = super::super::full::cholesky_factor(&precision).unwrap();
            let portable = estimate_in_tensor_ops(&factor, &probes, true).unwrap();
            let tolerance = crate::testing::tolerance(dtype);
            let rel = crate::testing::relative_error(&fused, &portable).unwrap();
            assert!(rel < tolerance, "{dtype:?} value: {rel}");
            let g_fused = fused.sum_all().unwrap().backward().unwrap();
            let g_portable = portable.sum_all().unwrap().backward().unwrap();
            let rel = crate::testing::relative_error(
                g_fused.get(var.as_tensor()).unwrap(),
                g_portable.get(var.as_tensor()).unwrap(),
            )
            .unwrap();
            assert!(rel < 10.0 * tolerance, "{dtype:?} gradient: {rel}");
        }
    }

    #[test]
    fn probe_counts_beyond_one_allocation_are_config_errors() {
        // usize::MAX probes overflowed the (Z, d, k) shape product (a panic); 2^60 probes fit
        // usize but no allocation. Both are refused naming `probes`.
        let precision = Precision::from_raw(raw(2), 8, &config()).unwrap();
        for probes in [usize::MAX, 1 << 60] {
            match precision.trace_covariance_estimate(probes) {
                Err(GaussError::InvalidConfig { field, .. }) => assert_eq!(field, "probes"),
                other => panic!("{probes} probes: expected a config error, got {other:?}"),
            }
        }
    }

    #[test]
    fn random_probes_are_unbiased() {
        // The mean of 400 independent estimates (5 probes each) lies within 5 standard errors
        // of the exact trace; the standard error is measured from the same draws.
        let config = config();
        let precision = Precision::from_raw(raw(1), 8, &config).unwrap();
        let exact = precision
            .trace_covariance()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        let draws: Vec<f64> = (0..400)
            .map(|_| {
                precision
                    .trace_covariance_estimate(5)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()[0]
            })
            .collect();
        let n = draws.len() as f64;
        let mean = draws.iter().sum::<f64>() / n;
        let variance = draws.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let standard_error = (variance / n).sqrt();
        assert!(variance > 0.0, "the probes must vary between calls");
        assert!(
            (mean - exact).abs() < 5.0 * standard_error,
            "mean {mean} vs exact {exact} (standard error {standard_error})"
        );
        // Probes are ±1.
        let probes = rademacher_probes(2, 8, 3, &raw(1)).unwrap();
        let values = probes.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(values.iter().all(|v| *v == 1.0 || *v == -1.0));
        assert!(values.contains(&1.0) && values.contains(&-1.0));
    }
}
