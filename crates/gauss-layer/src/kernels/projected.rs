//! Fused CPU kernel for the projected form `m2[b, z] = |F_zᵀ (x_b - c_z)|²` (DESIGN §4).
//!
//! Forward: per (batch chunk × neuron block) tile one GEMM of the (shifted) inputs against the
//! factors of the block stacked side by side, minus the precomputed `F_zᵀ c_z`, squared and
//! summed per neuron. Backward: with `W_bz = 2 G_bz u_bz`, per neuron block one GEMM builds
//! `U`, one adds `W Fᵀ` to `∂x` and one adds `Xᵀ W` to `∂F`; `∂c_z = -F_z Σ_b W_bz`. Neither
//! direction materializes anything of size (B, Z, d) or (B, Z·d) beyond one tile per thread.
//!
//! Inputs are shifted by the mean of the centers first (`m2` does not change when x and c
//! move together), so that `F(x - c)` loses fewer digits when the centers sit far from 0.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use std::sync::{Mutex, MutexGuard};

use super::cpu::{
    check_float, dispatch_float3, for_each_item, host_backward3, matmul, neurons_per_block,
    row_mean, rows_per_chunk, squared_distance, MatRef, Real, TILE_ROWS,
};
use crate::config::PositiveMap;
use crate::error::{GaussError, Result};

/// Sizes of one call: B inputs, d dims, Z neurons.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sizes {
    pub batch: usize,
    pub dim: usize,
    pub neurons: usize,
}

impl Sizes {
    /// Shapes of the gradients to x (B, d), the centers (Z, d) and a (Z, d, d) input.
    pub(super) fn gradient_shapes(self) -> [Shape; 3] {
        [
            (self.batch, self.dim).into(),
            (self.neurons, self.dim).into(),
            (self.neurons, self.dim, self.dim).into(),
        ]
    }
}

pub(super) fn sizes_from_dims(x: &[usize], center: &[usize], factor: &[usize]) -> Result<Sizes> {
    let &[batch, dim] = x else {
        return Err(GaussError::shape("input x", "(batch, d)", x));
    };
    let expected = format!("({}, {dim})", center.first().copied().unwrap_or(0));
    let &[neurons, center_dim] = center else {
        return Err(GaussError::shape("center", "(Z, d)", center));
    };
    if center_dim != dim {
        return Err(GaussError::shape("center", expected, center));
    }
    if factor != [neurons, dim, dim] {
        return Err(GaussError::shape(
            "precision factor",
            format!("({neurons}, {dim}, {dim})"),
            factor,
        ));
    }
    Ok(Sizes {
        batch,
        dim,
        neurons,
    })
}

/// How the op's third input becomes the factor `F` (so the Cholesky map from raw parameters
/// runs inside the op, without (Z, d, d) temporaries and their backward ops).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum FactorMap {
    /// The input is `F`.
    Identity,
    /// The input is the raw Cholesky parameter:
    /// `F = tril(raw, -1) + diag(map(diag raw) + floor)`; entries above the diagonal unused.
    Cholesky {
        positive_map: PositiveMap,
        floor: f64,
    },
}

fn positive_value(map: PositiveMap, r: f64) -> f64 {
    match map {
        // log(1 + e^r), without overflow for large r.
        PositiveMap::Softplus => r.max(0.0) + (-r.abs()).exp().ln_1p(),
        PositiveMap::Exp => r.exp(),
    }
}

fn positive_slope(map: PositiveMap, r: f64) -> f64 {
    match map {
        PositiveMap::Softplus => 1.0 / (1.0 + (-r).exp()),
        PositiveMap::Exp => r.exp(),
    }
}

impl FactorMap {
    /// Turns `∂F_z` into the gradient of the op's input block, in place.
    pub(super) fn chain<T: Real>(self, input: &[T], dim: usize, grad: &mut [T]) {
        if let FactorMap::Cholesky { positive_map, .. } = self {
            for i in 0..dim {
                let slope = positive_slope(positive_map, input[i * dim + i].to_f64());
                grad[i * dim + i] = T::from_f64(grad[i * dim + i].to_f64() * slope);
                grad[i * dim + i + 1..(i + 1) * dim].fill(T::zero());
            }
        }
    }
}

/// The factors `F_z` as the op sees them: its input and, for the Cholesky map, the mapped
/// diagonal computed once per call (Z·d values).
pub(super) struct Factors<'a, T> {
    input: &'a [T],
    dim: usize,
    mapped_diagonal: Option<Vec<T>>,
}

impl<'a, T: Real> Factors<'a, T> {
    pub(super) fn new(input: &'a [T], map: FactorMap, s: Sizes) -> Self {
        let dim = s.dim;
        let mapped_diagonal = match map {
            FactorMap::Identity => None,
            FactorMap::Cholesky {
                positive_map,
                floor,
            } => Some(
                (0..s.neurons * dim)
                    .map(|k| {
                        let (z, i) = (k / dim, k % dim);
                        let raw = input[z * dim * dim + i * dim + i].to_f64();
                        T::from_f64(positive_value(positive_map, raw) + floor)
                    })
                    .collect(),
            ),
        };
        Self {
            input,
            dim,
            mapped_diagonal,
        }
    }

    /// True when every `F_z` is lower triangular (the Cholesky map).
    pub(super) fn is_lower_triangular(&self) -> bool {
        self.mapped_diagonal.is_some()
    }

    /// Writes row `i` of `F_z` into `out` (length d).
    #[inline]
    pub(super) fn write_row(&self, z: usize, i: usize, out: &mut [T]) {
        let d = self.dim;
        let src = &self.input[z * d * d + i * d..][..d];
        match &self.mapped_diagonal {
            None => out.copy_from_slice(src),
            Some(diagonal) => {
                out[..i].copy_from_slice(&src[..i]);
                out[i] = diagonal[z * d + i];
                out[i + 1..].fill(T::zero());
            }
        }
    }
}

/// Copies the factors of neurons `z0..z0 + count` side by side into `stacked` (d, count·d):
/// `stacked[i, k·d + j] = F[z0 + k, i, j]`.
fn stack_factors<T: Real>(
    factors: &Factors<'_, T>,
    (z0, count): (usize, usize),
    stacked: &mut [T],
) {
    let dim = factors.dim;
    let cols = count * dim;
    for k in 0..count {
        for i in 0..dim {
            factors.write_row(z0 + k, i, &mut stacked[i * cols + k * dim..][..dim]);
        }
    }
}

/// The shift (mean center) and the projected shifted centers `F_zᵀ (c_z - shift)`, (Z, d),
/// accumulated in f64 (Z·d² work) so that only the batch GEMM rounds in the working dtype.
fn shift_and_projected_centers<T: Real>(
    center: &[T],
    factors: &Factors<'_, T>,
    s: Sizes,
) -> (Vec<T>, Vec<T>) {
    let dim = s.dim;
    let shift: Vec<T> = row_mean(center, s.neurons, dim)
        .into_iter()
        .map(T::from_f64)
        .collect();
    let mut projected = vec![T::zero(); s.neurons * dim];
    let mut shifted = vec![0f64; dim];
    let mut acc = vec![0f64; dim];
    let mut row = vec![T::zero(); dim];
    for z in 0..s.neurons {
        for i in 0..dim {
            // The same rounded shift as the inputs get, so both sides see one shift.
            shifted[i] = center[z * dim + i].to_f64() - shift[i].to_f64();
        }
        acc.fill(0.0);
        for (i, &ci) in shifted.iter().enumerate() {
            factors.write_row(z, i, &mut row);
            for (a, &fij) in acc.iter_mut().zip(&row) {
                *a += fij.to_f64() * ci;
            }
        }
        for (p, &a) in projected[z * dim..(z + 1) * dim].iter_mut().zip(&acc) {
            *p = T::from_f64(a);
        }
    }
    (shift, projected)
}

fn shift_rows<T: Real>(x: &[T], shift: &[T], out: &mut [T]) {
    for (row_out, row_in) in out
        .chunks_exact_mut(shift.len())
        .zip(x.chunks_exact(shift.len()))
    {
        for ((o, &v), &m) in row_out.iter_mut().zip(row_in).zip(shift) {
            *o = v - m;
        }
    }
}

/// Locks a per-item slot (each is taken by exactly one item, so never contended).
fn lock<S>(slot: &Mutex<S>) -> MutexGuard<'_, S> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// `m2` (B, Z), row-major, from row-major x (B, d), center (Z, d), factor (Z, d, d).
fn forward<T: Real>(x: &[T], center: &[T], factor: &[T], map: FactorMap, s: Sizes) -> Vec<T> {
    let mut out = vec![T::zero(); s.batch * s.neurons];
    forward_into(&mut out, x, center, factor, map, s);
    out
}

/// [`forward`] into a caller's (B, Z) buffer.
pub(super) fn forward_into<T: Real>(
    out: &mut [T],
    x: &[T],
    center: &[T],
    factor: &[T],
    map: FactorMap,
    s: Sizes,
) {
    let Sizes {
        batch,
        dim,
        neurons,
    } = s;
    if batch == 0 || neurons == 0 || dim == 0 {
        out.fill(T::zero());
        return;
    }
    let factors = Factors::new(factor, map, s);
    let (shift, projected_centers) = shift_and_projected_centers(center, &factors, s);
    let block = neurons_per_block(dim, neurons);
    let chunk_rows = rows_per_chunk(batch);
    let chunks: Vec<Mutex<&mut [T]>> = out[..batch * neurons]
        .chunks_mut(chunk_rows * neurons)
        .map(Mutex::new)
        .collect();
    for_each_item(
        chunks.len(),
        || (),
        |(), chunk| {
            let mut out_chunk = lock(&chunks[chunk]);
            let out_chunk: &mut [T] = &mut out_chunk;
            let row0 = chunk * chunk_rows;
            let rows = out_chunk.len() / neurons;
            // Shifted per tile (a B·d copy per neuron block, 1/256 of the GEMM work), so the
            // forward holds no chunk-sized copy of the inputs.
            let mut xs = vec![T::zero(); TILE_ROWS.min(rows) * dim];
            let mut stacked = vec![T::zero(); dim * block * dim];
            let mut tile = vec![T::zero(); TILE_ROWS.min(rows) * block * dim];
            for z0 in (0..neurons).step_by(block) {
                let count = block.min(neurons - z0);
                let cols = count * dim;
                stack_factors(&factors, (z0, count), &mut stacked);
                for t0 in (0..rows).step_by(TILE_ROWS) {
                    let tile_rows = TILE_ROWS.min(rows - t0);
                    let first = (row0 + t0) * dim;
                    let xs = &mut xs[..tile_rows * dim];
                    shift_rows(&x[first..first + tile_rows * dim], &shift, xs);
                    matmul(
                        (tile_rows, cols, dim),
                        &mut tile,
                        cols,
                        false,
                        MatRef {
                            data: xs,
                            row_stride: dim,
                            col_stride: 1,
                        },
                        MatRef {
                            data: &stacked[..dim * cols],
                            row_stride: cols,
                            col_stride: 1,
                        },
                    );
                    for r in 0..tile_rows {
                        let out_row = &mut out_chunk[(t0 + r) * neurons + z0..][..count];
                        for (k, o) in out_row.iter_mut().enumerate() {
                            *o = squared_distance(
                                &tile[r * cols + k * dim..][..dim],
                                &projected_centers[(z0 + k) * dim..][..dim],
                            );
                        }
                    }
                }
            }
        },
    );
    drop(chunks);
}

/// Rows per backward tile: larger than the forward's, since the backward's memory is not
/// held against a budget and its three GEMMs per tile (one with k = rows) run faster with
/// fewer, larger calls.
const BACKWARD_TILE_ROWS: usize = 256;

/// Gradients `(∂x (B, d), ∂c (Z, d), ∂F (Z, d, d))` of `Σ G ∘ m2`, row-major.
pub(super) fn backward<T: Real>(
    x: &[T],
    center: &[T],
    factor: &[T],
    grad: &[T],
    map: FactorMap,
    s: Sizes,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Sizes {
        batch,
        dim,
        neurons,
    } = s;
    let mut grad_factor = vec![T::zero(); neurons * dim * dim];
    let mut grad_center = vec![T::zero(); neurons * dim];
    if batch == 0 || neurons == 0 || dim == 0 {
        return (vec![T::zero(); batch * dim], grad_center, grad_factor);
    }
    let factors = Factors::new(factor, map, s);
    let (shift, projected_centers) = shift_and_projected_centers(center, &factors, s);
    let block = neurons_per_block(dim, neurons);
    let two = T::from_f64(2.0);
    let blocks: Vec<Mutex<(&mut [T], &mut [T])>> = grad_factor
        .chunks_mut(block * dim * dim)
        .zip(grad_center.chunks_mut(block * dim))
        .map(Mutex::new)
        .collect();
    let partial_grad_x = for_each_item(
        blocks.len(),
        || vec![T::zero(); batch * dim],
        |grad_x, b| {
            let mut guard = lock(&blocks[b]);
            let (grad_factor_block, grad_center_block) = &mut *guard;
            let z0 = b * block;
            let count = grad_center_block.len() / dim;
            let cols = count * dim;
            let mut stacked = vec![T::zero(); dim * cols];
            stack_factors(&factors, (z0, count), &mut stacked);
            let mut xs = vec![T::zero(); BACKWARD_TILE_ROWS * dim];
            let mut tile = vec![T::zero(); BACKWARD_TILE_ROWS * cols];
            let mut xt_w = vec![T::zero(); dim * cols];
            let mut w_sum = vec![T::zero(); cols];
            for t0 in (0..batch).step_by(BACKWARD_TILE_ROWS) {
                let rows = BACKWARD_TILE_ROWS.min(batch - t0);
                let xs = &mut xs[..rows * dim];
                shift_rows(&x[t0 * dim..(t0 + rows) * dim], &shift, xs);
                let xs_view = MatRef {
                    data: &*xs,
                    row_stride: dim,
                    col_stride: 1,
                };
                matmul(
                    (rows, cols, dim),
                    &mut tile,
                    cols,
                    false,
                    xs_view,
                    MatRef {
                        data: &stacked,
                        row_stride: cols,
                        col_stride: 1,
                    },
                );
                // U → W = 2 G ∘ U, in place.
                for r in 0..rows {
                    let g_row = &grad[(t0 + r) * neurons + z0..][..count];
                    let w_row = &mut tile[r * cols..(r + 1) * cols];
                    for (k, &g) in g_row.iter().enumerate() {
                        let g2 = two * g;
                        let pc = &projected_centers[(z0 + k) * dim..][..dim];
                        let w = &mut w_row[k * dim..(k + 1) * dim];
                        let sum = &mut w_sum[k * dim..(k + 1) * dim];
                        for ((wj, &pj), sj) in w.iter_mut().zip(pc).zip(sum.iter_mut()) {
                            *wj = g2 * (*wj - pj);
                            *sj += *wj;
                        }
                    }
                }
                let w_view = MatRef {
                    data: &tile[..rows * cols],
                    row_stride: cols,
                    col_stride: 1,
                };
                // ∂x rows += W · stackedᵀ
                matmul(
                    (rows, dim, cols),
                    &mut grad_x[t0 * dim..(t0 + rows) * dim],
                    dim,
                    true,
                    w_view,
                    MatRef {
                        data: &stacked,
                        row_stride: 1,
                        col_stride: cols,
                    },
                );
                // Xᵀ W, with X the shifted inputs.
                matmul(
                    (dim, cols, rows),
                    &mut xt_w,
                    cols,
                    true,
                    MatRef {
                        data: &*xs,
                        row_stride: 1,
                        col_stride: dim,
                    },
                    w_view,
                );
            }
            for k in 0..count {
                let z = z0 + k;
                let sum = &w_sum[k * dim..(k + 1) * dim];
                for i in 0..dim {
                    // Σ_b (x_b - c_z) W_bzᵀ = Σ_b (x_b - s) W_bzᵀ - (c_z - s) Σ_b W_bzᵀ
                    let ci = center[z * dim + i] - shift[i];
                    let out = &mut grad_factor_block[k * dim * dim + i * dim..][..dim];
                    let xw = &xt_w[i * cols + k * dim..][..dim];
                    let mut fs = T::zero();
                    let f_row = &stacked[i * cols + k * dim..][..dim];
                    for ((o, &a), (&sj, &fij)) in out.iter_mut().zip(xw).zip(sum.iter().zip(f_row))
                    {
                        *o = a - ci * sj;
                        fs += fij * sj;
                    }
                    grad_center_block[k * dim + i] = T::zero() - fs;
                }
                map.chain(
                    &factor[z * dim * dim..(z + 1) * dim * dim],
                    dim,
                    &mut grad_factor_block[k * dim * dim..(k + 1) * dim * dim],
                );
            }
        },
    );
    drop(blocks);
    let mut partials = partial_grad_x.into_iter();
    let mut grad_x = partials
        .next()
        .unwrap_or_else(|| vec![T::zero(); batch * dim]);
    for partial in partials {
        grad_x.iter_mut().zip(&partial).for_each(|(a, &b)| *a += b);
    }
    (grad_x, grad_center, grad_factor)
}

/// The Candle op: inputs (x, center, factor), output m2 (B, Z).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProjectedMahalanobisSq {
    map: FactorMap,
}

impl CustomOp3 for ProjectedMahalanobisSq {
    fn name(&self) -> &'static str {
        "projected-mahalanobis-sq"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let sizes = sizes_from_dims(l1.dims(), l2.dims(), l3.dims())?;
        let shape = Shape::from((sizes.batch, sizes.neurons));
        let out = dispatch_float3(
            self.name(),
            "x, center and factor",
            [(s1, l1), (s2, l2), (s3, l3)],
            |x, c, f| CpuStorage::F32(forward(x, c, f, self.map, sizes)),
            |x, c, f| CpuStorage::F64(forward(x, c, f, self.map, sizes)),
        )?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        center: &Tensor,
        factor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gc, gf) = match x.dtype() {
            DType::F32 => backward_tensors::<f32>(x, center, factor, grad, self.map)?,
            DType::F64 => backward_tensors::<f64>(x, center, factor, grad, self.map)?,
            other => bail!("{}: supports f32 and f64, got {other:?}", self.name()),
        };
        Ok((Some(gx), Some(gc), Some(gf)))
    }
}

fn backward_tensors<T: Real>(
    x: &Tensor,
    center: &Tensor,
    factor: &Tensor,
    grad: &Tensor,
    map: FactorMap,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let sizes = sizes_from_dims(x.dims(), center.dims(), factor.dims())?;
    let grad = grad.to_dtype(T::DTYPE)?.contiguous()?;
    host_backward3::<T>(
        [x, center, factor, &grad],
        sizes.gradient_shapes(),
        |x, c, f, g| Ok(backward(x, c, f, g, map, sizes)),
    )
}

/// The projected form through the fused CPU op (with its fused backward).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `factor`: (Z, d, d) with `P_z = F_z F_zᵀ` → (B, Z)
///
/// # Errors
/// Wrong shapes, mixed dtypes, a dtype other than f32/f64, or a tensor not on the CPU.
pub fn mahalanobis_sq_projected_fused(
    x: &Tensor,
    center: &Tensor,
    factor: &Tensor,
) -> Result<Tensor> {
    apply(x, center, factor, FactorMap::Identity)
}

/// The projected form straight from the raw Cholesky parameter, fused: the factor
/// `L = tril(raw, -1) + diag(map(diag raw) + floor)` is built inside the op, tile by tile, so
/// neither `L` nor its backward ops exist as (Z, d, d) tensors. Gradients flow to `x`,
/// `center` and `raw` (zero above the diagonal).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `raw`: (Z, d, d) → (B, Z)
///
/// # Errors
/// As [`mahalanobis_sq_projected_fused`]; also a negative or non-finite `floor`.
pub fn mahalanobis_sq_cholesky_fused(
    x: &Tensor,
    center: &Tensor,
    raw: &Tensor,
    positive_map: PositiveMap,
    floor: f64,
) -> Result<Tensor> {
    if !floor.is_finite() || floor < 0.0 {
        return Err(GaussError::config(
            "factor_diag_floor",
            format!("must be finite and >= 0, got {floor}"),
        ));
    }
    apply(
        x,
        center,
        raw,
        FactorMap::Cholesky {
            positive_map,
            floor,
        },
    )
}

fn apply(x: &Tensor, center: &Tensor, factor: &Tensor, map: FactorMap) -> Result<Tensor> {
    sizes_from_dims(x.dims(), center.dims(), factor.dims())?;
    check_same_dtype(x, center, "center")?;
    check_same_dtype(x, factor, "precision factor")?;
    check_float("projected Mahalanobis kernel", x.dtype())?;
    if !x.device().is_cpu() {
        return Err(candle_core::Error::Msg(
            "the fused projected kernel runs on the CPU only; use distance::mahalanobis_sq_projected"
                .into(),
        )
        .into());
    }
    Ok(x.apply_op3(center, factor, ProjectedMahalanobisSq { map })?)
}

pub(crate) fn check_same_dtype(x: &Tensor, other: &Tensor, what: &str) -> Result<()> {
    if other.dtype() != x.dtype() {
        return Err(GaussError::DType {
            what: what.to_string(),
            expected: x.dtype(),
            got: other.dtype(),
        });
    }
    Ok(())
}
