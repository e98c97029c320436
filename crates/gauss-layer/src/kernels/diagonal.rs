//! Diagonal precisions (diag and sphere): `m2[b, z] = Σ_i p_zi (x_bi - c_zi)²` in B·Z·d
//! work. The fused CPU form ([`FusedPlan::Diagonal`](super::distance_op::FusedPlan) of the
//! fused distance op; layers compose it with their linear part) computes it exactly (no
//! expansion, no cancellation) in one pass with its fused backward, no (B, Z, d) temporary;
//! its portable twin is the expanded form in matmuls (tensor ops), clamped at 0.

use candle_core::{Tensor, D};

use crate::cpu::{
    for_each_chunk_mut, for_each_chunk_pair_mut, rows_per_chunk, simd_kernel, Gradients3, Real,
    Sizes,
};
use crate::error::Result;

/// The portable twin: `(x∘x) pᵀ − 2 x (p∘c)ᵀ + Σ_i p_zi c_zi²` in tensor ops (every device,
/// autograd), no (B, Z, d) tensor, clamped at 0 against cancellation. x and the centers are
/// shifted by the centers' mean `c̄` first: the three terms cancel to `m2`, and their size sets
/// the rounding error, about `ε · Σ_i p_zi ((x_bi − c̄_i)² + (c_zi − c̄_i)²)`. The shift keeps
/// data far from the origin (pixels around 128) exact near a center; what it cannot help is a
/// spread of centers: one center far from the others moves `c̄`, and the others' `m2` lose
/// digits with it (f32, P = I/2, one center 1e4 away among centers near 0.5: `m2` off by up to
/// 0.63, the test `diagonal_portable_error_stays_within_its_documented_bound`). It is the
/// expansion `torch.cdist` makes for speed, with the same limit; the (B, Z, d) difference form
/// (the original FGN code's) was exact but 30× slower in a CPU backward and 25× the memory
/// (784 → 64, batch 128). `DistanceKernel::Naive` gives the exact form.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `diagonal`: (Z, d) → (B, Z)
pub(crate) fn portable(x: &Tensor, center: &Tensor, diagonal: &Tensor) -> Result<Tensor> {
    // m2 does not change when x and c move together, so the shift carries no gradient.
    let shift = center.detach().mean_keepdim(0)?;
    let x = x.broadcast_sub(&shift)?.contiguous()?;
    let center = center.broadcast_sub(&shift)?;
    let weighted_center = (diagonal * &center)?;
    let quadratic = x.sqr()?.matmul(&diagonal.t()?)?;
    let cross = x.matmul(&weighted_center.t()?)?;
    let constant = (weighted_center * &center)?.sum(D::Minus1)?.unsqueeze(0)?;
    super::clamp_at_zero(&(quadratic - (cross * 2.0)?)?.broadcast_add(&constant)?)
}

/// Input rows handled together by the loops below: each neuron's center and diagonal are read
/// once per block of rows instead of once per row (for d = 784 and Z = 64 they are 400 KB,
/// about an L2 cache, so reading them per row made the kernel wait on memory).
const ROW_BLOCK: usize = 4;

/// `Σ_i p_i (x_i - c_i)²` for each of the `R` rows `xs`, each with eight independent
/// accumulators so it vectorizes. A row's result does not depend on `R` (the same operations
/// in the same order), so blocked and single rows agree bit for bit.
#[inline(always)]
fn weighted_squared_distances<T: Real, const R: usize>(xs: [&[T]; R], c: &[T], p: &[T]) -> [T; R] {
    let dim = c.len();
    let p = &p[..dim];
    let xs = xs.map(|x| &x[..dim]);
    let split = dim - dim % 8;
    let mut lanes = [[T::zero(); 8]; R];
    for (k, (cc, pc)) in c[..split]
        .chunks_exact(8)
        .zip(p[..split].chunks_exact(8))
        .enumerate()
    {
        for (row_lanes, x) in lanes.iter_mut().zip(xs) {
            let xc = &x[k * 8..k * 8 + 8];
            for l in 0..8 {
                let diff = xc[l] - cc[l];
                row_lanes[l] += pc[l] * diff * diff;
            }
        }
    }
    let mut totals = [T::zero(); R];
    for ((total, row_lanes), x) in totals.iter_mut().zip(lanes).zip(xs) {
        for i in split..dim {
            let diff = x[i] - c[i];
            *total += p[i] * diff * diff;
        }
        for lane in row_lanes {
            *total += lane;
        }
    }
    totals
}

simd_kernel! {
    /// m2 of the input rows `x_rows` (r, d) against every neuron, into `out_rows` (r, Z).
    fn forward_rows<T: Real>(x_rows: &[T], center: &[T], diagonal: &[T], out_rows: &mut [T], dim: usize) {
        let neurons = center.len() / dim;
        let mut x_blocks = x_rows.chunks_exact(ROW_BLOCK * dim);
        let mut out_blocks = out_rows.chunks_exact_mut(ROW_BLOCK * neurons);
        for (x_block, out_block) in (&mut x_blocks).zip(&mut out_blocks) {
            let xs: [&[T]; ROW_BLOCK] = std::array::from_fn(|r| &x_block[r * dim..(r + 1) * dim]);
            for (z, (c, p)) in center
                .chunks_exact(dim)
                .zip(diagonal.chunks_exact(dim))
                .enumerate()
            {
                let m2 = weighted_squared_distances(xs, c, p);
                for (r, value) in m2.into_iter().enumerate() {
                    out_block[r * neurons + z] = value;
                }
            }
        }
        let rest = x_blocks.remainder().chunks_exact(dim);
        for (xb, out_row) in rest.zip(out_blocks.into_remainder().chunks_exact_mut(neurons)) {
            for ((o, c), p) in out_row
                .iter_mut()
                .zip(center.chunks_exact(dim))
                .zip(diagonal.chunks_exact(dim))
            {
                [*o] = weighted_squared_distances([xb], c, p);
            }
        }
    }
}

simd_kernel! {
    /// `∂x_b = 2 Σ_z G_bz p_z ∘ (x_b - c_z)` for the rows `x_rows` (r, d) with their incoming
    /// gradient rows `grad_rows` (r, Z), into `grad_x_rows` (r, d).
    fn grad_x_rows<T: Real>(
        x_rows: &[T],
        center: &[T],
        diagonal: &[T],
        grad_rows: &[T],
        grad_x_rows: &mut [T],
        dim: usize,
    ) {
        let two = T::from_f64(2.0);
        let neurons = center.len() / dim;
        // The last block may be short: the loops inside go row by row, so it needs no tail.
        for ((x_block, gx_block), grad_block) in x_rows
            .chunks(ROW_BLOCK * dim)
            .zip(grad_x_rows.chunks_mut(ROW_BLOCK * dim))
            .zip(grad_rows.chunks(ROW_BLOCK * neurons))
        {
            for (z, (c, p)) in center.chunks_exact(dim).zip(diagonal.chunks_exact(dim)).enumerate() {
                for ((xb, gx), grad_row) in x_block
                    .chunks_exact(dim)
                    .zip(gx_block.chunks_exact_mut(dim))
                    .zip(grad_block.chunks_exact(neurons))
                {
                    let g2 = two * grad_row[z];
                    for ((gx_i, &p_i), (&x_i, &c_i)) in gx.iter_mut().zip(p).zip(xb.iter().zip(c)) {
                        *gx_i += g2 * p_i * (x_i - c_i);
                    }
                }
            }
        }
    }
}

/// Input coordinates whose ∂c and ∂p sums stay in registers while [`grad_neuron`] runs over
/// the batch (three vectors each of center, ∂c and ∂p at AVX2 width): accumulating in memory
/// instead cost two loads and two stores per coordinate and row.
const GRAD_COLUMNS: usize = 16;

simd_kernel! {
    /// Neuron z's `∂c_z = -2 p_z ∘ Σ_b G_bz (x_b - c_z)` and `∂p_z = Σ_b G_bz (x_b - c_z)²`,
    /// into `grad_center` and `grad_diagonal` (d each), [`GRAD_COLUMNS`] coordinates at a
    /// time, each summed over the rows in order.
    #[allow(clippy::too_many_arguments)]
    fn grad_neuron<T: Real>(
        x: &[T],
        center: &[T],
        diagonal: &[T],
        grad: &[T],
        z: usize,
        neurons: usize,
        grad_center: &mut [T],
        grad_diagonal: &mut [T],
    ) {
        let dim = center.len();
        let rows = || x.chunks_exact(dim).zip(grad.chunks_exact(neurons));
        let mut start = 0;
        while start < dim {
            let width = GRAD_COLUMNS.min(dim - start);
            let span = start..start + width;
            if width == GRAD_COLUMNS {
                let mut c = [T::zero(); GRAD_COLUMNS];
                c.copy_from_slice(&center[span.clone()]);
                let mut gc = [T::zero(); GRAD_COLUMNS];
                let mut gp = [T::zero(); GRAD_COLUMNS];
                for (xb, grad_row) in rows() {
                    let g = grad_row[z];
                    let xs = &xb[span.clone()];
                    for l in 0..GRAD_COLUMNS {
                        let diff = xs[l] - c[l];
                        let gd = g * diff;
                        gc[l] += gd;
                        gp[l] += gd * diff;
                    }
                }
                grad_center[span.clone()].copy_from_slice(&gc);
                grad_diagonal[span].copy_from_slice(&gp);
            } else {
                for (xb, grad_row) in rows() {
                    let g = grad_row[z];
                    for ((gc_i, gp_i), (&x_i, &c_i)) in grad_center[span.clone()]
                        .iter_mut()
                        .zip(grad_diagonal[span.clone()].iter_mut())
                        .zip(xb[span.clone()].iter().zip(&center[span.clone()]))
                    {
                        let diff = x_i - c_i;
                        let gd = g * diff;
                        *gc_i += gd;
                        *gp_i += gd * diff;
                    }
                }
            }
            start += width;
        }
        let two = T::from_f64(2.0);
        for (gc_i, &p_i) in grad_center.iter_mut().zip(diagonal) {
            *gc_i = T::zero() - two * p_i * *gc_i;
        }
    }
}

/// `m2` (B, Z) into `out` (zeros on entry): the exact weighted distances, rows in parallel
/// chunks. Non-finite input rows are left to the caller
/// ([`FusedPlan::forward_into`](super::distance_op::FusedPlan) poisons them for every plan).
pub(super) fn forward_into<T: Real>(
    out: &mut [T],
    x: &[T],
    center: &[T],
    diagonal: &[T],
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
    let chunk_rows = rows_per_chunk(batch);
    for_each_chunk_mut(out, chunk_rows * neurons, |chunk, out_chunk| {
        let row0 = chunk * chunk_rows;
        let rows = out_chunk.len() / neurons;
        let x_rows = &x[row0 * dim..(row0 + rows) * dim];
        forward_rows(x_rows, center, diagonal, out_chunk, dim);
    });
}

/// Gradients `(∂x, ∂c, ∂p)` of `Σ G ∘ m2`; `∂x` only `if input_gradient`.
pub(super) fn backward<T: Real>(
    x: &[T],
    center: &[T],
    diagonal: &[T],
    grad: &[T],
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
    let mut grad_diagonal = vec![T::zero(); neurons * dim];
    if dim == 0 || neurons == 0 {
        return (grad_x, grad_center, grad_diagonal);
    }
    if let Some(grad_x) = grad_x.as_mut() {
        let chunk_rows = rows_per_chunk(batch);
        for_each_chunk_mut(grad_x, chunk_rows * dim, |chunk, gx_chunk| {
            let row0 = chunk * chunk_rows;
            let rows = gx_chunk.len() / dim;
            grad_x_rows(
                &x[row0 * dim..(row0 + rows) * dim],
                center,
                diagonal,
                &grad[row0 * neurons..(row0 + rows) * neurons],
                gx_chunk,
                dim,
            );
        });
    }
    for_each_chunk_pair_mut(
        &mut grad_center,
        dim,
        &mut grad_diagonal,
        dim,
        |z, gc, gp| {
            let range = z * dim..(z + 1) * dim;
            grad_neuron(
                x,
                &center[range.clone()],
                &diagonal[range],
                grad,
                z,
                neurons,
                gc,
                gp,
            );
        },
    );
    (grad_x, grad_center, grad_diagonal)
}
