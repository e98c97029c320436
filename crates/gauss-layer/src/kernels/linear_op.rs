//! A layer's linear part, `act(x Wᵀ + b)` (`act` = tanh or the identity), as one fused CPU op
//! for the layers that compose their forward ([`super::layer_op::forward_portable`] around a
//! fused distance op: the diagonal and low-rank plans), and the GEMM pieces it shares with the
//! whole-layer op ([`super::layer_op`]).
//!
//! In tensor ops the linear part is a matmul, a broadcast add and a tanh, and Candle's matmul
//! backward computes the gradient of both operands: for a first layer that is `∂x = ∂lin · W`,
//! a (B, Z, d) GEMM and a (B, d) accumulation for the data, which no one reads (a third of the
//! linear part's backward). The op computes `∂x` only where `x` tracks an op
//! ([`needs_input_gradient`]), and `tanh` in vectorizable arithmetic
//! ([`Real::tanh_vectorizable`]).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::cpu::{
    dispatch_float3, for_each_chunk_mut, host_backward3, matmul, needs_input_gradient,
    rows_per_chunk, simd_kernel, Gradients3, MatRef, Real, Sizes, TILE_ROWS,
};
use crate::error::Result;

/// `out (rows, Z) = x_rows (rows, d) · Wᵀ`, in tiles of [`TILE_ROWS`] rows (so GEMM's packing
/// buffers stay tile-sized).
pub(super) fn linear_rows<T: Real>(out: &mut [T], x_rows: &[T], weight: MatRef<'_, T>, s: Sizes) {
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

/// The gradients of `lin = x Wᵀ + b` from `∂lin` (B, Z): `∂x += ∂lin · W` into `grad_x`
/// where one is given, and `(∂W, ∂b)` = `(∂linᵀ x, Σ_rows ∂lin)`.
pub(super) fn linear_backward<T: Real>(
    grad_lin: &[T],
    x: &[T],
    weight: MatRef<'_, T>,
    s: Sizes,
    grad_x: Option<&mut [T]>,
) -> (Vec<T>, Vec<T>) {
    let Sizes {
        batch,
        dim,
        neurons,
    } = s;
    let mut grad_weight = vec![T::zero(); neurons * dim];
    let mut grad_bias = vec![T::zero(); neurons];
    if batch == 0 || dim == 0 || neurons == 0 {
        return (grad_weight, grad_bias);
    }
    if let Some(grad_x) = grad_x {
        let chunk_rows = rows_per_chunk(batch);
        for_each_chunk_mut(grad_x, chunk_rows * dim, |chunk, gx| {
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
                weight,
            );
        });
    }
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
    for row in grad_lin.chunks_exact(neurons) {
        for (gb, &v) in grad_bias.iter_mut().zip(row) {
            *gb += v;
        }
    }
    (grad_weight, grad_bias)
}

simd_kernel! {
    /// `values[i] = act(values[i] + bias[i mod Z])` over rows of Z.
    fn add_bias_activate<T: Real>(values: &mut [T], bias: &[T], tanh: bool) {
        for row in values.chunks_exact_mut(bias.len().max(1)) {
            for (v, &b) in row.iter_mut().zip(bias) {
                let lin = *v + b;
                *v = if tanh { lin.tanh_vectorizable() } else { lin };
            }
        }
    }
}

simd_kernel! {
    /// `grad[i] ∘= 1 − y[i]²`: tanh's slope from its output.
    fn times_tanh_slope<T: Real>(grad: &mut [T], y: &[T]) {
        for (g, &v) in grad.iter_mut().zip(y) {
            *g *= T::one() - v * v;
        }
    }
}

/// The Candle op: inputs x (B, d), W (Z, d), b (Z) (zeros where the layer has no bias, and
/// then no gradient); output `act(x Wᵀ + b)` (B, Z).
#[derive(Clone, Copy, Debug)]
struct FusedLinear {
    tanh: bool,
    has_bias: bool,
    /// The sizes the public boundary checked.
    sizes: Sizes,
}

impl FusedLinear {
    fn forward<T: Real>(&self, x: &[T], weight: &[T], bias: &[T]) -> Vec<T> {
        let s = self.sizes;
        let mut out = vec![T::zero(); s.batch * s.neurons];
        if out.is_empty() {
            return out;
        }
        let weight = MatRef {
            data: weight,
            row_stride: s.dim,
            col_stride: 1,
        };
        let chunk_rows = rows_per_chunk(s.batch);
        for_each_chunk_mut(&mut out, chunk_rows * s.neurons, |chunk, y| {
            let row0 = chunk * chunk_rows;
            let rows = y.len() / s.neurons;
            linear_rows(y, &x[row0 * s.dim..(row0 + rows) * s.dim], weight, s);
            add_bias_activate(y, bias, self.tanh);
        });
        out
    }

    fn backward<T: Real>(
        &self,
        x: &[T],
        weight: &[T],
        y: &[T],
        grad: &[T],
        input_gradient: bool,
    ) -> Gradients3<T> {
        let scaled;
        let grad_lin = if self.tanh {
            scaled = {
                let mut grad = grad.to_vec();
                times_tanh_slope(&mut grad, y);
                grad
            };
            &scaled
        } else {
            grad
        };
        let weight = MatRef {
            data: weight,
            row_stride: self.sizes.dim,
            col_stride: 1,
        };
        let mut grad_x = input_gradient.then(|| vec![T::zero(); x.len()]);
        let (grad_weight, grad_bias) =
            linear_backward(grad_lin, x, weight, self.sizes, grad_x.as_deref_mut());
        (grad_x, grad_weight, grad_bias)
    }

    fn input_shapes(&self) -> [Shape; 3] {
        let s = self.sizes;
        [
            (s.batch, s.dim).into(),
            (s.neurons, s.dim).into(),
            s.neurons.into(),
        ]
    }
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        crate::cpu::check_built_for(
            self.name(),
            [l1.dims(), l2.dims(), l3.dims()],
            &self.input_shapes(),
        )?;
        let out = dispatch_float3(
            self.name(),
            "x, weight and bias",
            [(s1, l1), (s2, l2), (s3, l3)],
            |x, w, b| CpuStorage::F32(self.forward(x, w, b)),
            |x, w, b| CpuStorage::F64(self.forward(x, w, b)),
        )?;
        Ok((out, Shape::from((self.sizes.batch, self.sizes.neurons))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::cpu::check_built_for(
            self.name(),
            [x.dims(), weight.dims(), bias.dims()],
            &self.input_shapes(),
        )?;
        let input_gradient = needs_input_gradient(x);
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        let (gx, gw, gb) = match x.dtype() {
            candle_core::DType::F32 => host_backward3::<f32>(
                [x, weight, res, &grad],
                self.input_shapes(),
                |x, w, y, g| Ok(self.backward(x, w, y, g, input_gradient)),
            )?,
            candle_core::DType::F64 => host_backward3::<f64>(
                [x, weight, res, &grad],
                self.input_shapes(),
                |x, w, y, g| Ok(self.backward(x, w, y, g, input_gradient)),
            )?,
            other => candle_core::bail!("{}: supports f32 and f64, got {other:?}", self.name()),
        };
        Ok((gx, Some(gw), self.has_bias.then_some(gb)))
    }
}

/// `act(x Wᵀ + b)`: the fused CPU op where `fused` (the resolver planned a fused distance, so
/// the tensors are f32 or f64 on the CPU, one dtype), else its portable twin [`portable`].
/// The inputs are not checked again: `sizes` are those the public boundary checked.
///
/// # Shapes
/// `x`: (B, d), `weight`: (Z, d), `bias`: (Z) → (B, Z)
pub(super) fn forward(
    fused: bool,
    sizes: Sizes,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    tanh: bool,
) -> Result<Tensor> {
    if !fused {
        return portable(x, weight, bias, tanh);
    }
    let has_bias = bias.is_some();
    let zeros;
    let bias = match bias {
        Some(bias) => bias,
        None => {
            zeros = Tensor::zeros(sizes.neurons, x.dtype(), x.device())?;
            &zeros
        }
    };
    let op = FusedLinear {
        tanh,
        has_bias,
        sizes,
    };
    Ok(x.apply_op3(weight, bias, op)?)
}

/// The portable twin of the op, in tensor ops: a matmul, a broadcast add and a tanh.
///
/// # Shapes
/// `x`: (B, d), `weight`: (Z, d), `bias`: (Z) → (B, Z)
fn portable(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, tanh: bool) -> Result<Tensor> {
    let mut activation = x.matmul(&weight.t()?)?;
    if let Some(bias) = bias {
        activation = activation.broadcast_add(&bias.unsqueeze(0)?)?;
    }
    if tanh {
        activation = activation.tanh()?;
    }
    Ok(activation)
}
