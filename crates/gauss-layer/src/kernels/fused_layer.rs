//! The whole default layer forward as one fused CPU op:
//! `g = exp(-m2/2)`, `y = (x Wᵀ + b) ∘ g`, with `m2` from the fused projected kernel.
//!
//! One op instead of six (B, Z) elementwise ops and a matmul: the only (B, Z) buffers it
//! creates are its outputs `y` and `g` (packed in one (2, B, Z) storage), in forward and in
//! what autograd keeps alive. Its backward recomputes the linear part (a B·Z·d GEMM) and runs
//! the projected kernel's fused backward.
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

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::cpu::{
    for_each_chunk_mut, for_each_chunk_pair_mut, matmul, row_major, rows_per_chunk, with_row_major,
    MatRef, Real, TILE_ROWS,
};
use super::projected::{backward, forward_into, sizes_from_dims, FactorMap, Sizes};
use crate::config::{DistanceKernel, Parameterization};
use crate::error::{GaussError, Result};
use crate::precision::Precision;

/// The Candle op: inputs x (B, d), params (Z, 2d [+1]) = [center | weight | bias], factor
/// input (Z, d, d); output (2, B, Z) = [y, g].
#[derive(Clone, Copy, Debug)]
struct FusedGaussLayer {
    map: FactorMap,
    has_bias: bool,
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

    fn forward<T: Real>(&self, x: &[T], params: &[T], factor: &[T], s: Sizes) -> Vec<T> {
        let p = self.split(params, s);
        let (batch, dim, neurons) = (s.batch, s.dim, s.neurons);
        let mut out = vec![T::zero(); 2 * batch * neurons];
        let (y, g) = out.split_at_mut(batch * neurons);
        forward_into(g, x, &p.center, factor, self.map, s); // g holds m2 for now
        if batch == 0 || neurons == 0 {
            return out;
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
        out
    }

    /// Gradients (∂x, ∂params, ∂factor input) from the outputs [y, g] and their gradients.
    fn backward<T: Real>(
        &self,
        x: &[T],
        params: &[T],
        factor: &[T],
        outputs: &[T],
        grad: &[T],
        s: Sizes,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let p = self.split(params, s);
        let (batch, dim, neurons) = (s.batch, s.dim, s.neurons);
        let bz = batch * neurons;
        let (grad_y, grad_g) = grad.split_at(bz);
        let g = &outputs[bz..];
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
                    for (e, (l, m)) in gl.iter_mut().zip(gm.iter_mut()).enumerate() {
                        let lin = *l + p.bias[e % neurons];
                        let (gy, gv) = (grad_y[e0 + e], g[e0 + e]);
                        *l = gy * gv;
                        *m = half * gv * (gy * lin + grad_g[e0 + e]);
                    }
                },
            );
        }
        let (mut grad_x, grad_center, grad_factor) =
            backward(x, &p.center, factor, &grad_m2, self.map, s);
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
        let shape = Shape::from((2, sizes.batch, sizes.neurons));
        match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let out = self.forward::<f32>(
                    &row_major(s1, l1)?,
                    &row_major(s2, l2)?,
                    &row_major(s3, l3)?,
                    sizes,
                );
                Ok((CpuStorage::F32(out), shape))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let out = self.forward::<f64>(
                    &row_major(s1, l1)?,
                    &row_major(s2, l2)?,
                    &row_major(s3, l3)?,
                    sizes,
                );
                Ok((CpuStorage::F64(out), shape))
            }
            _ => bail!(
                "{}: inputs must all be f32 or all f64, got {:?}, {:?}, {:?}",
                self.name(),
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        factor: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gp, gf) = match x.dtype() {
            DType::F32 => self.backward_tensors::<f32>(x, params, factor, res, grad)?,
            DType::F64 => self.backward_tensors::<f64>(x, params, factor, res, grad)?,
            other => bail!("{}: supports f32 and f64, got {other:?}", self.name()),
        };
        Ok((Some(gx), Some(gp), Some(gf)))
    }
}

impl FusedGaussLayer {
    fn backward_tensors<T: Real>(
        &self,
        x: &Tensor,
        params: &Tensor,
        factor: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let s = self.sizes(x.dims(), params.dims(), factor.dims())?;
        let grad = grad.to_dtype(T::DTYPE)?.contiguous()?;
        let (gx, gp, gf) = with_row_major::<T, _>(x, |x| {
            with_row_major::<T, _>(params, |p| {
                with_row_major::<T, _>(factor, |f| {
                    with_row_major::<T, _>(res, |r| {
                        with_row_major::<T, _>(&grad, |g| Ok(self.backward(x, p, f, r, g, s)))
                    })
                })
            })
        })?;
        let device = x.device();
        Ok((
            Tensor::from_vec(gx, (s.batch, s.dim), device)?,
            Tensor::from_vec(gp, (s.neurons, self.width(s.dim)), device)?,
            Tensor::from_vec(gf, (s.neurons, s.dim, s.dim), device)?,
        ))
    }
}

/// The default layer's forward, fused into one CPU op: `(y, g)` with `g = exp(-m2/2)` and
/// `y = (x Wᵀ + b) ∘ g`, or `None` where the fused path does not apply (not on the CPU, not
/// f32/f64, a diagonal or direct precision, or the `expanded`/`naive` kernel requested), in
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
    let fusable_device = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    let fusable_kernel = matches!(kernel, DistanceKernel::Auto | DistanceKernel::Projected);
    if !fusable_device || !fusable_kernel {
        return Ok(None);
    }
    let (map, factor_input) = match precision.parameterization() {
        Parameterization::Cholesky if precision.width_floor().is_none() => (
            FactorMap::Cholesky {
                positive_map: precision.positive_map(),
                floor: precision.factor_diag_floor(),
            },
            precision.raw().clone(),
        ),
        Parameterization::Cholesky | Parameterization::Expm => match precision.factor()? {
            Some(factor) => (FactorMap::Identity, factor),
            None => return Ok(None),
        },
        _ => return Ok(None),
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
    let op = FusedGaussLayer {
        map,
        has_bias: bias.is_some(),
    };
    let packed = x.apply_op3(&params, &factor_input, op)?;
    Ok(Some((packed.get(0)?, packed.get(1)?)))
}
