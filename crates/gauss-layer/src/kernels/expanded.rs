//! The expanded symmetric form (docs/design.md §4):
//! `m2[b, z] = <x̃_b⊗x̃_b, P_z> - 2 x̃_b·(P_z c̃_z) + c̃_zᵀ P_z c̃_z`, with `x̃ = x - s`,
//! `c̃ = c - s` for the mean center `s` (`m2` does not change when x and c move together):
//! the fused CPU algorithm beside its portable twin in tensor ops.
//!
//! Each input row becomes one row of `[x̃_i x̃_j (i <= j) | x̃ | 1]` (width
//! `W = d(d+1)/2 + d + 1`) and each neuron one row of `[w_ij P_ij | -2 P c̃ | c̃ᵀ P c̃]`
//! (`w = 1` on the diagonal, 2 off it), so the whole form is one GEMM of
//! (B, W) × (W, Z): about B·Z·d²/2 multiply-adds, half the projected form's. The backward
//! is two more GEMMs of that size — `Gᵀ [pairs | x̃ | 1]` (every sum over the batch the
//! precision and center gradients need) and `G [w P | -2 P c̃ | ·]` (what the input gradient
//! needs) — against three of B·Z·d² for the projected form. Only row tiles of the pair
//! matrix exist at a time (one per thread), never anything of size (B, Z, d) or (B, Z·d).
//!
//! The terms cancel when the centers sit far from each other relative to the widths, or
//! when P is ill-conditioned: the resolver's conditioning check ([`super::conditioning`])
//! sends such layers to the projected form. `m2` is clamped at 0; the backward passes
//! gradients through the clamp where it only hid rounding, and blocks them where a precision
//! matrix that is not positive definite gave a negative `m2` ([`zero_clamped_gradients`]).

use candle_core::{Tensor, D};

use super::factors::{FactorMap, Factors};
use crate::cpu::{
    for_each_chunk_pair_mut_sized, for_each_with_state, matmul, row_mean, rows_per_chunk,
    shift_rows, Gradients3, MatRef, Real, Sizes, TILE_ROWS,
};
use crate::error::Result;
use crate::linalg::host;

/// What the op's precision input holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Source {
    /// A factor (or the raw Cholesky parameter mapped to one): `P = F Fᵀ`.
    Factor(FactorMap),
    /// The precision matrix itself (its symmetric part is used).
    Matrix,
}

/// Indices of the upper triangle `i <= j` of a (d, d) matrix: rows, columns, the flat index
/// `i·d + j` and the transposed flat index `j·d + i`.
fn upper_triangle(dim: usize) -> [Vec<u32>; 4] {
    let mut out: [Vec<u32>; 4] = Default::default();
    for i in 0..dim {
        for j in i..dim {
            out[0].push(i as u32);
            out[1].push(j as u32);
            out[2].push((i * dim + j) as u32);
            out[3].push((j * dim + i) as u32);
        }
    }
    out
}

/// The portable twin: the expanded form in tensor ops (every device, autograd), clamped at
/// 0. `precision` need not be exactly symmetric: its symmetric part is used. The upper
/// triangle's weights are built on the host in the working dtype (never f64 on the device).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `precision`: (Z, d, d) → (B, Z)
pub(crate) fn portable(x: &Tensor, center: &Tensor, precision: &Tensor) -> Result<Tensor> {
    let (_, dim) = x.dims2()?;
    let neurons = center.dim(0)?;
    let device = x.device();
    // m2 does not change when x and c move together; the shift only reduces cancellation,
    // so it carries no gradient.
    let shift = center.detach().mean_keepdim(0)?;
    let xs = x.broadcast_sub(&shift)?;
    let cs = center.broadcast_sub(&shift)?;
    let [rows, cols, flat, flat_t] = upper_triangle(dim);
    let count = rows.len();
    let rows = Tensor::from_vec(rows, count, device)?;
    let cols = Tensor::from_vec(cols, count, device)?;
    let flat = Tensor::from_vec(flat, count, device)?;
    let flat_t = Tensor::from_vec(flat_t, count, device)?;
    // Off-diagonal products appear twice in <x⊗x, P>: (P_ij + P_ji)·1; diagonal: 2 P_ii · ½.
    let weight: Vec<f64> = (0..dim)
        .flat_map(|i| (i..dim).map(move |j| if i == j { 0.5 } else { 1.0 }))
        .collect();
    // 0.5 and 1 are exact in every float dtype: round on the CPU, then move.
    let weight = host::from_host(weight, &[1, count], x.dtype(), device)?;
    let products = xs
        .index_select(&rows, 1)?
        .mul(&xs.index_select(&cols, 1)?)?; // (B, T)
    let flat_precision = precision.reshape((neurons, dim * dim))?;
    let packed = flat_precision
        .index_select(&flat, 1)?
        .add(&flat_precision.index_select(&flat_t, 1)?)?
        .broadcast_mul(&weight)?; // (Z, T)
    let quadratic = products.matmul(&packed.t()?)?; // (B, Z)
    let symmetric = precision
        .add(&precision.transpose(1, 2)?)?
        .affine(0.5, 0.0)?;
    let precision_center = symmetric.matmul(&cs.unsqueeze(2)?)?.squeeze(2)?; // (Z, d)
    let linear = xs.matmul(&precision_center.t()?)?; // (B, Z)
    let constant = cs.mul(&precision_center)?.sum(D::Minus1)?; // (Z)
    let m2 = quadratic
        .sub(&linear.affine(2.0, 0.0)?)?
        .broadcast_add(&constant.unsqueeze(0)?)?;
    super::clamp_at_zero(&m2)
}

/// d(d+1)/2 distinct products of a symmetric matrix.
fn pair_count(dim: usize) -> usize {
    dim * (dim + 1) / 2
}

/// Columns of one pair row: pairs, x̃, 1.
fn width(dim: usize) -> usize {
    pair_count(dim) + dim + 1
}

/// Largest row tile (elements) of the expanded forward per thread: keeps its scratch a
/// small, fixed overhead on top of the output.
const FORWARD_TILE_ELEMS: usize = 40 * 1024;

/// Rows of one forward tile.
pub(super) fn forward_tile_rows(dim: usize) -> usize {
    (FORWARD_TILE_ELEMS / width(dim)).clamp(4, TILE_ROWS)
}

/// Rows of one backward tile (its memory is not budgeted; taller tiles make the
/// batch-summing GEMM faster).
fn backward_tile_rows(dim: usize) -> usize {
    ((1 << 20) / width(dim)).clamp(8, 256)
}

/// Neurons whose packed rows the forward holds at once.
const FORWARD_NEURON_BLOCK: usize = 64;

/// The shift (mean center, rounded to `T`) and the centered centers (Z, d).
fn shift_and_centered<T: Real>(center: &[T], s: Sizes) -> (Vec<T>, Vec<T>) {
    let shift: Vec<T> = row_mean(center, s.neurons, s.dim)
        .into_iter()
        .map(T::from_f64)
        .collect();
    let mut centered = vec![T::zero(); s.neurons * s.dim];
    shift_rows(center, &shift, &mut centered);
    (shift, centered)
}

/// The symmetric `P_z` (d, d) into `p`, with `l` as scratch for the factor.
fn precision_of<T: Real>(
    input: &[T],
    factors: Option<&Factors<'_, T>>,
    z: usize,
    dim: usize,
    l: &mut [T],
    p: &mut [T],
) {
    let block = &input[z * dim * dim..(z + 1) * dim * dim];
    match factors {
        Some(factors) if factors.is_lower_triangular() => {
            for i in 0..dim {
                factors.write_row(z, i, &mut l[i * dim..(i + 1) * dim]);
            }
            lower_gram(l, dim, p);
        }
        Some(factors) => {
            for i in 0..dim {
                factors.write_row(z, i, &mut l[i * dim..(i + 1) * dim]);
            }
            matmul(
                (dim, dim, dim),
                p,
                dim,
                false,
                MatRef {
                    data: l,
                    row_stride: dim,
                    col_stride: 1,
                },
                MatRef {
                    data: l,
                    row_stride: 1,
                    col_stride: dim,
                },
            );
        }
        None => {
            let half = T::from_f64(0.5);
            for i in 0..dim {
                for j in 0..dim {
                    p[i * dim + j] = half * (block[i * dim + j] + block[j * dim + i]);
                }
            }
        }
    }
}

/// Row-major (rows × cols) view at `offset` of a row-major matrix with row stride `dim`, or
/// its transpose.
fn view<T>(data: &[T], offset: usize, dim: usize, transposed: bool) -> MatRef<'_, T> {
    let (row_stride, col_stride) = if transposed { (1, dim) } else { (dim, 1) };
    MatRef {
        data: &data[offset.min(data.len())..],
        row_stride,
        col_stride,
    }
}

/// `P = L Lᵀ` for a lower-triangular `L`, in 2×2 blocks `L = [[A, 0], [B, C]]` so that the
/// zero block costs nothing: `P11 = A Aᵀ`, `P21 = B Aᵀ`, `P22 = B Bᵀ + C Cᵀ` (half the
/// multiply-adds of a full product).
fn lower_gram<T: Real>(l: &[T], dim: usize, p: &mut [T]) {
    let h = dim / 2;
    let r = dim - h;
    let (a, b, c) = (0, h * dim, h * dim + h);
    matmul(
        (h, h, h),
        p,
        dim,
        false,
        view(l, a, dim, false),
        view(l, a, dim, true),
    );
    matmul(
        (r, h, h),
        &mut p[b..],
        dim,
        false,
        view(l, b, dim, false),
        view(l, a, dim, true),
    );
    matmul(
        (r, r, h),
        &mut p[c..],
        dim,
        false,
        view(l, b, dim, false),
        view(l, b, dim, true),
    );
    matmul(
        (r, r, r),
        &mut p[c..],
        dim,
        true,
        view(l, c, dim, false),
        view(l, c, dim, true),
    );
    for i in 0..h {
        for j in h..dim {
            p[i * dim + j] = p[j * dim + i];
        }
    }
}

/// The lower triangle (and, of the block above it, garbage for the caller to drop) of `S L`
/// for a lower-triangular `L = [[A, 0], [B, C]]`: `[[S11 A + S12 B, ·], [S21 A + S22 B, S22 C]]`
/// (5/8 of the multiply-adds of a full product).
fn lower_product<T: Real>(s: &[T], l: &[T], dim: usize, out: &mut [T]) {
    let h = dim / 2;
    let r = dim - h;
    let (a, b, c) = (0, h * dim, h * dim + h);
    let (s11, s12, s21, s22) = (0, h, h * dim, h * dim + h);
    let v = |data, offset| view(data, offset, dim, false);
    matmul((h, h, h), out, dim, false, v(s, s11), v(l, a));
    matmul((h, h, r), out, dim, true, v(s, s12), v(l, b));
    matmul((r, h, h), &mut out[b..], dim, false, v(s, s21), v(l, a));
    matmul((r, h, r), &mut out[b..], dim, true, v(s, s22), v(l, b));
    matmul((r, r, r), &mut out[c..], dim, false, v(s, s22), v(l, c));
}

/// Neuron `z`'s packed row `[w_ij P_ij | -2 P c̃ | c̃ᵀ P c̃]` (the last two in f64).
fn pack_neuron<T: Real>(
    input: &[T],
    factors: Option<&Factors<'_, T>>,
    centered: &[T],
    z: usize,
    dim: usize,
    row: &mut [T],
) {
    let mut l = vec![T::zero(); dim * dim];
    let mut p = vec![T::zero(); dim * dim];
    precision_of(input, factors, z, dim, &mut l, &mut p);
    let two = T::from_f64(2.0);
    let mut t = 0;
    for i in 0..dim {
        row[t] = p[i * dim + i];
        for j in i + 1..dim {
            row[t + j - i] = two * p[i * dim + j];
        }
        t += dim - i;
    }
    let c = &centered[z * dim..(z + 1) * dim];
    let mut constant = 0f64;
    for i in 0..dim {
        let pc: f64 = p[i * dim..(i + 1) * dim]
            .iter()
            .zip(c)
            .map(|(&a, &b)| a.to_f64() * b.to_f64())
            .sum();
        row[t + i] = T::from_f64(-2.0 * pc);
        constant += pc * c[i].to_f64();
    }
    row[t + dim] = T::from_f64(constant);
}

/// Packed rows of neurons `z0..z0 + rows.len() / W`, in parallel.
fn pack_neurons<T: Real>(
    input: &[T],
    factors: Option<&Factors<'_, T>>,
    centered: &[T],
    z0: usize,
    dim: usize,
    rows: &mut [T],
) {
    let count = rows.len() / width(dim).max(1);
    let work = count * (dim * dim * dim / 6 + dim * dim);
    let mut none = vec![(); count];
    for_each_chunk_pair_mut_sized(work, rows, width(dim), &mut none, 1, |k, row, _| {
        pack_neuron(input, factors, centered, z0 + k, dim, row)
    });
}

/// Fills `tile` (rows, W) with `[x̃_i x̃_j | x̃ | 1]` for the rows of `x`.
fn pair_rows<T: Real>(x: &[T], shift: &[T], tile: &mut [T]) {
    let dim = shift.len();
    let w = width(dim);
    let t_count = pair_count(dim);
    for (row_x, row) in x.chunks_exact(dim.max(1)).zip(tile.chunks_exact_mut(w)) {
        let (pairs, rest) = row.split_at_mut(t_count);
        let xs = &mut rest[..dim];
        for ((o, &v), &m) in xs.iter_mut().zip(row_x).zip(shift) {
            *o = v - m;
        }
        let mut t = 0;
        for i in 0..dim {
            let xi = xs[i];
            for (o, &xj) in pairs[t..t + dim - i].iter_mut().zip(&xs[i..]) {
                *o = xi * xj;
            }
            t += dim - i;
        }
        rest[dim] = T::one();
    }
}

fn factors_for<'a, T: Real>(input: &'a [T], source: Source, s: Sizes) -> Option<Factors<'a, T>> {
    match source {
        Source::Factor(map) => Some(Factors::new(input, map, s)),
        Source::Matrix => None,
    }
}

/// Expanded forward: `m2` (B, Z) into `out`, clamped at 0.
pub(super) fn forward_into<T: Real>(
    out: &mut [T],
    x: &[T],
    center: &[T],
    input: &[T],
    source: Source,
    s: Sizes,
) {
    let Sizes {
        batch,
        dim,
        neurons,
    } = s;
    out.fill(T::zero());
    if batch == 0 || neurons == 0 || dim == 0 {
        return;
    }
    let w = width(dim);
    let factors = factors_for(input, source, s);
    let (shift, centered) = shift_and_centered(center, s);
    let block = FORWARD_NEURON_BLOCK.min(neurons);
    let tile_rows = forward_tile_rows(dim);
    let chunk_rows = rows_per_chunk(batch);
    let mut packed = vec![T::zero(); block * w];
    for z0 in (0..neurons).step_by(block) {
        let count = block.min(neurons - z0);
        let packed = &mut packed[..count * w];
        pack_neurons(input, factors.as_ref(), &centered, z0, dim, packed);
        let packed: &[T] = packed;
        let chunks: Vec<&mut [T]> = out[..batch * neurons]
            .chunks_mut(chunk_rows * neurons)
            .collect();
        for_each_with_state(
            chunks,
            || vec![T::zero(); tile_rows.min(chunk_rows) * w],
            |tile, chunk, out_chunk| {
                let row0 = chunk * chunk_rows;
                let rows = out_chunk.len() / neurons;
                for t0 in (0..rows).step_by(tile_rows) {
                    let m = tile_rows.min(rows - t0);
                    let first = (row0 + t0) * dim;
                    let tile = &mut tile[..m * w];
                    pair_rows(&x[first..first + m * dim], &shift, tile);
                    let dst = &mut out_chunk[t0 * neurons + z0..];
                    matmul(
                        (m, count, w),
                        dst,
                        neurons,
                        false,
                        MatRef {
                            data: tile,
                            row_stride: w,
                            col_stride: 1,
                        },
                        MatRef {
                            data: packed,
                            row_stride: 1,
                            col_stride: w,
                        },
                    );
                    for r in 0..m {
                        for v in &mut dst[r * neurons..r * neurons + count] {
                            if *v < T::zero() {
                                *v = T::zero();
                            }
                        }
                    }
                }
            },
        );
    }
}

/// Zeroes the incoming gradient `grad` (B, Z) of the pairs whose `m2` the forward clamped
/// from a negative value (a precision matrix that is not positive definite): the clamp's
/// derivative is 0 there, as the portable forms' `relu` and finite differences have it, while
/// the expanded backward would differentiate the negative value. Candidates are the pairs
/// whose forward output `out` (B, Z) equals `at_clamp` (`m2 = 0`, or `g = 1` for the layer
/// op), a few where `P` is positive definite; of those, the pairs whose `(x − c)ᵀ A (x − c)`,
/// in f64, is negative. Factors need none of this: `|Fᵀ(x − c)|² ≥ 0`.
pub(super) fn zero_clamped_gradients<T: Real>(
    grad: &mut [T],
    out: &[T],
    at_clamp: T,
    x: &[T],
    center: &[T],
    matrix: &[T],
    s: Sizes,
) {
    let Sizes {
        batch,
        dim,
        neurons,
    } = s;
    if batch == 0 || neurons == 0 || dim == 0 {
        return;
    }
    let mut diff = vec![0f64; dim];
    for (k, (g, &o)) in grad.iter_mut().zip(out).enumerate().take(batch * neurons) {
        if o != at_clamp || *g == T::zero() {
            continue;
        }
        let (b, z) = (k / neurons, k % neurons);
        let (xb, cz) = (&x[b * dim..][..dim], &center[z * dim..][..dim]);
        for ((d, &xi), &ci) in diff.iter_mut().zip(xb).zip(cz) {
            *d = xi.to_f64() - ci.to_f64();
        }
        let a = &matrix[z * dim * dim..][..dim * dim];
        let m2: f64 = a
            .chunks_exact(dim)
            .zip(&diff)
            .map(|(row, &di)| {
                di * row
                    .iter()
                    .zip(&diff)
                    .map(|(&v, &dj)| v.to_f64() * dj)
                    .sum::<f64>()
            })
            .sum();
        if m2 < 0.0 {
            *g = T::zero();
        }
    }
}

/// `∂x` rows from `q = G [w P | -2 P c̃ | ·]` and the pair rows (their `x̃` part):
/// `∂x_i = 2 Σ_j Q_ij x̃_j + ℓ_i`.
fn input_gradient_rows<T: Real>(q: &[T], tile: &[T], dim: usize, grad_x: &mut [T]) {
    let w = width(dim);
    let t_count = pair_count(dim);
    let two = T::from_f64(2.0);
    for ((q_row, row), g) in q
        .chunks_exact(w)
        .zip(tile.chunks_exact(w))
        .zip(grad_x.chunks_exact_mut(dim))
    {
        let xs = &row[t_count..t_count + dim];
        g.copy_from_slice(&q_row[t_count..t_count + dim]);
        let mut t = 0;
        for i in 0..dim {
            let xi = xs[i];
            let qi = &q_row[t..t + dim - i];
            let mut dot = two * qi[0] * xi;
            let (gi, rest) = g[i..].split_at_mut(1);
            for ((gj, &qij), &xj) in rest.iter_mut().zip(&qi[1..]).zip(&xs[i + 1..]) {
                dot += qij * xj;
                *gj += qij * xi;
            }
            gi[0] += dot;
            t += dim - i;
        }
    }
}

/// Expanded backward: `(∂x (B, d), ∂c (Z, d), ∂input (Z, d, d))` of `Σ G ∘ m2`; `∂x` (half
/// the GEMM work) only `if input_gradient`.
pub(super) fn backward<T: Real>(
    x: &[T],
    center: &[T],
    input: &[T],
    grad: &[T],
    source: Source,
    s: Sizes,
    input_gradient: bool,
) -> Gradients3<T> {
    let Sizes {
        batch,
        dim,
        neurons,
    } = s;
    let mut grad_x = input_gradient.then(|| vec![T::zero(); batch * dim]);
    let mut grad_center = vec![T::zero(); neurons * dim];
    let mut grad_input = vec![T::zero(); neurons * dim * dim];
    if batch == 0 || neurons == 0 || dim == 0 {
        return (grad_x, grad_center, grad_input);
    }
    let w = width(dim);
    let factors = factors_for(input, source, s);
    let (shift, centered) = shift_and_centered(center, s);
    let mut packed = vec![T::zero(); neurons * w];
    pack_neurons(input, factors.as_ref(), &centered, 0, dim, &mut packed);
    let tile_rows = backward_tile_rows(dim);
    let chunk_rows = rows_per_chunk(batch);
    // Row chunks of the batch: (rows, their rows of ∂x where it is wanted).
    let chunks: Vec<(usize, Option<&mut [T]>)> = match grad_x.as_mut() {
        Some(grad_x) => grad_x
            .chunks_mut(chunk_rows * dim)
            .map(|gx| (gx.len() / dim, Some(gx)))
            .collect(),
        None => (0..batch)
            .step_by(chunk_rows)
            .map(|row0| (chunk_rows.min(batch - row0), None))
            .collect(),
    };
    // Per thread: Σ_b G_bz [pairs | x̃ | 1]_b (Z, W), a pair tile and a q tile.
    let states = for_each_with_state(
        chunks,
        || {
            let rows = tile_rows.min(chunk_rows);
            (
                vec![T::zero(); neurons * w],
                vec![T::zero(); rows * w],
                vec![T::zero(); if input_gradient { rows * w } else { 0 }],
            )
        },
        |(sums, tile, q), chunk, (rows, mut gx_chunk)| {
            let row0 = chunk * chunk_rows;
            for t0 in (0..rows).step_by(tile_rows) {
                let m = tile_rows.min(rows - t0);
                let first = row0 + t0;
                let tile = &mut tile[..m * w];
                pair_rows(&x[first * dim..(first + m) * dim], &shift, tile);
                let g_rows = &grad[first * neurons..(first + m) * neurons];
                let tile_view = MatRef {
                    data: &*tile,
                    row_stride: w,
                    col_stride: 1,
                };
                matmul(
                    (neurons, w, m),
                    sums,
                    w,
                    true,
                    MatRef {
                        data: g_rows,
                        row_stride: 1,
                        col_stride: neurons,
                    },
                    tile_view,
                );
                let Some(gx_chunk) = gx_chunk.as_deref_mut() else {
                    continue;
                };
                let q = &mut q[..m * w];
                matmul(
                    (m, w, neurons),
                    q,
                    w,
                    false,
                    MatRef {
                        data: g_rows,
                        row_stride: neurons,
                        col_stride: 1,
                    },
                    MatRef {
                        data: &packed,
                        row_stride: w,
                        col_stride: 1,
                    },
                );
                input_gradient_rows(q, tile, dim, &mut gx_chunk[t0 * dim..(t0 + m) * dim]);
            }
        },
    );
    let mut states = states.into_iter();
    let mut sums = match states.next() {
        Some((sums, _, _)) => sums,
        None => vec![T::zero(); neurons * w],
    };
    for (other, _, _) in states {
        sums.iter_mut().zip(&other).for_each(|(a, &b)| *a += b);
    }
    let t_count = pair_count(dim);
    let tail_work = neurons * (dim * dim * dim / 6 + 4 * dim * dim);
    for_each_chunk_pair_mut_sized(
        tail_work,
        &mut grad_center,
        dim,
        &mut grad_input,
        dim * dim,
        |z, gc, gi| {
            let row = &sums[z * w..(z + 1) * w];
            let (pair_sums, rest) = row.split_at(t_count);
            let xg = &rest[..dim];
            let total = rest[dim];
            let c = &centered[z * dim..(z + 1) * dim];
            // S = Σ_b G_bz (x̃_b - c̃)(x̃_b - c̃)ᵀ, symmetric, in f64.
            let mut sym = vec![0f64; dim * dim];
            let mut t = 0;
            for i in 0..dim {
                for j in i..dim {
                    let v = pair_sums[t].to_f64()
                        - xg[i].to_f64() * c[j].to_f64()
                        - c[i].to_f64() * xg[j].to_f64()
                        + total.to_f64() * c[i].to_f64() * c[j].to_f64();
                    sym[i * dim + j] = v;
                    sym[j * dim + i] = v;
                    t += 1;
                }
            }
            // ∂c̃ = 2 P (s c̃ - Σ_b G x̃), P unpacked from the packed row.
            let p_row = &packed[z * w..z * w + t_count];
            let residual: Vec<f64> = (0..dim)
                .map(|i| total.to_f64() * c[i].to_f64() - xg[i].to_f64())
                .collect();
            let mut t = 0;
            let mut acc = vec![0f64; dim];
            for i in 0..dim {
                acc[i] += p_row[t].to_f64() * residual[i];
                for j in i + 1..dim {
                    let pij = 0.5 * p_row[t + j - i].to_f64();
                    acc[i] += pij * residual[j];
                    acc[j] += pij * residual[i];
                }
                t += dim - i;
            }
            for (g, a) in gc.iter_mut().zip(&acc) {
                *g = T::from_f64(2.0 * a);
            }
            match (source, factors.as_ref()) {
                (Source::Factor(map), Some(factors)) => {
                    // ∂F = 2 S F (one small GEMM at full SIMD width), then through the map
                    // to the input (which keeps only the lower triangle for Cholesky).
                    let mut l = vec![T::zero(); dim * dim];
                    for i in 0..dim {
                        factors.write_row(z, i, &mut l[i * dim..(i + 1) * dim]);
                    }
                    let sym_t: Vec<T> = sym.iter().map(|&v| T::from_f64(2.0 * v)).collect();
                    if factors.is_lower_triangular() {
                        // Only the lower triangle survives the map.
                        lower_product(&sym_t, &l, dim, gi);
                        map.chain(&input[z * dim * dim..(z + 1) * dim * dim], dim, gi);
                        return;
                    }
                    matmul(
                        (dim, dim, dim),
                        gi,
                        dim,
                        false,
                        MatRef {
                            data: &sym_t,
                            row_stride: dim,
                            col_stride: 1,
                        },
                        MatRef {
                            data: &l,
                            row_stride: dim,
                            col_stride: 1,
                        },
                    );
                    map.chain(&input[z * dim * dim..(z + 1) * dim * dim], dim, gi);
                }
                _ => {
                    for (g, v) in gi.iter_mut().zip(&sym) {
                        *g = T::from_f64(*v);
                    }
                }
            }
        },
    );
    (grad_x, grad_center, grad_input)
}
