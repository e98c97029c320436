//! Diagonal precisions (diag and sphere): `m2[b, z] = Σ_i p_zi (x_bi - c_zi)²` in B·Z·d
//! work. The fused CPU op computes it exactly (no expansion, no cancellation) in one pass with
//! its fused backward, no (B, Z, d) temporary; its portable twin is the expanded form in
//! matmuls (tensor ops), clamped at 0.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

use crate::cpu::{
    check_fused_inputs, dispatch_backward3, dispatch_float3, for_each_chunk_mut,
    for_each_chunk_pair_mut, poison_non_finite_rows, rows_per_chunk, OperandShape, Real, Sizes,
};
use crate::error::Result;

/// The portable twin: `(x∘x) pᵀ − 2 x (p∘c)ᵀ + Σ_i p_zi c_zi²` in tensor ops (every device,
/// autograd), no (B, Z, d) tensor, clamped at 0 against cancellation.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `diagonal`: (Z, d) → (B, Z)
pub(crate) fn portable(x: &Tensor, center: &Tensor, diagonal: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weighted_center = (diagonal * center)?;
    let quadratic = x.sqr()?.matmul(&diagonal.t()?)?;
    let cross = x.matmul(&weighted_center.t()?)?;
    let constant = (weighted_center * center)?.sum(D::Minus1)?.unsqueeze(0)?;
    Ok((quadratic - (cross * 2.0)?)?
        .broadcast_add(&constant)?
        .relu()?)
}

/// `Σ_i p_i (x_i - c_i)²` with eight independent accumulators, so it vectorizes.
#[inline]
fn weighted_squared_distance<T: Real>(x: &[T], c: &[T], p: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let split = x.len() - x.len() % 8;
    for ((xc, cc), pc) in x[..split]
        .chunks_exact(8)
        .zip(c[..split].chunks_exact(8))
        .zip(p[..split].chunks_exact(8))
    {
        for l in 0..8 {
            let diff = xc[l] - cc[l];
            lanes[l] += pc[l] * diff * diff;
        }
    }
    let mut total = T::zero();
    for i in split..x.len() {
        let diff = x[i] - c[i];
        total += p[i] * diff * diff;
    }
    for lane in lanes {
        total += lane;
    }
    total
}

fn forward<T: Real>(x: &[T], center: &[T], diagonal: &[T], s: Sizes) -> Vec<T> {
    let Sizes {
        batch,
        dim,
        neurons,
    } = s;
    let mut out = vec![T::zero(); batch * neurons];
    if batch == 0 || neurons == 0 || dim == 0 {
        return out;
    }
    let chunk_rows = rows_per_chunk(batch);
    for_each_chunk_mut(&mut out, chunk_rows * neurons, |chunk, out_chunk| {
        let row0 = chunk * chunk_rows;
        for (r, out_row) in out_chunk.chunks_exact_mut(neurons).enumerate() {
            let xb = &x[(row0 + r) * dim..(row0 + r + 1) * dim];
            for (z, o) in out_row.iter_mut().enumerate() {
                let range = z * dim..(z + 1) * dim;
                *o = weighted_squared_distance(xb, &center[range.clone()], &diagonal[range]);
            }
        }
    });
    poison_non_finite_rows(&mut out, x, dim, neurons);
    out
}

fn backward<T: Real>(
    x: &[T],
    center: &[T],
    diagonal: &[T],
    grad: &[T],
    s: Sizes,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Sizes {
        batch,
        dim,
        neurons,
    } = s;
    let two = T::from_f64(2.0);
    let mut grad_x = vec![T::zero(); batch * dim];
    let mut grad_center = vec![T::zero(); neurons * dim];
    let mut grad_diagonal = vec![T::zero(); neurons * dim];
    if dim == 0 {
        return (grad_x, grad_center, grad_diagonal);
    }
    // ∂x_b = 2 Σ_z G_bz p_z ∘ (x_b - c_z)
    let chunk_rows = rows_per_chunk(batch);
    for_each_chunk_mut(&mut grad_x, chunk_rows * dim, |chunk, gx_chunk| {
        for (r, gx) in gx_chunk.chunks_exact_mut(dim).enumerate() {
            let b = chunk * chunk_rows + r;
            let xb = &x[b * dim..(b + 1) * dim];
            for z in 0..neurons {
                let g2 = two * grad[b * neurons + z];
                let c = &center[z * dim..(z + 1) * dim];
                let p = &diagonal[z * dim..(z + 1) * dim];
                for i in 0..dim {
                    gx[i] += g2 * p[i] * (xb[i] - c[i]);
                }
            }
        }
    });
    // ∂c_z = -2 p_z ∘ Σ_b G_bz (x_b - c_z),  ∂p_z = Σ_b G_bz (x_b - c_z)²
    for_each_chunk_pair_mut(
        &mut grad_center,
        dim,
        &mut grad_diagonal,
        dim,
        |z, gc, gp| {
            let c = &center[z * dim..(z + 1) * dim];
            for b in 0..batch {
                let g = grad[b * neurons + z];
                let xb = &x[b * dim..(b + 1) * dim];
                for i in 0..dim {
                    let diff = xb[i] - c[i];
                    let gd = g * diff;
                    gc[i] += gd;
                    gp[i] += gd * diff;
                }
            }
            let p = &diagonal[z * dim..(z + 1) * dim];
            for i in 0..dim {
                gc[i] = T::zero() - two * p[i] * gc[i];
            }
        },
    );
    (grad_x, grad_center, grad_diagonal)
}

/// The Candle op: inputs (x, center, diagonal), output m2 (B, Z).
#[derive(Clone, Copy, Debug, Default)]
struct DiagonalDistance;

const OPERAND: &str = "diagonal precision";

impl CustomOp3 for DiagonalDistance {
    fn name(&self) -> &'static str {
        "diagonal-mahalanobis-sq"
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
        let s = Sizes::of(
            l1.dims(),
            l2.dims(),
            l3.dims(),
            OperandShape::Diagonal,
            OPERAND,
        )?;
        let out = dispatch_float3(
            self.name(),
            "x, center and diagonal",
            [(s1, l1), (s2, l2), (s3, l3)],
            |x, c, p| CpuStorage::F32(forward(x, c, p, s)),
            |x, c, p| CpuStorage::F64(forward(x, c, p, s)),
        )?;
        Ok((out, Shape::from((s.batch, s.neurons))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        center: &Tensor,
        diagonal: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = Sizes::of(
            x.dims(),
            center.dims(),
            diagonal.dims(),
            OperandShape::Diagonal,
            OPERAND,
        )?;
        dispatch_backward3(
            self.name(),
            [x, center, diagonal, grad],
            s.gradient_shapes(OperandShape::Diagonal),
            |x, c, p, g| backward(x, c, p, g, s),
            |x, c, p, g| backward(x, c, p, g, s),
        )
    }
}

/// Diagonal-precision distances through the fused CPU op (with its fused backward).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `diagonal`: (Z, d) → (B, Z)
pub(crate) fn fused(x: &Tensor, center: &Tensor, diagonal: &Tensor) -> Result<Tensor> {
    check_fused_inputs(
        "diagonal Mahalanobis kernel",
        [x, center, diagonal],
        OperandShape::Diagonal,
        OPERAND,
    )?;
    Ok(x.apply_op3(center, diagonal, DiagonalDistance)?)
}
