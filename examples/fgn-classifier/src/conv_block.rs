//! One trunk block — 3×3 convolution (padding 1), ReLU, 2×2 max-pool — in two forms that
//! compute the same function:
//!
//! * [`block_portable`]: candle-nn's `Conv2d` and Candle's `relu`/`max_pool2d` on NCHW
//!   tensors (the pool as two max reductions: see there why not `max_pool2d`). Runs on
//!   every device and dtype; the CUDA and Metal path.
//! * [`block_cpu`]: on the CPU (f32, f64), the same block on NHWC tensors as one GEMM:
//!   an im2col custom op lays each pixel's 3×3 neighbourhood out as a row (plus a 1 for the
//!   bias), Candle's matmul multiplies it by the weights, and a fused ReLU + max-pool custom
//!   op keeps only each window's maximum. Candle's CPU `conv2d` backward runs a direct
//!   `conv_transpose2d` and a 28×28-kernel convolution for the weight gradient, and its
//!   max-pool backward five elementwise passes; here the backward is two GEMMs, one gather
//!   (col2im) and one scatter of each window's gradient to its maximum. A FashionMNIST epoch
//!   of the 32/64-channel trunk takes about a third of the time (README, "Out of
//!   distribution").
//!
//! The weights keep candle-nn's layout ((C_out, C_in, 3, 3) and (C_out)), so checkpoints do
//! not depend on the path; the tests compare both paths' outputs and gradients.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor, WithDType,
};
use candle_nn::{BatchNorm, Conv2d, ModuleT};
use rayon::prelude::*;

/// Environment variable that, set to `portable`, makes the CPU run [`block_portable`] too
/// (to time one form against the other; README, "Out of distribution").
pub const BLOCKS_ENV: &str = "FGN_TRUNK_BLOCKS";

/// Whether [`block_cpu`] serves `x`: a CPU tensor in f32 or f64, unless [`BLOCKS_ENV`] says
/// `portable`.
pub fn has_cpu_path(x: &Tensor) -> bool {
    static PORTABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let portable =
        *PORTABLE.get_or_init(|| std::env::var(BLOCKS_ENV).is_ok_and(|v| v == "portable"));
    !portable && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The block with candle-nn's `Conv2d` and `BatchNorm` (every device and dtype); `train`
/// picks the batch norm's mode.
///
/// # Shapes
/// `x`: (B, C_in, H, W) → (B, C_out, ⌊H/2⌋, ⌊W/2⌋)
pub fn block_portable(
    conv: &Conv2d,
    norm: Option<&BatchNorm>,
    x: &Tensor,
    train: bool,
) -> Result<Tensor> {
    let mut t = conv.forward(x)?;
    if let Some(norm) = norm {
        t = norm.forward_t(&t, train)?;
    }
    let t = t.relu()?;
    let (b, c, h, w) = t.dims4()?;
    let (ph, pw) = (h / 2, w / 2);
    // The pool as two max reductions, not `max_pool2d`: Candle 0.11.1's `max_pool2d`
    // backward multiplies each window's gradient by (maxima in the window)/4 where it means
    // to divide, so a unique maximum gets a quarter of its gradient.
    t.narrow(2, 0, 2 * ph)?
        .narrow(3, 0, 2 * pw)?
        .reshape((b, c, ph, 2, pw, 2))?
        .max(5)?
        .max(3)
}

/// The block on the CPU as one GEMM (see the module docs), the batch norm (if any) applied
/// to the GEMM's (B·H·W, C_out) output; `conv` must have padding 1, stride 1 and a bias,
/// as the trunk builds it.
///
/// # Shapes
/// `x`: (B, H, W, C_in) (NHWC) → (B, ⌊H/2⌋, ⌊W/2⌋, C_out)
///
/// # Errors
/// A non-CPU tensor, a dtype other than f32/f64, or a weight that is not (C_out, C_in, 3, 3).
pub fn block_cpu(
    conv: &Conv2d,
    norm: Option<&BatchNorm>,
    x: &Tensor,
    train: bool,
) -> Result<Tensor> {
    let (batch, height, width, c_in) = x.dims4()?;
    let weight = conv.weight();
    let (c_out, w_in, kh, kw) = weight.dims4()?;
    if (w_in, kh, kw) != (c_in, 3, 3) {
        candle_core::bail!(
            "conv block: weight {:?} does not take {c_in} input channels with a 3×3 kernel",
            weight.dims()
        );
    }
    let Some(bias) = conv.bias() else {
        candle_core::bail!("conv block: the convolution has no bias");
    };
    let columns = x.contiguous()?.apply_op1(Im2Col)?;
    // Row layout of `columns`: (dy, dx, c) then the bias's 1.
    let weight = weight.permute((0, 2, 3, 1))?.reshape((c_out, 9 * c_in))?;
    let weight = Tensor::cat(&[weight, bias.reshape((c_out, 1))?], 1)?;
    let mut out = columns.matmul(&weight.t()?)?;
    if let Some(norm) = norm {
        // (B·H·W, C_out): the channels are dim 1, as batch norm wants them.
        out = norm.forward_t(&out, train)?;
    }
    out.reshape((batch, height, width, c_out))?
        .apply_op1(ReluMaxPool)
}

fn storage<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("conv block: the op takes contiguous tensors");
    };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

fn nhwc(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

/// (B, H, W, C) → (B·H·W, 9·C + 1): row (b, y, x) holds x[b, y+dy−1, x+dx−1, c] at column
/// (dy·3 + dx)·C + c (0 outside the image) and a 1 in the last column.
struct Im2Col;

fn im2col<T: WithDType>(x: &[T], (b, h, w, c): (usize, usize, usize, usize)) -> Vec<T> {
    let row = 9 * c + 1;
    let mut out = vec![T::zero(); b * h * w * row];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(w * row)
        .enumerate()
        .for_each(|(by, image_row)| {
            let (image, y) = (by / h, by % h);
            for (x0, cols) in image_row.chunks_mut(row).enumerate() {
                for dy in 0..3 {
                    let Some(yy) = (y + dy).checked_sub(1).filter(|&yy| yy < h) else {
                        continue;
                    };
                    for dx in 0..3 {
                        let Some(xx) = (x0 + dx).checked_sub(1).filter(|&xx| xx < w) else {
                            continue;
                        };
                        let src = ((image * h + yy) * w + xx) * c;
                        let dst = (dy * 3 + dx) * c;
                        cols[dst..dst + c].copy_from_slice(&x[src..src + c]);
                    }
                }
                cols[row - 1] = T::one();
            }
        });
    out
}

/// The adjoint of [`im2col`] (the bias column dropped): each input pixel gathers the
/// gradients of the (up to) nine rows that read it.
fn col2im<T: WithDType>(grad: &[T], (b, h, w, c): (usize, usize, usize, usize)) -> Vec<T> {
    let row = 9 * c + 1;
    let mut out = vec![T::zero(); b * h * w * c];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(w * c)
        .enumerate()
        .for_each(|(by, out_row)| {
            let (image, yy) = (by / h, by % h);
            for (xx, pixel) in out_row.chunks_mut(c).enumerate() {
                for dy in 0..3 {
                    // Row y read this pixel through dy when y + dy − 1 = yy.
                    let Some(y) = (yy + 1).checked_sub(dy).filter(|&y| y < h) else {
                        continue;
                    };
                    for dx in 0..3 {
                        let Some(x) = (xx + 1).checked_sub(dx).filter(|&x| x < w) else {
                            continue;
                        };
                        let src = ((image * h + y) * w + x) * row + (dy * 3 + dx) * c;
                        for (p, &g) in pixel.iter_mut().zip(&grad[src..src + c]) {
                            *p += g;
                        }
                    }
                }
            }
        });
    out
}

macro_rules! float_dispatch {
    ($storage:expr, $f:ident, $($arg:expr),*) => {
        match $storage {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned($f::<f32>($($arg),*)?),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned($f::<f64>($($arg),*)?),
            other => candle_core::bail!(
                "conv block: f32 or f64 expected, got {:?}",
                other.dtype()
            ),
        }
    };
}

fn im2col_op<T: WithDType>(s: &CpuStorage, l: &Layout) -> Result<Vec<T>> {
    Ok(im2col(storage::<T>(s, l)?, nhwc(l)?))
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col-3x3-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = nhwc(l)?;
        Ok((
            float_dispatch!(s, im2col_op, s, l),
            Shape::from((b * h * w, 9 * c + 1)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = arg.dims4()?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(dims))?))
    }
}

/// The backward of [`Im2Col`] for an input of these (B, H, W, C).
struct Col2Im((usize, usize, usize, usize));

fn col2im_op<T: WithDType>(
    s: &CpuStorage,
    l: &Layout,
    dims: (usize, usize, usize, usize),
) -> Result<Vec<T>> {
    let (b, h, w, c) = dims;
    if l.shape().dims() != [b * h * w, 9 * c + 1] {
        candle_core::bail!("col2im: gradient {:?} does not match {dims:?}", l.dims());
    }
    Ok(col2im(storage::<T>(s, l)?, dims))
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im-3x3-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((
            float_dispatch!(s, col2im_op, s, l, self.0),
            Shape::from(self.0),
        ))
    }
}

/// (B, H, W, C) → (B, ⌊H/2⌋, ⌊W/2⌋, C): max(0, the window's maximum).
struct ReluMaxPool;

/// Index (into the input) of the maximum of output element (image, py, px, channel)'s 2×2
/// window; the first one wins a tie.
#[inline]
fn window_argmax<T: WithDType>(
    x: &[T],
    (h, w, c): (usize, usize, usize),
    image: usize,
    (py, px): (usize, usize),
    channel: usize,
) -> usize {
    let at = |y: usize, x0: usize| ((image * h + y) * w + x0) * c + channel;
    let mut best = at(2 * py, 2 * px);
    for i in [
        at(2 * py, 2 * px + 1),
        at(2 * py + 1, 2 * px),
        at(2 * py + 1, 2 * px + 1),
    ] {
        if x[i] > x[best] {
            best = i;
        }
    }
    best
}

fn relu_max_pool<T: WithDType>(s: &CpuStorage, l: &Layout) -> Result<Vec<T>> {
    let x = storage::<T>(s, l)?;
    let (b, h, w, c) = nhwc(l)?;
    let (ph, pw) = (h / 2, w / 2);
    let mut out = vec![T::zero(); b * ph * pw * c];
    if out.is_empty() {
        return Ok(out);
    }
    out.par_chunks_mut(pw * c)
        .enumerate()
        .for_each(|(bp, row)| {
            let (image, py) = (bp / ph, bp % ph);
            for (px, pixel) in row.chunks_mut(c).enumerate() {
                for (channel, o) in pixel.iter_mut().enumerate() {
                    let v = x[window_argmax(x, (h, w, c), image, (py, px), channel)];
                    *o = if v > T::zero() { v } else { T::zero() };
                }
            }
        });
    Ok(out)
}

impl CustomOp1 for ReluMaxPool {
    fn name(&self) -> &'static str {
        "relu-maxpool-2x2-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = nhwc(l)?;
        Ok((
            float_dispatch!(s, relu_max_pool, s, l),
            Shape::from((b, h / 2, w / 2, c)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&grad, &ReluMaxPoolBackward)?))
    }
}

/// The backward of [`ReluMaxPool`]: each output's gradient goes to its window's maximum
/// where that maximum is positive (Candle's `relu` passes no gradient at 0 either).
struct ReluMaxPoolBackward;

fn relu_max_pool_backward<T: WithDType>(
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<Vec<T>> {
    let x = storage::<T>(xs, xl)?;
    let grad = storage::<T>(gs, gl)?;
    let (b, h, w, c) = nhwc(xl)?;
    let (ph, pw) = (h / 2, w / 2);
    if gl.dims() != [b, ph, pw, c] {
        candle_core::bail!(
            "relu-maxpool backward: gradient {:?}, expected {:?}",
            gl.dims(),
            [b, ph, pw, c]
        );
    }
    let mut out = vec![T::zero(); b * h * w * c];
    if out.is_empty() {
        return Ok(out);
    }
    out.par_chunks_mut(h * w * c)
        .enumerate()
        .for_each(|(image, image_grad)| {
            let base = image * h * w * c;
            for py in 0..ph {
                for px in 0..pw {
                    for channel in 0..c {
                        let best = window_argmax(x, (h, w, c), image, (py, px), channel);
                        if x[best] > T::zero() {
                            image_grad[best - base] =
                                grad[((image * ph + py) * pw + px) * c + channel];
                        }
                    }
                }
            }
        });
    Ok(out)
}

impl CustomOp2 for ReluMaxPoolBackward {
    fn name(&self) -> &'static str {
        "relu-maxpool-2x2-nhwc-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            float_dispatch!(xs, relu_max_pool_backward, xs, xl, gs, gl),
            xl.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::Conv2dConfig;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(shape: &[usize], dtype: DType, rng: &mut StdRng) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        // f64: these tests build every tensor on `Device::Cpu` (see `random`).
        (a - b)
            .and_then(|d| {
                d.abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_dtype(DType::F64)?
                    .to_scalar()
            })
            .unwrap()
    }

    /// Both forms of the block give the same values and the same gradients (of a random
    /// linear functional) for x, the weight and the bias; odd sizes exercise the pool's floor
    /// and the padding on every border.
    fn the_two_forms_agree(dtype: DType, tolerance: f64) {
        let mut rng = StdRng::seed_from_u64(7);
        let (b, c_in, c_out, h, w) = (3, 2, 4, 7, 5);
        let x = Var::from_tensor(&random(&[b, c_in, h, w], dtype, &mut rng)).unwrap();
        let weight = Var::from_tensor(&random(&[c_out, c_in, 3, 3], dtype, &mut rng)).unwrap();
        let bias = Var::from_tensor(&random(&[c_out], dtype, &mut rng)).unwrap();
        let conv = Conv2d::new(
            weight.as_tensor().clone(),
            Some(bias.as_tensor().clone()),
            Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
        );
        let probe = random(&[b, c_out, h / 2, w / 2], dtype, &mut rng);

        let portable = block_portable(&conv, None, &x, true).unwrap();
        let fused = block_cpu(&conv, None, &x.permute((0, 2, 3, 1)).unwrap(), true)
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        assert_eq!(fused.dims(), portable.dims());
        assert!(max_abs_diff(&fused, &portable) <= tolerance);
        // Some windows must be all-negative (ReLU kills them) for the test to cover it.
        // f64: a host-side count; `portable` lives on `Device::Cpu`.
        let zeros: f64 = portable
            .eq(0.0)
            .and_then(|m| m.to_dtype(DType::F64)?.sum_all()?.to_scalar())
            .unwrap();
        assert!(zeros > 0.0, "no window was clipped by the ReLU");

        let grads = |out: &Tensor| {
            let g = (out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            [x.as_tensor(), weight.as_tensor(), bias.as_tensor()]
                .map(|v| g.get(v).expect("a gradient for every variable").clone())
        };
        for (name, (a, b)) in ["x", "weight", "bias"]
            .iter()
            .zip(grads(&fused).iter().zip(grads(&portable).iter()))
        {
            assert_eq!(a.dims(), b.dims(), "{name}");
            let diff = max_abs_diff(a, b);
            assert!(diff <= tolerance, "{name}: gradients differ by {diff}");
        }
    }

    #[test]
    fn the_two_forms_agree_in_f64() {
        // Same sums in another order: f64 rounding.
        the_two_forms_agree(DType::F64, 1e-12);
    }

    #[test]
    fn the_two_forms_agree_in_f32() {
        the_two_forms_agree(DType::F32, 1e-5);
    }

    #[test]
    fn the_cpu_form_refuses_what_it_cannot_run() {
        let conv = Conv2d::new(
            Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap(),
            Some(Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap()),
            Conv2dConfig::default(),
        );
        let three_channels = Tensor::zeros((1, 5, 5, 3), DType::F32, &Device::Cpu).unwrap();
        let e = block_cpu(&conv, None, &three_channels, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not take 3 input channels"), "{e}");
        let half = Tensor::zeros((1, 5, 5, 2), DType::F16, &Device::Cpu).unwrap();
        assert!(!has_cpu_path(&half));
        let e = block_cpu(&conv, None, &half, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f32 or f64 expected"), "{e}");
    }
}
