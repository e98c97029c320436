//! The whole layer forward as one fused CPU op, with its portable twin
//! ([`forward_portable`]) beside it and [`Resolved::run_layer`] choosing by the resolver's
//! plan: `g = exp(-m2/2)`, `y = act(x Wᵀ + b) ∘ g` (`act` = tanh or identity), with `m2` from the
//! fused expanded or projected algorithm the resolver planned.
//!
//! One op instead of six (B, Z) elementwise ops and a matmul. Its output is one (2, B, Z)
//! tensor holding `y` then `g`, which the caller reads as two views: the backward gets `g`
//! from the op's own output and `∂y`, `∂g` from the upstream gradient (zeros where the loss
//! uses only one of them), so the op carries no state between forward and backward and any
//! number of backward passes over one graph agree. The backward recomputes the linear part
//! (a B·Z·d GEMM) and runs the distance algorithm's backward once.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::distance_op::FusedPlan;
use super::expanded::{zero_clamped_gradients, Source};
use super::linear_op::{linear_backward, linear_rows};
use super::{Operand, Resolved};
use crate::cpu::{
    check_built_for, dispatch_float3, for_each_chunk_pair_mut, host_backward3,
    needs_input_gradient, rows_per_chunk, with_row_major, Gradients3, MatRef, Real, Sizes,
};
use crate::error::Result;

/// The linear part of a layer: `act(x Wᵀ + b)` with `act` tanh or the identity.
pub(crate) struct Linear<'a> {
    /// W (Z, d).
    pub weight: &'a Tensor,
    /// b (Z): the stored bias, or the tied `-W·c`.
    pub bias: Option<Tensor>,
    pub tanh: bool,
}

impl Resolved {
    /// The layer's `y` and `g` on rows `x` (N, d) with this plan: the fused op where the
    /// resolver planned a fused full-precision distance and the layer has a linear part, else
    /// [`forward_portable`] (around the fused distance op where one is planned). Without a
    /// linear part `y` is `g`.
    ///
    /// The diagonal plan stays out of the fused layer op: its distance costs no more than the
    /// linear part, which the op packs with the centers and recomputes in its backward; measured
    /// (`bench-train --params diag --in 784`, one thread) 4.5–5.5 ms a step through the op
    /// against 3.7–3.9 ms composed.
    ///
    /// # Shapes
    /// `x`: (N, d), `center`: (Z, d) → `y`, `g`: (N, Z)
    pub(crate) fn run_layer(
        &self,
        x: &Tensor,
        center: &Tensor,
        linear: Option<&Linear>,
    ) -> Result<(Tensor, Tensor)> {
        match (linear, &self.operand) {
            (Some(linear), Operand::Fused(input, plan)) if *plan != FusedPlan::Diagonal => forward(
                self.sizes,
                x,
                center,
                linear.weight,
                linear.bias.as_ref(),
                input,
                *plan,
                linear.tanh,
            ),
            _ => forward_portable(x, center, linear, self),
        }
    }
}

/// The portable twin of the fused op, in tensor ops: `m2` through the resolved kernel, then
/// `g = exp(-m2/2)` and `y = act(x Wᵀ + b) ∘ g` (`y = g` without a linear part). Where the
/// resolver planned a fused distance (the diagonal and low-rank plans come here), the linear
/// part is the fused linear op ([`super::linear_op`]).
///
/// # Shapes
/// `x`: (N, d), `center`: (Z, d) → `y`, `g`: (N, Z)
pub(crate) fn forward_portable(
    x: &Tensor,
    center: &Tensor,
    linear: Option<&Linear>,
    resolved: &Resolved,
) -> Result<(Tensor, Tensor)> {
    let g = super::gaussian(&super::run(x, center, resolved)?)?;
    let Some(linear) = linear else {
        return Ok((g.clone(), g));
    };
    let activation = super::linear_op::forward(
        resolved.runs_fused(),
        resolved.sizes,
        x,
        linear.weight,
        linear.bias.as_ref(),
        linear.tanh,
    )?;
    Ok(((activation * &g)?, g))
}

/// The Candle op: inputs x (B, d), params (Z, 2d [+1]) = [center | weight | bias], factor
/// input (Z, d, d); output (2, B, Z) holding `y` then `g`.
#[derive(Clone, Copy, Debug)]
struct FusedGaussLayer {
    plan: FusedPlan,
    has_bias: bool,
    tanh: bool,
    /// The sizes the public boundary checked; the op's inputs were built to them.
    sizes: Sizes,
}

/// Center, weight and bias (zeros without one) split out of the packed parameters.
struct Params<'a, T> {
    center: Vec<T>,
    /// W (Z, d), read in place from the packed parameters.
    weight: MatRef<'a, T>,
    bias: Vec<T>,
}

impl FusedGaussLayer {
    fn width(&self, dim: usize) -> usize {
        2 * dim + usize::from(self.has_bias)
    }

    /// The op's input shapes: x (B, d), params (Z, 2d [+ 1]), factor (Z, d, d).
    fn input_shapes(&self) -> [Shape; 3] {
        let s = self.sizes;
        [
            (s.batch, s.dim).into(),
            (s.neurons, self.width(s.dim)).into(),
            (s.neurons, s.dim, s.dim).into(),
        ]
    }

    /// The op's guard ([`check_built_for`]) on the inputs Candle hands it; returns the sizes.
    fn built_for(&self, dims: [&[usize]; 3]) -> candle_core::Result<Sizes> {
        check_built_for(self.name(), dims, &self.input_shapes())?;
        Ok(self.sizes)
    }

    fn split<'a, T: Real>(&self, params: &'a [T], s: Sizes) -> Params<'a, T> {
        let width = self.width(s.dim);
        let mut out = Params {
            center: Vec::with_capacity(s.neurons * s.dim),
            weight: MatRef {
                data: params.get(s.dim..).unwrap_or(&[]),
                row_stride: width,
                col_stride: 1,
            },
            bias: vec![T::zero(); s.neurons],
        };
        for (z, row) in params.chunks_exact(width).enumerate() {
            out.center.extend_from_slice(&row[..s.dim]);
            if self.has_bias {
                out.bias[z] = row[2 * s.dim];
            }
        }
        out
    }

    /// `[y | g]` as one (2, B, Z) buffer.
    fn forward<T: Real>(&self, x: &[T], params: &[T], factor: &[T], s: Sizes) -> Vec<T> {
        let p = self.split(params, s);
        let (batch, dim, neurons) = (s.batch, s.dim, s.neurons);
        let mut out = vec![T::zero(); 2 * batch * neurons];
        let (y, g) = out.split_at_mut(batch * neurons);
        self.plan.forward_into(g, x, &p.center, factor, s); // g holds m2 for now
        if batch == 0 || neurons == 0 {
            return out;
        }
        let tanh = self.tanh;
        let chunk_rows = rows_per_chunk(batch);
        let half = T::from_f64(-0.5);
        for_each_chunk_pair_mut(
            y,
            chunk_rows * neurons,
            g,
            chunk_rows * neurons,
            |chunk, y, g| {
                let row0 = chunk * chunk_rows;
                let rows = y.len() / neurons;
                linear_rows(y, &x[row0 * dim..(row0 + rows) * dim], p.weight, s);
                for (y_row, g_row) in y.chunks_exact_mut(neurons).zip(g.chunks_exact_mut(neurons)) {
                    for ((yv, gv), &b) in y_row.iter_mut().zip(g_row.iter_mut()).zip(&p.bias) {
                        *gv = (half * *gv).exp();
                        let lin = *yv + b;
                        *yv = if tanh { lin.tanh() } else { lin } * *gv;
                    }
                }
            },
        );
        out
    }

    /// Gradients (∂x, ∂params, ∂factor input) from `g` and the gradients of `y` and `g`;
    /// ∂x only `if input_gradient`.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        x: &[T],
        params: &[T],
        factor: &[T],
        g: &[T],
        grad_y: &[T],
        grad_g: &[T],
        s: Sizes,
        input_gradient: bool,
    ) -> Gradients3<T> {
        let tanh = self.tanh;
        let p = self.split(params, s);
        let (batch, dim, neurons) = (s.batch, s.dim, s.neurons);
        let bz = batch * neurons;
        let chunk_rows = rows_per_chunk(batch);
        let half = T::from_f64(-0.5);
        // ∂lin = ∂y ∘ g ∘ act'(lin);  ∂m2 = -g/2 ∘ (∂y ∘ act(lin) + ∂g)
        let mut grad_lin = vec![T::zero(); bz];
        let mut grad_m2 = vec![T::zero(); bz];
        if bz > 0 {
            for_each_chunk_pair_mut(
                &mut grad_lin,
                chunk_rows * neurons,
                &mut grad_m2,
                chunk_rows * neurons,
                |chunk, gl, gm| {
                    let row0 = chunk * chunk_rows;
                    let rows = gl.len() / neurons;
                    linear_rows(gl, &x[row0 * dim..(row0 + rows) * dim], p.weight, s);
                    let e0 = row0 * neurons;
                    let rows_g = &g[e0..e0 + gl.len()];
                    let rows_gy = &grad_y[e0..e0 + gl.len()];
                    let rows_gg = &grad_g[e0..e0 + gl.len()];
                    for r in 0..rows {
                        let span = r * neurons..(r + 1) * neurons;
                        let (l_row, m_row) = (&mut gl[span.clone()], &mut gm[span.clone()]);
                        let (g_row, gy_row) = (&rows_g[span.clone()], &rows_gy[span.clone()]);
                        let iter = l_row
                            .iter_mut()
                            .zip(m_row.iter_mut())
                            .zip(g_row.iter().zip(gy_row))
                            .zip(&p.bias);
                        for ((((l, m), (&gv, &gy)), &b), &gg) in iter.zip(&rows_gg[span]) {
                            let lin = *l + b;
                            let (act, slope) = if tanh {
                                let t = lin.tanh();
                                (t, T::one() - t * t)
                            } else {
                                (lin, T::one())
                            };
                            *l = gy * gv * slope;
                            *m = half * gv * (gy * act + gg);
                        }
                    }
                },
            );
        }
        if let FusedPlan::Expanded {
            source: Source::Matrix,
            ..
        } = self.plan
        {
            // A clamped m2 (g = 1 there) passes no gradient where it was negative.
            zero_clamped_gradients(&mut grad_m2, g, T::one(), x, &p.center, factor, s);
        }
        let (mut grad_x, grad_center, grad_factor) =
            self.plan
                .backward(x, &p.center, factor, &grad_m2, s, input_gradient);
        if bz == 0 || dim == 0 {
            let grad_params = vec![T::zero(); neurons * self.width(dim)];
            return (grad_x, grad_params, grad_factor);
        }
        let (grad_weight, grad_bias) =
            linear_backward(&grad_lin, x, p.weight, s, grad_x.as_deref_mut());
        let width = self.width(dim);
        let mut grad_params = vec![T::zero(); neurons * width];
        for (z, row) in grad_params.chunks_exact_mut(width).enumerate() {
            row[..dim].copy_from_slice(&grad_center[z * dim..(z + 1) * dim]);
            row[dim..2 * dim].copy_from_slice(&grad_weight[z * dim..(z + 1) * dim]);
            if self.has_bias {
                row[2 * dim] = grad_bias[z];
            }
        }
        (grad_x, grad_params, grad_factor)
    }
}

impl CustomOp3 for FusedGaussLayer {
    fn name(&self) -> &'static str {
        "fused-gauss-layer"
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
        let sizes = self.built_for([l1.dims(), l2.dims(), l3.dims()])?;
        let out = dispatch_float3(
            self.name(),
            "inputs",
            [(s1, l1), (s2, l2), (s3, l3)],
            |x, p, f| CpuStorage::F32(self.forward(x, p, f, sizes)),
            |x, p, f| CpuStorage::F64(self.forward(x, p, f, sizes)),
        )?;
        Ok((out, Shape::from((2, sizes.batch, sizes.neurons))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        factor: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The op's own output holds g (a view, read in place); the upstream gradient holds
        // ∂y then ∂g.
        let g = res.get(1)?;
        let (gx, gp, gf) = match x.dtype() {
            DType::F32 => self.backward_tensors::<f32>(x, params, factor, &g, grad)?,
            DType::F64 => self.backward_tensors::<f64>(x, params, factor, &g, grad)?,
            other => bail!("{}: supports f32 and f64, got {other:?}", self.name()),
        };
        Ok((gx, Some(gp), Some(gf)))
    }
}

impl FusedGaussLayer {
    fn backward_tensors<T: Real>(
        &self,
        x: &Tensor,
        params: &Tensor,
        factor: &Tensor,
        g: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        let s = self.built_for([x.dims(), params.dims(), factor.dims()])?;
        let input_gradient = needs_input_gradient(x);
        let bz = s.batch * s.neurons;
        let grad = grad.to_dtype(T::DTYPE)?.contiguous()?;
        host_backward3::<T>(
            [x, params, factor, &grad],
            self.input_shapes(),
            |x, p, f, grad| {
                with_row_major::<T, _>(g, |g| {
                    Ok(self.backward(x, p, f, g, &grad[..bz], &grad[bz..], s, input_gradient))
                })
            },
        )
    }
}

/// The whole layer forward as the fused CPU op: `(y, g)` with `g = exp(-m2/2)` and
/// `y = act(x Wᵀ + b) ∘ g` (`act` = tanh or identity), `m2` by `plan`. Pass a tied bias `-W·c`
/// as `bias` if the layer uses one; gating is applied by the caller.
///
/// The inputs are not checked again: `sizes` are those the public boundary checked (the
/// layer's forward) and the resolver planned a fused op for (f32 or f64 on the CPU, one
/// dtype), and the layer's own tensors hold its invariants.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `weight`: (Z, d), `bias`: (Z), `operand`: (Z, d, d)
/// → `y`: (B, Z), `g`: (B, Z)
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    sizes: Sizes,
    x: &Tensor,
    center: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    operand: &Tensor,
    plan: FusedPlan,
    tanh: bool,
) -> Result<(Tensor, Tensor)> {
    let mut parts = vec![center.clone(), weight.clone()];
    if let Some(bias) = bias {
        parts.push(bias.unsqueeze(1)?);
    }
    let params = Tensor::cat(&parts, 1)?;
    let op = FusedGaussLayer {
        plan,
        has_bias: bias.is_some(),
        tanh,
        sizes,
    };
    let packed = x.apply_op3(&params, operand, op)?;
    Ok((packed.get(0)?, packed.get(1)?))
}
