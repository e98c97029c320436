//! The whole default layer forward as one fused CPU op:
//! `g = exp(-m2/2)`, `y = (x Wᵀ + b) ∘ g`, with `m2` from the fused expanded or projected
//! kernel (whichever [`super::expanded_fused`]'s plan picks).
//!
//! One op instead of six (B, Z) elementwise ops and a matmul: the only (B, Z) buffers it
//! creates are its outputs `y` and `g`, in forward and in what autograd keeps alive. `y` is
//! the op's own output and `g` a second, free op on it that takes the `g` the forward
//! computed, so no narrowing of a packed output costs autograd (B, Z) zero-fills and copies.
//! The backward (on `y`'s node) folds in `∂g` handed over by `g`'s node, recomputes the
//! linear part (a B·Z·d GEMM) and runs the distance kernel's fused backward once.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use gauss_layer::kernels::fused_layer::gauss_layer_forward_fused;
//! use gauss_layer::{DistanceKernel, GaussLayerConfig, Precision};
//! let config = GaussLayerConfig::default();
//! let raw = Tensor::zeros((3, 2, 2), DType::F32, &Device::Cpu)?;
//! let precision = Precision::from_raw(raw, 2, &config)?;
//! let x = Tensor::ones((4, 2), DType::F32, &Device::Cpu)?;
//! let center = Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?;
//! let weight = Tensor::ones((3, 2), DType::F32, &Device::Cpu)?;
//! let fused = gauss_layer_forward_fused(&x, &center, &weight, None, &precision, DistanceKernel::Auto)?;
//! let (y, g) = fused.expect("cholesky on the CPU takes the fused path");
//! assert_eq!(y.dims(), &[4, 3]);
//! assert_eq!(g.dims(), &[4, 3]);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};

use super::cpu::{
    dispatch_float3, for_each_chunk_mut, for_each_chunk_pair_mut, host_backward3, matmul,
    rows_per_chunk, with_row_major, MatRef, Real, TILE_ROWS,
};
use super::expanded_fused::{plan_for, Plan};
use super::projected::{sizes_from_dims, Sizes};
use crate::config::DistanceKernel;
use crate::error::{GaussError, Result};
use crate::precision::Precision;

/// The Candle op: inputs x (B, d), params (Z, 2d [+1]) = [center | weight | bias], factor
/// input (Z, d, d); output `y` (B, Z), with `g` (B, Z) handed to [`GaussianOutput`].
#[derive(Clone, Debug)]
struct FusedGaussLayer {
    plan: Plan,
    has_bias: bool,
    shared: Arc<Shared>,
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

    fn sizes(&self, x: &[usize], params: &[usize], factor: &[usize]) -> Result<Sizes> {
        let &[neurons, width] = params else {
            return Err(GaussError::shape(
                "packed layer parameters",
                "(Z, 2d [+ 1])",
                params,
            ));
        };
        let dim = x.get(1).copied().unwrap_or(0);
        if width != self.width(dim) {
            return Err(GaussError::shape(
                "packed layer parameters",
                format!("({neurons}, {})", self.width(dim)),
                params,
            ));
        }
        sizes_from_dims(x, &[neurons, dim], factor)
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

    fn forward<T: Real>(&self, x: &[T], params: &[T], factor: &[T], s: Sizes) -> (Vec<T>, Vec<T>) {
        let p = self.split(params, s);
        let (batch, dim, neurons) = (s.batch, s.dim, s.neurons);
        let mut y_out = vec![T::zero(); batch * neurons];
        let mut g_out = vec![T::zero(); batch * neurons];
        let (y, g) = (&mut y_out[..], &mut g_out[..]);
        self.plan.forward_into(g, x, &p.center, factor, s); // g holds m2 for now
        if batch == 0 || neurons == 0 {
            return (y_out, g_out);
        }
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
                        *yv = (*yv + b) * *gv;
                    }
                }
            },
        );
        (y_out, g_out)
    }

    /// Gradients (∂x, ∂params, ∂factor input) from `g` and the gradients of `y` and (when
    /// the loss uses it) `g`.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        x: &[T],
        params: &[T],
        factor: &[T],
        g: &[T],
        grad_y: &[T],
        grad_g: Option<&[T]>,
        s: Sizes,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let p = self.split(params, s);
        let (batch, dim, neurons) = (s.batch, s.dim, s.neurons);
        let bz = batch * neurons;
        let chunk_rows = rows_per_chunk(batch);
        let half = T::from_f64(-0.5);
        // ∂lin = ∂y ∘ g;  ∂m2 = -g/2 ∘ (∂y ∘ lin + ∂g)
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
                    let rows_gg = grad_g.map(|grad_g| &grad_g[e0..e0 + gl.len()]);
                    for r in 0..rows {
                        let span = r * neurons..(r + 1) * neurons;
                        let (l_row, m_row) = (&mut gl[span.clone()], &mut gm[span.clone()]);
                        let (g_row, gy_row) = (&rows_g[span.clone()], &rows_gy[span.clone()]);
                        let iter = l_row
                            .iter_mut()
                            .zip(m_row.iter_mut())
                            .zip(g_row.iter().zip(gy_row))
                            .zip(&p.bias);
                        match rows_gg {
                            Some(gg) => {
                                for ((((l, m), (&gv, &gy)), &b), &gg) in iter.zip(&gg[span]) {
                                    let lin = *l + b;
                                    *l = gy * gv;
                                    *m = half * gv * (gy * lin + gg);
                                }
                            }
                            None => {
                                for (((l, m), (&gv, &gy)), &b) in iter {
                                    let lin = *l + b;
                                    *l = gy * gv;
                                    *m = half * gv * gy * lin;
                                }
                            }
                        }
                    }
                },
            );
        }
        let (mut grad_x, grad_center, grad_factor) =
            self.plan.backward(x, &p.center, factor, &grad_m2, s);
        if bz == 0 || dim == 0 {
            let grad_params = vec![T::zero(); neurons * self.width(dim)];
            return (grad_x, grad_params, grad_factor);
        }
        // ∂x += ∂lin · W
        for_each_chunk_mut(&mut grad_x, chunk_rows * dim, |chunk, gx| {
            let row0 = chunk * chunk_rows;
            let rows = gx.len() / dim;
            matmul(
                (rows, dim, neurons),
                gx,
                dim,
                true,
                MatRef {
                    data: &grad_lin[row0 * neurons..(row0 + rows) * neurons],
                    row_stride: neurons,
                    col_stride: 1,
                },
                p.weight,
            );
        });
        // ∂W = ∂linᵀ x, ∂b = Σ_b ∂lin
        let mut grad_weight = vec![T::zero(); neurons * dim];
        let chunk_neurons = neurons.div_ceil(8).max(1);
        for_each_chunk_mut(&mut grad_weight, chunk_neurons * dim, |chunk, gw| {
            let z0 = chunk * chunk_neurons;
            matmul(
                (gw.len() / dim, dim, batch),
                gw,
                dim,
                false,
                MatRef {
                    data: &grad_lin[z0..],
                    row_stride: 1,
                    col_stride: neurons,
                },
                MatRef {
                    data: x,
                    row_stride: dim,
                    col_stride: 1,
                },
            );
        });
        let mut grad_bias = vec![T::zero(); neurons];
        for row in grad_lin.chunks_exact(neurons) {
            for (gb, &v) in grad_bias.iter_mut().zip(row) {
                *gb += v;
            }
        }
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

/// `out (rows, Z) = x_rows (rows, d) · Wᵀ`, in tiles of [`TILE_ROWS`] rows (so GEMM's packing
/// buffers stay tile-sized).
fn linear_rows<T: Real>(out: &mut [T], x_rows: &[T], weight: MatRef<'_, T>, s: Sizes) {
    let tile = TILE_ROWS * s.neurons.max(1);
    for (t, out) in out.chunks_mut(tile).enumerate() {
        let rows = out.len() / s.neurons.max(1);
        matmul(
            (rows, s.neurons, s.dim),
            out,
            s.neurons,
            false,
            MatRef {
                data: &x_rows[t * TILE_ROWS * s.dim..][..rows * s.dim],
                row_stride: s.dim,
                col_stride: 1,
            },
            // Wᵀ: element (i, z) is W[z, i].
            MatRef {
                data: weight.data,
                row_stride: weight.col_stride,
                col_stride: weight.row_stride,
            },
        );
    }
}

/// What the `y` op and the `g` op hand each other: `g` from the forward (until the `g` op
/// takes it), the `g` tensor for the `y` op's backward, and `∂g` from the `g` op's backward
/// (which runs first: it consumes `y`).
#[derive(Debug, Default)]
struct Shared {
    g_storage: Mutex<Option<CpuStorage>>,
    g: Mutex<Option<Tensor>>,
    grad_g: Mutex<Option<Tensor>>,
}

fn lock<S>(slot: &Mutex<S>) -> MutexGuard<'_, S> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
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
        let sizes = self.sizes(l1.dims(), l2.dims(), l3.dims())?;
        let shape = Shape::from((sizes.batch, sizes.neurons));
        let (y, g) = dispatch_float3(
            self.name(),
            "inputs",
            [(s1, l1), (s2, l2), (s3, l3)],
            |x, p, f| {
                let (y, g) = self.forward(x, p, f, sizes);
                (CpuStorage::F32(y), CpuStorage::F32(g))
            },
            |x, p, f| {
                let (y, g) = self.forward(x, p, f, sizes);
                (CpuStorage::F64(y), CpuStorage::F64(g))
            },
        )?;
        *lock(&self.shared.g_storage) = Some(g);
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        factor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(g) = lock(&self.shared.g).clone() else {
            bail!("{}: backward before the g output was made", self.name())
        };
        let grad_g = lock(&self.shared.grad_g).take();
        let (gx, gp, gf) = match x.dtype() {
            DType::F32 => self.backward_tensors::<f32>(x, params, factor, &g, grad, grad_g)?,
            DType::F64 => self.backward_tensors::<f64>(x, params, factor, &g, grad, grad_g)?,
            other => bail!("{}: supports f32 and f64, got {other:?}", self.name()),
        };
        Ok((Some(gx), Some(gp), Some(gf)))
    }
}

/// The `g` output: takes what the `y` op's forward computed (a function of `y` only so that
/// autograd runs its backward before the `y` op's, which then folds `∂g` in).
#[derive(Clone, Debug)]
struct GaussianOutput {
    shared: Arc<Shared>,
}

impl CustomOp1 for GaussianOutput {
    fn name(&self) -> &'static str {
        "fused-gauss-layer-g"
    }

    fn cpu_fwd(
        &self,
        _y: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match lock(&self.shared.g_storage).take() {
            Some(g) => Ok((g, layout.shape().clone())),
            None => bail!("{}: applied without the layer op's forward", self.name()),
        }
    }

    fn bwd(&self, y: &Tensor, _g: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        *lock(&self.shared.grad_g) = Some(grad.detach());
        // y must receive a gradient for autograd to reach the layer op; a broadcast zero
        // allocates nothing.
        Ok(Some(
            Tensor::zeros((), y.dtype(), y.device())?.broadcast_as(y.shape())?,
        ))
    }
}

impl FusedGaussLayer {
    fn backward_tensors<T: Real>(
        &self,
        x: &Tensor,
        params: &Tensor,
        factor: &Tensor,
        g: &Tensor,
        grad_y: &Tensor,
        grad_g: Option<Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let s = self.sizes(x.dims(), params.dims(), factor.dims())?;
        let grad_y = grad_y.to_dtype(T::DTYPE)?.contiguous()?;
        let grad_g = match grad_g {
            Some(grad_g) => Some(grad_g.to_dtype(T::DTYPE)?.contiguous()?),
            None => None,
        };
        host_backward3::<T>(
            [x, params, factor, g],
            [
                (s.batch, s.dim).into(),
                (s.neurons, self.width(s.dim)).into(),
                (s.neurons, s.dim, s.dim).into(),
            ],
            |x, p, f, g| {
                with_row_major::<T, _>(&grad_y, |gy| match &grad_g {
                    Some(grad_g) => with_row_major::<T, _>(grad_g, |gg| {
                        Ok(self.backward(x, p, f, g, gy, Some(gg), s))
                    }),
                    None => Ok(self.backward(x, p, f, g, gy, None, s)),
                })
            },
        )
    }
}

/// The default layer's forward, fused into one CPU op: `(y, g)` with `g = exp(-m2/2)` and
/// `y = (x Wᵀ + b) ∘ g`, or `None` where the fused path does not apply (not on the CPU, not
/// f32/f64, a diagonal precision, the `naive` kernel requested, or a direct precision whose
/// centers are too spread for the expanded form), in
/// which case the caller composes the layer from tensor ops. Pass a tied bias `-W·c` as
/// `bias` if the layer uses one; `tanh` and gating are not fused.
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `weight`: (Z, d), `bias`: (Z) → `y`: (B, Z), `g`: (B, Z)
pub fn gauss_layer_forward_fused(
    x: &Tensor,
    center: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    precision: &Precision,
    kernel: DistanceKernel,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some((plan, factor_input)) = plan_for(x, center, precision, kernel)? else {
        return Ok(None);
    };
    let (neurons, dim) = center.dims2()?;
    if x.rank() != 2 || x.dims()[1] != dim {
        return Err(GaussError::shape(
            "input x",
            format!("(batch, {dim})"),
            x.dims(),
        ));
    }
    if weight.dims() != [neurons, dim] {
        return Err(GaussError::shape(
            "weight",
            format!("({neurons}, {dim})"),
            weight.dims(),
        ));
    }
    let mut parts = vec![center.clone(), weight.clone()];
    if let Some(bias) = bias {
        if bias.dims() != [neurons] {
            return Err(GaussError::shape(
                "bias",
                format!("({neurons})"),
                bias.dims(),
            ));
        }
        parts.push(bias.unsqueeze(1)?);
    }
    for part in parts.iter().chain([&factor_input]) {
        super::projected::check_same_dtype(x, part, "layer parameter")?;
    }
    let params = Tensor::cat(&parts, 1)?;
    let shared = Arc::new(Shared::default());
    let op = FusedGaussLayer {
        plan,
        has_bias: bias.is_some(),
        shared: shared.clone(),
    };
    let y = x.apply_op3(&params, &factor_input, op)?;
    let g = y.apply_op1(GaussianOutput {
        shared: shared.clone(),
    })?;
    *lock(&shared.g) = Some(g.detach());
    Ok(Some((y, g)))
}
