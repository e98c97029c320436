//! The projected form `m2[b, z] = |F_zᵀ (x_b − c_z)|²` for a factor `P_z = F_z F_zᵀ`
//! (docs/design.md §4): the fused CPU algorithm (forward and backward on host slices, run by
//! the distance op) beside its portable twin in tensor ops (what CUDA and Metal run).
//!
//! Forward: per (batch chunk × neuron block) tile one GEMM of the (shifted) inputs against the
//! factors of the block stacked side by side, minus the precomputed `F_zᵀ c_z`, squared and
//! summed per neuron. Backward: with `W_bz = 2 G_bz u_bz`, per neuron block one GEMM builds
//! `U`, one adds `W Fᵀ` to `∂x` and one adds `Xᵀ W` to `∂F`; `∂c_z = -F_z Σ_b W_bz`. Neither
//! direction materializes anything of size (B, Z, d) or (B, Z·d) beyond one tile per thread.
//!
//! Inputs are shifted by the mean of the centers first (`m2` does not change when x and c
//! move together), so that `F(x - c)` loses fewer digits when the centers sit far from 0.

use candle_core::{Tensor, D};

use super::factors::{FactorMap, Factors};
use crate::cpu::{
    for_each_chunk_mut, for_each_with_state, matmul, neurons_per_block, row_mean, rows_per_chunk,
    shift_rows, squared_distance, Gradients3, MatRef, Real, Sizes, TILE_ROWS,
};
use crate::error::Result;
use crate::linalg;

/// The portable twin: `m2 = |F_zᵀ (x_b − c_z)|²` from the (Z, B, d) differences and one
/// batched matmul against the factors, in tensor ops (every device, autograd), as the original
/// FGN code does. Each difference is formed before it is projected, so `m2` keeps its digits
/// wherever the inputs and centers are: projecting first (`F_zᵀ x_b − F_zᵀ c_z`, one GEMM
/// against the stacked factors, [`stacked`]) lost them for data far from the origin (f32
/// relative error 7.6e-4 at 1e4), and shifting by the centers' mean instead loses them for
/// the other neurons when one center is far.
///
/// Factors may be rectangular (d, k), as lowrank's `U` is.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `factor`: (Z, d, k) → (B, Z)
pub(crate) fn portable(x: &Tensor, center: &Tensor, factor: &Tensor) -> Result<Tensor> {
    let difference = x.unsqueeze(0)?.broadcast_sub(&center.unsqueeze(1)?)?;
    let projected = linalg::matmul(&difference, factor)?;
    Ok(projected.sqr()?.sum(D::Minus1)?.t()?)
}

/// `m2 = |F_zᵀ (x_b − s) − F_zᵀ (c_z − s)|²` with one GEMM of the shifted inputs against the
/// factors stacked side by side (`s` the centers' mean, as the fused projected op shifts), in
/// tensor ops: no (B, Z, d) tensor, the GEMM's (B, Z·k) output the only large intermediate.
/// lowrank runs its `U` part so on both paths (k = rank is small, and the (Z, B, d)
/// differences of [`portable`] would be its largest tensor: 10× slower in a CPU backward at
/// rank 8, 784 → 64); its digits are those of the fused projected op and of the diagonal part's
/// shifted expansion.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `factor`: (Z, d, k) → (B, Z)
pub(crate) fn stacked(x: &Tensor, center: &Tensor, factor: &Tensor) -> Result<Tensor> {
    let (b, d) = x.dims2()?;
    let (z, _, k) = factor.dims3()?;
    // m2 does not change when x and c move together, so the shift carries no gradient.
    let shift = center.detach().mean_keepdim(0)?;
    let x = x.broadcast_sub(&shift)?.contiguous()?;
    let center = center.broadcast_sub(&shift)?;
    // stacked[i, z·k + j] = F_z[i, j], so (x · stacked)[b, z·k + j] = (F_zᵀ x_b)_j.
    let stacked = factor.permute((1, 0, 2))?.reshape((d, z * k))?;
    let projected = x.matmul(&stacked)?.reshape((b, z, k))?;
    // (F_zᵀ c_z)ᵀ = c_zᵀ F_z, one small batched matmul.
    let projected_center = linalg::matmul(&center.unsqueeze(1)?, factor)?.squeeze(1)?;
    Ok(projected
        .broadcast_sub(&projected_center.unsqueeze(0)?)?
        .sqr()?
        .sum(D::Minus1)?)
}

/// Copies the factors of neurons `z0..z0 + count` side by side into `stacked` (d, count·d):
/// `stacked[i, k·d + j] = F[z0 + k, i, j]`.
fn stack_factors<T: Real>(
    factors: &Factors<'_, T>,
    (z0, count): (usize, usize),
    stacked: &mut [T],
) {
    let dim = factors.dim();
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

/// `m2` (B, Z) into a caller's row-major buffer, from row-major x (B, d), center (Z, d) and
/// the op's (Z, d, d) input.
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
    for_each_chunk_mut(
        &mut out[..batch * neurons],
        chunk_rows * neurons,
        |chunk, out_chunk| {
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
}

/// Rows per backward tile: larger than the forward's, since the backward's memory is not
/// held against a budget and its three GEMMs per tile (one with k = rows) run faster with
/// fewer, larger calls.
const BACKWARD_TILE_ROWS: usize = 256;

/// Gradients `(∂x (B, d), ∂c (Z, d), ∂F (Z, d, d))` of `Σ G ∘ m2`, row-major; `∂x` (one of
/// the three GEMMs per tile) only `if input_gradient`.
pub(super) fn backward<T: Real>(
    x: &[T],
    center: &[T],
    factor: &[T],
    grad: &[T],
    map: FactorMap,
    s: Sizes,
    input_gradient: bool,
) -> Gradients3<T> {
    let Sizes {
        batch,
        dim,
        neurons,
    } = s;
    let mut grad_factor = vec![T::zero(); neurons * dim * dim];
    let mut grad_center = vec![T::zero(); neurons * dim];
    let grad_x_len = if input_gradient { batch * dim } else { 0 };
    if batch == 0 || neurons == 0 || dim == 0 {
        let grad_x = input_gradient.then(|| vec![T::zero(); grad_x_len]);
        return (grad_x, grad_center, grad_factor);
    }
    let factors = Factors::new(factor, map, s);
    let (shift, projected_centers) = shift_and_projected_centers(center, &factors, s);
    let block = neurons_per_block(dim, neurons);
    let two = T::from_f64(2.0);
    let blocks: Vec<(&mut [T], &mut [T])> = grad_factor
        .chunks_mut(block * dim * dim)
        .zip(grad_center.chunks_mut(block * dim))
        .collect();
    let partial_grad_x = for_each_with_state(
        blocks,
        || vec![T::zero(); grad_x_len],
        |grad_x, b, (grad_factor_block, grad_center_block)| {
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
                if input_gradient {
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
                }
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
    let mut partials = partial_grad_x.into_iter();
    let mut grad_x = partials
        .next()
        .unwrap_or_else(|| vec![T::zero(); grad_x_len]);
    for partial in partials {
        grad_x.iter_mut().zip(&partial).for_each(|(a, &b)| *a += b);
    }
    (input_gradient.then_some(grad_x), grad_center, grad_factor)
}
