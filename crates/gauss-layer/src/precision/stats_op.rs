//! The per-neuron statistics of a full precision (`log det P`, `tr Σ`, `tr P`) as one fused
//! CPU op from the raw tensor, with its closed-form backward: what the λ-loss and the NLL
//! need every step, without the tensor-op chain (the raw → L map, a recursive triangular
//! inverse of many small matmuls, their backward) that dominated a training step.
//!
//! Per neuron, in f64 on the host (O(d³), in parallel over neurons; cholesky `tr Σ` with
//! d ≤ 64 eight neurons at a time in [`lanes`], faer's routines otherwise):
//!
//! | map | `log det P` | `tr Σ` | `tr P` |
//! |---|---|---|---|
//! | cholesky, `P = L Lᵀ` | `2 Σ log L_ii`; `∂L_ii = 2/L_ii` | `‖M‖²_F`, `M = L⁻¹`; `∂L = −2 tril(Mᵀ M Mᵀ)` | `‖L‖²_F`; `∂L = 2L` |
//! | direct, `P = (A + Aᵀ)/2` | through `L = chol(P)`; `∂A = P⁻¹` | `‖L⁻¹‖²_F`; `∂A = −P⁻²` | `tr A`; `∂A = I` |
//! | expm, `P = expm((A + Aᵀ)/2)` | `tr A`; `∂A = I` | `Σ e^{−λ}`; `∂A = −U e^{−Λ} Uᵀ` | `Σ e^{λ}`; `∂A = U e^{Λ} Uᵀ` |
//!
//! (for cholesky the raw diagonal's gradient is `∂L_ii · map'(raw_ii)` and the raw upper
//! triangle gets 0). A `direct` matrix that is not positive definite gives NaN (the losses
//! check before); an exponential that overflows the dtype is an error.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{maps, RawMap};
use crate::config::PositiveMap;
use crate::cpu::{row_major, with_row_major, Real};
use crate::linalg::host::{self, lower_inverse, product, transpose};
use crate::linalg::lanes;

/// Which statistic the op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stat {
    LogDetPrecision,
    TraceCovariance,
    TracePrecision,
}

/// The Candle op: input raw (Z, d, d), output the statistic (Z).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrecisionStat {
    pub stat: Stat,
    pub map: RawMap,
}

/// `L_ii` of a cholesky neuron from its raw diagonal entry: the positive map plus the floor.
fn factor_diagonal(raw: f64, positive_map: PositiveMap, floor: f64) -> f64 {
    maps::value(positive_map, raw) + floor
}

/// `L` of a cholesky neuron from its raw block (row-major, f64): the strict lower triangle
/// as stored, the diagonal by [`factor_diagonal`], the upper triangle 0.
fn lower_from_raw(raw: &[f64], d: usize, positive_map: PositiveMap, floor: f64) -> Vec<f64> {
    let mut lower = vec![0f64; d * d];
    for i in 0..d {
        lower[i * d..i * d + i].copy_from_slice(&raw[i * d..i * d + i]);
        lower[i * d + i] = factor_diagonal(raw[i * d + i], positive_map, floor);
    }
    lower
}

/// `∂/∂raw` from `∂/∂L` of a cholesky neuron: the diagonal times the map's slope.
fn chain_diagonal(grad: &mut [f64], raw: &[f64], d: usize, positive_map: PositiveMap) {
    for i in 0..d {
        grad[i * d + i] *= maps::slope(positive_map, raw[i * d + i]);
    }
}

/// `(value, ∂value/∂raw)` of one neuron, raw block row-major in f64.
fn neuron_stat(
    stat: Stat,
    map: RawMap,
    raw: &[f64],
    d: usize,
    with_gradient: bool,
    neuron: usize,
) -> (f64, Vec<f64>) {
    let mut grad = if with_gradient {
        vec![0f64; d * d]
    } else {
        Vec::new()
    };
    match map {
        RawMap::Cholesky {
            positive_map,
            floor,
        } => {
            let lower = lower_from_raw(raw, d, positive_map, floor);
            let value = match stat {
                Stat::LogDetPrecision => {
                    if with_gradient {
                        for i in 0..d {
                            grad[i * d + i] = 2.0 / lower[i * d + i];
                        }
                    }
                    2.0 * (0..d).map(|i| lower[i * d + i].ln()).sum::<f64>()
                }
                Stat::TracePrecision => {
                    if with_gradient {
                        grad.iter_mut().zip(&lower).for_each(|(g, l)| *g = 2.0 * l);
                    }
                    lower.iter().map(|l| l * l).sum()
                }
                Stat::TraceCovariance => {
                    let m = lower_inverse(&lower, d);
                    if with_gradient {
                        // ∂‖L⁻¹‖² / ∂L = −2 Mᵀ M Mᵀ, lower triangle.
                        let g = host::tril_covariance_times_inverse_transpose(&m, d);
                        for i in 0..d {
                            for j in 0..=i {
                                grad[i * d + j] = -2.0 * g[i * d + j];
                            }
                        }
                    }
                    m.iter().map(|v| v * v).sum()
                }
            };
            if with_gradient {
                chain_diagonal(&mut grad, raw, d, positive_map);
            }
            (value, grad)
        }
        RawMap::Direct => {
            if stat == Stat::TracePrecision {
                if with_gradient {
                    (0..d).for_each(|i| grad[i * d + i] = 1.0);
                }
                return ((0..d).map(|i| raw[i * d + i]).sum(), grad);
            }
            let Some(lower) = host::cholesky_lower(raw, d) else {
                return (f64::NAN, vec![f64::NAN; grad.len()]);
            };
            let m = lower_inverse(&lower, d);
            let inverse = product(&transpose(&m, d), &m, d); // P⁻¹ = Mᵀ M
            let value = match stat {
                Stat::LogDetPrecision => {
                    if with_gradient {
                        grad.copy_from_slice(&inverse);
                    }
                    2.0 * (0..d).map(|i| lower[i * d + i].ln()).sum::<f64>()
                }
                _ => {
                    if with_gradient {
                        let square = product(&inverse, &inverse, d);
                        grad.iter_mut().zip(&square).for_each(|(g, s)| *g = -s);
                    }
                    m.iter().map(|v| v * v).sum()
                }
            };
            (value, grad)
        }
        RawMap::Expm => {
            if stat == Stat::LogDetPrecision {
                if with_gradient {
                    (0..d).for_each(|i| grad[i * d + i] = 1.0);
                }
                return ((0..d).map(|i| raw[i * d + i]).sum(), grad);
            }
            let Ok((eigenvalues, vectors)) =
                host::symmetric_eigen(&host::symmetric_block(raw, d), neuron)
            else {
                return (f64::NAN, vec![f64::NAN; grad.len()]);
            };
            let sign = if stat == Stat::TraceCovariance {
                -1.0
            } else {
                1.0
            };
            let exponentials: Vec<f64> = eigenvalues.iter().map(|l| (sign * l).exp()).collect();
            if with_gradient {
                grad = host::from_eigen(&eigenvalues, &vectors, |l| sign * (sign * l).exp());
            }
            (exponentials.iter().sum(), grad)
        }
    }
}

/// The cholesky `tr Σ` of `z` neurons, [`lanes::LANES`] at a time (the lane kernels, for
/// blocks of at most [`lanes::MAX_DIM`]), groups in parallel: the values, and with
/// `upstream` the gradient `upstream[n] · ∂tr Σ_n/∂raw_n` into the (Z, d, d) output beside it
/// (its strict upper triangles left as they are: zero).
fn cholesky_trace_in_lanes<T: Real>(
    raw: &[T],
    (z, d): (usize, usize),
    (positive_map, floor): (PositiveMap, f64),
    upstream: Option<(&[T], &mut [T])>,
) -> Vec<f64> {
    let block = d * d;
    let run = |scratch: &mut lanes::Scratch, group: usize, grad_out: Option<(&[T], &mut [T])>| {
        let first = group * lanes::LANES;
        let used = lanes::LANES.min(z - first);
        let raw_of =
            |lane: usize, i: usize, j: usize| raw[(first + lane) * block + i * d + j].to_f64();
        scratch.fill_lower(used, |lane, i, j| {
            let r = raw_of(lane, i, j);
            if i == j {
                factor_diagonal(r, positive_map, floor)
            } else {
                r
            }
        });
        let trace = scratch.trace_covariance(grad_out.is_some());
        if let Some((upstream, out)) = grad_out {
            for i in 0..d {
                for j in 0..=i {
                    let grad = scratch.gradient(i, j);
                    for lane in 0..used {
                        let mut g = upstream[first + lane].to_f64() * grad[lane];
                        if i == j {
                            g *= maps::slope(positive_map, raw_of(lane, i, i));
                        }
                        out[lane * block + i * d + j] = T::from_f64(g);
                    }
                }
            }
        }
        trace[..used].to_vec()
    };
    let values: Vec<Vec<f64>> = match upstream {
        Some((upstream, grad_out)) => grad_out
            .par_chunks_mut((lanes::LANES * block).max(1))
            .enumerate()
            .map(|(group, out)| {
                lanes::with_scratch(d, |scratch| run(scratch, group, Some((upstream, out))))
            })
            .collect(),
        None => (0..z.div_ceil(lanes::LANES))
            .into_par_iter()
            .map(|group| lanes::with_scratch(d, |scratch| run(scratch, group, None)))
            .collect(),
    };
    values.concat()
}

impl PrecisionStat {
    fn sizes(layout: &Layout) -> candle_core::Result<(usize, usize)> {
        match *layout.dims() {
            [z, d, e] if d == e => Ok((z, d)),
            ref dims => {
                bail!("precision statistics: expected a raw (Z, d, d) tensor, got {dims:?}")
            }
        }
    }

    /// The positive map and floor of a cholesky `tr Σ` whose blocks the lane kernels take.
    fn in_lanes(&self, d: usize) -> Option<(PositiveMap, f64)> {
        match (self.stat, self.map) {
            (
                Stat::TraceCovariance,
                RawMap::Cholesky {
                    positive_map,
                    floor,
                },
            ) if (1..=lanes::MAX_DIM).contains(&d) => Some((positive_map, floor)),
            _ => None,
        }
    }

    fn forward<T: Real>(&self, raw: &[T], z: usize, d: usize) -> candle_core::Result<Vec<T>> {
        if let Some(map) = self.in_lanes(d) {
            let values = cholesky_trace_in_lanes(raw, (z, d), map, None);
            return Ok(values.into_iter().map(T::from_f64).collect());
        }
        let values: Vec<f64> = (0..z)
            .into_par_iter()
            .map(|n| {
                let block: Vec<f64> = raw[n * d * d..(n + 1) * d * d]
                    .iter()
                    .map(|v| v.to_f64())
                    .collect();
                neuron_stat(self.stat, self.map, &block, d, false, n).0
            })
            .collect();
        if self.map == RawMap::Expm {
            let limit = match T::DTYPE {
                DType::F64 => f64::MAX,
                _ => f32::MAX as f64,
            };
            if let Some(n) = values
                .iter()
                .position(|v| !v.is_finite() || v.abs() > limit)
            {
                bail!(
                    "precision statistics: the matrix exponential of neuron {n} overflows {:?} (its trace is {}); keep the raw expm parameter smaller or use f64",
                    T::DTYPE,
                    values[n]
                );
            }
        }
        Ok(values.into_iter().map(T::from_f64).collect())
    }

    fn backward<T: Real>(&self, raw: &[T], upstream: &[T], z: usize, d: usize) -> Vec<T> {
        let mut out = vec![T::zero(); z * d * d];
        if let Some(map) = self.in_lanes(d) {
            cholesky_trace_in_lanes(raw, (z, d), map, Some((upstream, &mut out)));
            return out;
        }
        out.par_chunks_mut((d * d).max(1))
            .enumerate()
            .for_each(|(n, block_out)| {
                let block: Vec<f64> = raw[n * d * d..(n + 1) * d * d]
                    .iter()
                    .map(|v| v.to_f64())
                    .collect();
                let (_, grad) = neuron_stat(self.stat, self.map, &block, d, true, n);
                let scale = upstream[n].to_f64();
                for (o, g) in block_out.iter_mut().zip(grad) {
                    *o = T::from_f64(scale * g);
                }
            });
        out
    }
}

impl CustomOp1 for PrecisionStat {
    fn name(&self) -> &'static str {
        "precision-statistic"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (z, d) = Self::sizes(layout)?;
        let out = match storage {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward(&row_major::<f32>(storage, layout)?, z, d)?)
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward(&row_major::<f64>(storage, layout)?, z, d)?)
            }
            other => bail!(
                "{}: supports f32 and f64, got {:?}",
                self.name(),
                other.dtype()
            ),
        };
        Ok((out, Shape::from(z)))
    }

    fn bwd(
        &self,
        raw: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (z, d) = match *raw.dims() {
            [z, d, _] => (z, d),
            ref dims => bail!("{}: expected (Z, d, d), got {dims:?}", self.name()),
        };
        let grad = grad.to_dtype(raw.dtype())?.contiguous()?;
        let out = match raw.dtype() {
            DType::F32 => {
                let values = with_row_major::<f32, _>(raw, |r| {
                    with_row_major::<f32, _>(&grad, |g| Ok(self.backward(r, g, z, d)))
                })?;
                Tensor::from_vec(values, (z, d, d), raw.device())?
            }
            DType::F64 => {
                let values = with_row_major::<f64, _>(raw, |r| {
                    with_row_major::<f64, _>(&grad, |g| Ok(self.backward(r, g, z, d)))
                })?;
                Tensor::from_vec(values, (z, d, d), raw.device())?
            }
            other => bail!("{}: supports f32 and f64, got {other:?}", self.name()),
        };
        Ok(Some(out))
    }
}
