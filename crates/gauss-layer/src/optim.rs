//! An AdamW step that updates each parameter and its two moments in place, in one pass.
//!
//! [`FusedAdamW`] is a drop-in replacement for [`candle_nn::AdamW`]: the same
//! [`ParamsAdamW`] config, the same [`Optimizer`] trait, and, in f32 and f64, the same
//! arithmetic, so both give the same parameters after every step, bit for bit, on the CPU. It
//! works for any Candle model, not only Gaussian layers.
//!
//! Half-precision (f16, bf16) parameters are stepped in f32, as PyTorch's fused AdamW does:
//! the moments are kept in f32, θ and g are widened to f32, the step is computed there and θ
//! is rounded back to its dtype once. candle-nn's `AdamW` computes in the parameter's dtype,
//! where ε = 1e-8 and (1 − β₂)·g² underflow to 0 in f16, so an exact-zero gradient (the
//! unused upper triangle of every cholesky factor has one) gives 0/0 and a NaN parameter
//! after one step. The half-precision results are those of an f32 step rounded once, not
//! candle-nn's.
//!
//! The hyper-parameters are checked as PyTorch does, plus finiteness (see [`FusedAdamW`]).
//!
//! candle-nn's `AdamW` builds every step from about a dozen tensor ops per parameter, each
//! allocating a fresh buffer the size of the parameter and writing it back through
//! [`Var::set`]. For the (Z, d, d) factors of full-covariance layers that is the bulk of a
//! training step's memory traffic. Here, on the CPU, one in-place op
//! ([`Tensor::inplace_op2`]) walks the parameter, its gradient and the moments once and
//! allocates nothing; large parameters are split across the rayon pool (element-wise, so the
//! result does not depend on the split). The moments live in host memory owned by the
//! optimizer.
//!
//! | parameter | path |
//! |---|---|
//! | CPU, f32 or f64 | one in-place pass per tensor |
//! | CUDA (the `cuda` feature), f32 or f64 | one in-place kernel per tensor (`cuda/adamw.cu`, same roundings as candle-nn's ops), moments in device buffers |
//! | Metal (or a non-contiguous parameter), f32 or f64 | candle-nn's tensor-op form, with the moments as [`Var`]s |
//! | any device, f16 or bf16 | the same tensor-op form in f32: moments as f32 [`Var`]s, θ and g widened to f32, θ rounded back once |
//!
//! Parameters without a gradient in the [`GradStore`] are skipped, and non-float variables are
//! dropped at construction, as candle-nn does.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
//! use gauss_layer::FusedAdamW;
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = linear(2, 1, vb)?;
//! let mut opt = FusedAdamW::new(
//!     varmap.all_vars(),
//!     ParamsAdamW { lr: 0.1, weight_decay: 0.0, ..Default::default() },
//! )?;
//! let x = Tensor::new(&[[1f32, 2.0], [3.0, -1.0]], &Device::Cpu)?;
//! let target = Tensor::new(&[[1f32], [0.0]], &Device::Cpu)?;
//! let loss = |m: &candle_nn::Linear| (m.forward(&x)? - &target)?.sqr()?.mean_all();
//! let before = loss(&model)?.to_scalar::<f32>()?;
//! for _ in 0..20 {
//!     opt.backward_step(&loss(&model)?)?;
//! }
//! assert!(loss(&model)?.to_scalar::<f32>()? < before);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::cell::RefCell;
use std::ops::{Add, Div, Mul, Sub};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use rayon::prelude::*;

use crate::cpu::simd_kernel;
use crate::route::{backend, Backend};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::CudaSlice;

/// Elements per parallel chunk.
const PARALLEL_CHUNK: usize = 1 << 14;

/// Parameters of fewer elements are updated on the calling thread: waking the pool between
/// the serial ops of a training step costs more than splitting saves below this size
/// (measured with `bench-train --params diag,sphere --in 784`, whose largest parameters have
/// 50k elements: the optimizer took 0.27–0.36 ms a step with them split across two threads,
/// 0.19–0.27 ms with each on the calling thread).
const PARALLEL_MIN: usize = 1 << 18;

/// AdamW (decoupled weight decay) with the update of [`candle_nn::AdamW`], done in place.
///
/// Per parameter θ with gradient g at step t (β₁, β₂, ε, lr, λ from [`ParamsAdamW`]):
///
/// ```text
/// m ← β₁·m + (1 − β₁)·g            v ← β₂·v + (1 − β₂)·g²
/// m̂ = m / (1 − β₁ᵗ)                v̂ = v / (1 − β₂ᵗ)
/// θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε)
/// ```
///
/// evaluated for f32 and f64 parameters in the parameter's dtype with the same roundings, in
/// the same order, as candle-nn 0.11's tensor ops (the scalar factors are formed in f64 and
/// rounded to the dtype once), so the two optimizers agree exactly on the CPU. f16 and bf16
/// parameters are stepped in f32 with f32 moments and rounded back once (candle-nn's step in
/// f16 turns a parameter with an exact-zero gradient into NaN: ε and (1 − β₂)·g² underflow).
///
/// The hyper-parameters must satisfy lr, ε, λ finite and ≥ 0 and 0 ≤ β₁, β₂ < 1 (PyTorch's
/// checks plus finiteness); they are checked by [`Optimizer::new`] and again by every
/// [`Optimizer::step`], since [`Optimizer::set_learning_rate`] and
/// [`FusedAdamW::set_params`] cannot return an error.
#[derive(Debug)]
pub struct FusedAdamW {
    vars: Vec<VarState>,
    step_t: usize,
    params: ParamsAdamW,
}

#[derive(Debug)]
struct VarState {
    var: Var,
    moments: Moments,
}

/// First and second moments of one parameter.
#[derive(Debug)]
enum Moments {
    /// A contiguous f32 parameter on the CPU: moments in host memory, updated in place.
    F32 { m: Vec<f32>, v: Vec<f32> },
    /// The same for f64.
    F64 { m: Vec<f64>, v: Vec<f64> },
    /// A contiguous f32 parameter on CUDA: moments in device buffers, updated in place.
    #[cfg(feature = "cuda")]
    CudaF32 {
        m: CudaSlice<f32>,
        v: CudaSlice<f32>,
    },
    /// The same for f64.
    #[cfg(feature = "cuda")]
    CudaF64 {
        m: CudaSlice<f64>,
        v: CudaSlice<f64>,
    },
    /// Any other device or float dtype: candle-nn's tensor ops, with the moments in
    /// [`step_dtype`] of the parameter's dtype.
    Tensors { m: Var, v: Var },
}

impl Moments {
    fn zeros(var: &Var) -> Result<Self> {
        let n = var.elem_count();
        let route = if var.is_contiguous() {
            backend(var.device(), var.dtype(), false)
        } else {
            Backend::Portable
        };
        Ok(match (route, var.dtype()) {
            (Backend::CpuFused, DType::F32) => Moments::F32 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            (Backend::CpuFused, DType::F64) => Moments::F64 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            #[cfg(feature = "cuda")]
            (Backend::Cuda, dtype) => match (var.device(), dtype) {
                (candle_core::Device::Cuda(device), DType::F32) => Moments::CudaF32 {
                    m: device.alloc_zeros::<f32>(n)?,
                    v: device.alloc_zeros::<f32>(n)?,
                },
                (candle_core::Device::Cuda(device), DType::F64) => Moments::CudaF64 {
                    m: device.alloc_zeros::<f64>(n)?,
                    v: device.alloc_zeros::<f64>(n)?,
                },
                _ => Self::tensors(var)?,
            },
            _ => Self::tensors(var)?,
        })
    }

    fn tensors(var: &Var) -> Result<Self> {
        let dtype = step_dtype(var.dtype());
        Ok(Moments::Tensors {
            m: Var::zeros(var.shape(), dtype, var.device())?,
            v: Var::zeros(var.shape(), dtype, var.device())?,
        })
    }
}

/// The dtype a parameter's tensor-op step computes in and keeps its moments in: f32 for the
/// half-precision dtypes (f32 exists on every device), the parameter's own otherwise.
fn step_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Refuses hyper-parameters PyTorch refuses, and non-finite ones: lr, eps and weight_decay
/// finite and ≥ 0, beta1 and beta2 in [0, 1).
fn check_params(params: &ParamsAdamW) -> Result<()> {
    for (name, value) in [
        ("lr", params.lr),
        ("eps", params.eps),
        ("weight_decay", params.weight_decay),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            bail!("fused-adamw: {name} must be finite and >= 0, got {value}")
        }
    }
    for (name, value) in [("beta1", params.beta1), ("beta2", params.beta2)] {
        if !(0.0..1.0).contains(&value) {
            bail!("fused-adamw: {name} must be in [0, 1), got {value}")
        }
    }
    Ok(())
}

/// The scalars of one step, in f64 exactly as candle-nn forms them.
#[derive(Clone, Copy, Debug)]
struct Factors {
    beta1: f64,
    one_minus_beta1: f64,
    beta2: f64,
    one_minus_beta2: f64,
    scale_m: f64,
    scale_v: f64,
    decay: f64,
    eps: f64,
    lr: f64,
}

impl Factors {
    fn new(params: &ParamsAdamW, step_t: usize) -> Self {
        let lr = params.lr;
        let lr_lambda = lr * params.weight_decay;
        Self {
            beta1: params.beta1,
            one_minus_beta1: 1.0 - params.beta1,
            beta2: params.beta2,
            one_minus_beta2: 1.0 - params.beta2,
            scale_m: 1f64 / (1f64 - params.beta1.powi(step_t as i32)),
            scale_v: 1f64 / (1f64 - params.beta2.powi(step_t as i32)),
            decay: 1f64 - lr_lambda,
            eps: params.eps,
            lr,
        }
    }
}

/// The float types updated in place.
trait Element:
    Copy
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    /// Rounds an f64 the way Candle's `WithDType::from_f64` does (`as`).
    fn from_f64(value: f64) -> Self;
    fn sqrt(self) -> Self;
}

impl Element for f32 {
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Element for f64 {
    fn from_f64(value: f64) -> Self {
        value
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// [`Factors`] rounded to the parameter's dtype.
#[derive(Clone, Copy)]
struct Scalars<T> {
    beta1: T,
    one_minus_beta1: T,
    beta2: T,
    one_minus_beta2: T,
    scale_m: T,
    scale_v: T,
    decay: T,
    eps: T,
    lr: T,
    one: T,
    zero: T,
}

impl<T: Element> Scalars<T> {
    fn new(f: &Factors) -> Self {
        Self {
            beta1: T::from_f64(f.beta1),
            one_minus_beta1: T::from_f64(f.one_minus_beta1),
            beta2: T::from_f64(f.beta2),
            one_minus_beta2: T::from_f64(f.one_minus_beta2),
            scale_m: T::from_f64(f.scale_m),
            scale_v: T::from_f64(f.scale_v),
            decay: T::from_f64(f.decay),
            eps: T::from_f64(f.eps),
            lr: T::from_f64(f.lr),
            one: T::from_f64(1.0),
            zero: T::from_f64(0.0),
        }
    }

    /// One element of the step. Candle's `tensor * s` is `affine(s, 0)`, i.e. `x·s + 0`, and
    /// `tensor + s` is `affine(1, s)`: the `+ 0` and `·1` are kept so that even the sign of
    /// a zero matches (Rust does not contract `a·b + c` into a fused multiply-add).
    #[inline(always)]
    fn update(&self, theta: &mut T, m: &mut T, v: &mut T, g: T) {
        let s = self;
        let next_m = (*m * s.beta1 + s.zero) + (g * s.one_minus_beta1 + s.zero);
        let next_v = (*v * s.beta2 + s.zero) + ((g * g) * s.one_minus_beta2 + s.zero);
        let m_hat = next_m * s.scale_m + s.zero;
        let v_hat = next_v * s.scale_v + s.zero;
        let decayed = *theta * s.decay + s.zero;
        let adjusted = m_hat / (v_hat.sqrt() * s.one + s.eps);
        *theta = decayed - (adjusted * s.lr + s.zero);
        *m = next_m;
        *v = next_v;
    }

    /// The scalars in the order of the CUDA kernel's arguments.
    #[cfg(feature = "cuda")]
    fn kernel_args(&self) -> crate::cuda::AdamScalars<T> {
        [
            self.beta1,
            self.one_minus_beta1,
            self.beta2,
            self.one_minus_beta2,
            self.scale_m,
            self.scale_v,
            self.decay,
            self.eps,
            self.lr,
        ]
    }

    /// The whole tensor; chunks on the rayon pool when it is large (each element is updated
    /// alone, so the split never changes a bit of the result).
    fn update_all(&self, theta: &mut [T], m: &mut [T], v: &mut [T], g: &[T]) {
        if theta.len() < PARALLEL_MIN || rayon::current_num_threads() < 2 {
            update_slices(self, theta, m, v, g);
            return;
        }
        theta
            .par_chunks_mut(PARALLEL_CHUNK)
            .zip(m.par_chunks_mut(PARALLEL_CHUNK))
            .zip(v.par_chunks_mut(PARALLEL_CHUNK))
            .zip(g.par_chunks(PARALLEL_CHUNK))
            .for_each(|(((theta, m), v), g)| update_slices(self, theta, m, v, g));
    }
}

simd_kernel! {
    /// [`Scalars::update`] over the slices: compiled for AVX2 too, so the square roots and
    /// divisions run 8 (f32) to a vector where the CPU has it (the same IEEE operations in the
    /// same order at every width, so the same bits).
    fn update_slices<T: Element>(s: &Scalars<T>, theta: &mut [T], m: &mut [T], v: &mut [T], g: &[T]) {
        for (((theta, m), v), g) in theta.iter_mut().zip(m).zip(v).zip(g) {
            s.update(theta, m, v, *g);
        }
    }
}

/// The in-place op: the parameter's storage is written, the gradient read, the host moments
/// (borrowed for the duration of the call) updated alongside.
struct StepOp<'a> {
    factors: Factors,
    moments: RefCell<&'a mut Moments>,
}

/// The gradient must have the parameter's shape (every backend's entry check).
fn check_same_shape(parameter: &Layout, gradient: &Layout) -> Result<()> {
    if parameter.shape() != gradient.shape() {
        bail!(
            "fused-adamw: gradient of shape {:?} for a parameter of shape {:?}",
            gradient.dims(),
            parameter.dims()
        )
    }
    Ok(())
}

impl InplaceOp2 for StepOp<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((t0, t1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("fused-adamw: expected a contiguous parameter and gradient, got strides {:?} and {:?}", l1.stride(), l2.stride())
        };
        check_same_shape(l1, l2)?;
        let mut moments = self.moments.borrow_mut();
        match (s1, s2, &mut **moments) {
            (CpuStorage::F32(theta), CpuStorage::F32(g), Moments::F32 { m, v }) => {
                Scalars::<f32>::new(&self.factors).update_all(
                    &mut theta[t0..t1],
                    m,
                    v,
                    &g[g0..g1],
                );
            }
            (CpuStorage::F64(theta), CpuStorage::F64(g), Moments::F64 { m, v }) => {
                Scalars::<f64>::new(&self.factors).update_all(
                    &mut theta[t0..t1],
                    m,
                    v,
                    &g[g0..g1],
                );
            }
            (theta, g, _) => bail!(
                "fused-adamw: expected a parameter and gradient of the dtype the optimizer was built for, got {:?} and {:?}",
                theta.dtype(),
                g.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        check_same_shape(l1, l2)?;
        let mut moments = self.moments.borrow_mut();
        match &mut **moments {
            Moments::CudaF32 { m, v } => crate::cuda::adamw_step::<f32>(
                s1,
                l1,
                s2,
                l2,
                (m, v),
                Scalars::<f32>::new(&self.factors).kernel_args(),
            ),
            Moments::CudaF64 { m, v } => crate::cuda::adamw_step::<f64>(
                s1,
                l1,
                s2,
                l2,
                (m, v),
                Scalars::<f64>::new(&self.factors).kernel_args(),
            ),
            _ => bail!(
                "fused-adamw: a CUDA parameter of dtype {:?} without device moments",
                s1.dtype()
            ),
        }
    }
}

/// candle-nn's tensor-op step, for parameters off the CPU or of other float dtypes, computed
/// in the moments' dtype ([`step_dtype`]): for f32 and f64 that is the parameter's own (no
/// cast at all, `to_dtype` to the same dtype returns the tensor), for f16 and bf16 θ and g are
/// widened to f32 and the new θ is rounded back once.
fn tensor_step(f: &Factors, theta: &Var, m: &Var, v: &Var, g: &Tensor) -> Result<()> {
    if g.dtype() != theta.dtype() {
        bail!(
            "fused-adamw: expected a gradient of the parameter's dtype {:?}, got {:?}",
            theta.dtype(),
            g.dtype()
        )
    }
    let dtype = m.dtype();
    let g = g.to_dtype(dtype)?;
    let next_m = ((m.as_tensor() * f.beta1)? + (&g * f.one_minus_beta1)?)?;
    let next_v = ((v.as_tensor() * f.beta2)? + (g.sqr()? * f.one_minus_beta2)?)?;
    let m_hat = (&next_m * f.scale_m)?;
    let v_hat = (&next_v * f.scale_v)?;
    let next_theta = (theta.as_tensor().to_dtype(dtype)? * f.decay)?;
    let adjusted_grad = (m_hat / (v_hat.sqrt()? + f.eps)?)?;
    let next_theta = (next_theta - (adjusted_grad * f.lr)?)?.to_dtype(theta.dtype())?;
    m.set(&next_m)?;
    v.set(&next_v)?;
    theta.set(&next_theta)?;
    Ok(())
}

impl Optimizer for FusedAdamW {
    type Config = ParamsAdamW;

    /// Takes the float variables among `vars` and zero moments for each (in f32 for f16 and
    /// bf16 parameters).
    ///
    /// # Errors
    /// When a hyper-parameter is out of range (lr, eps, weight_decay not finite or negative;
    /// beta1 or beta2 not in [0, 1)), the error naming the field and its value, or when the
    /// moments of an off-CPU parameter cannot be allocated.
    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        check_params(&params)?;
        let vars = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .map(|var| {
                let moments = Moments::zeros(&var)?;
                Ok(VarState { var, moments })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            step_t: 0,
            params,
        })
    }

    /// One AdamW step for every variable with a gradient in `grads`; the others are left as
    /// they are (the step counter, shared by all, still advances).
    ///
    /// # Errors
    /// When a hyper-parameter is out of range (as in [`Optimizer::new`]; they can have been
    /// changed since by [`Optimizer::set_learning_rate`] or [`FusedAdamW::set_params`]): then
    /// nothing is written and the step counter does not advance. When a gradient's shape or
    /// dtype differs from its parameter's, or a device op fails.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        check_params(&self.params)?;
        self.step_t += 1;
        let factors = Factors::new(&self.params, self.step_t);
        for state in self.vars.iter_mut() {
            let theta = &state.var;
            let Some(g) = grads.get(theta) else {
                continue;
            };
            match &mut state.moments {
                Moments::Tensors { m, v } => tensor_step(&factors, theta, m, v, g)?,
                host => {
                    if theta.elem_count() == 0 {
                        continue;
                    }
                    // Broadcast gradients (e.g. of a sum) are made contiguous.
                    let g = g.contiguous()?;
                    let op = StepOp {
                        factors,
                        moments: RefCell::new(host),
                    };
                    // Candle refuses an in-place op whose input shares the parameter's
                    // storage (a hand-made gradient store can hold the parameter itself as
                    // its gradient); every check runs before any write, so a retry on a
                    // copy of the gradient is safe and reports the real error if any.
                    if theta.as_tensor().inplace_op2(&g, &op).is_err() {
                        theta.as_tensor().inplace_op2(&g.copy()?, &op)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr
    }
}

impl FusedAdamW {
    /// An optimizer with the default [`ParamsAdamW`] but the learning rate `learning_rate`.
    ///
    /// # Errors
    /// As [`Optimizer::new`].
    pub fn new_lr(vars: Vec<Var>, learning_rate: f64) -> Result<Self> {
        let params = ParamsAdamW {
            lr: learning_rate,
            ..ParamsAdamW::default()
        };
        Self::new(vars, params)
    }

    /// The hyper-parameters in use.
    pub fn params(&self) -> &ParamsAdamW {
        &self.params
    }

    /// Replaces the hyper-parameters (the moments and step count are kept). They are checked
    /// by the next [`Optimizer::step`], which refuses out-of-range values.
    pub fn set_params(&mut self, params: ParamsAdamW) {
        self.params = params;
    }

    /// Steps taken so far (the `t` of the bias correction).
    pub fn step_count(&self) -> usize {
        self.step_t
    }

    /// The variables this optimizer updates.
    pub fn vars(&self) -> Vec<Var> {
        self.vars.iter().map(|state| state.var.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};
    use candle_nn::AdamW;

    /// The same starting variables twice: one set for each optimizer.
    fn twin_vars(dtype: DType) -> Result<(Vec<Var>, Vec<Var>)> {
        let dev = Device::Cpu;
        let make = || -> Result<Vec<Var>> {
            // Values from a fixed closed form, so both sets start equal and runs repeat.
            let ramp = |n: usize, shift: f64| {
                Tensor::arange(0u32, n as u32, &dev)?
                    .to_dtype(DType::F64)?
                    .affine(0.37, shift)?
                    .sin()?
                    .to_dtype(dtype)
            };
            Ok(vec![
                Var::from_tensor(&ramp(12, 0.1)?.reshape((3, 4))?)?,
                Var::from_tensor(&ramp(5, -0.7)?)?,
                // Large enough for the parallel path.
                Var::from_tensor(&ramp(PARALLEL_MIN + 77, 0.3)?.reshape(((), 1))?)?,
                // Never in the loss: no gradient.
                Var::from_tensor(&ramp(4, 0.0)?)?,
                // Not a float: dropped by both optimizers.
                Var::from_tensor(&Tensor::new(&[1u32, 2, 3], &dev)?)?,
                // Shares no storage with anything; gradient of a plain sum is a broadcast.
                Var::from_tensor(&ramp(6, 1.1)?.reshape((2, 3))?)?,
            ])
        };
        Ok((make()?, make()?))
    }

    /// A loss with curvature and sign changes; the last variable's gradient comes from a
    /// plain sum (a stride-0 broadcast of ones).
    fn loss(vars: &[Var], step: usize) -> Result<Tensor> {
        let s = 1.0 + step as f64 * 0.1;
        let a = (vars[0].as_tensor().sin()? * s)?.sqr()?.sum_all()?;
        let b = vars[0]
            .as_tensor()
            .sum_keepdim(D::Minus1)?
            .broadcast_mul(&vars[0])?
            .sum_all()?;
        let c = (vars[1].as_tensor() * vars[1].as_tensor().exp()?)?.sum_all()?;
        let d = (vars[2].as_tensor().cos()? * (2.0 - s))?.sum_all()?;
        let e = (vars[5].as_tensor().sum_all()? * s)?;
        a + b + c + d + e
    }

    fn bits(var: &Var) -> Result<Vec<u64>> {
        let flat = var.as_tensor().flatten_all()?;
        Ok(match var.dtype() {
            DType::F32 => flat
                .to_vec1::<f32>()?
                .into_iter()
                .map(|x| x.to_bits() as u64)
                .collect(),
            DType::F64 => flat
                .to_vec1::<f64>()?
                .into_iter()
                .map(f64::to_bits)
                .collect(),
            _ => flat
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .into_iter()
                .map(f64::to_bits)
                .collect(),
        })
    }

    /// Steps both optimizers side by side and requires every parameter to match bit for bit
    /// after every step (the arithmetic is the same IEEE operations in the same order, so
    /// the tolerance is zero).
    fn compare(dtype: DType, params: ParamsAdamW, steps: usize) -> Result<()> {
        compare_on(dtype, params, steps, false)
    }

    /// [`compare`], with `tensor_path` forcing every parameter onto the tensor-op path (the
    /// one Metal and non-contiguous parameters take).
    fn compare_on(
        dtype: DType,
        params: ParamsAdamW,
        steps: usize,
        tensor_path: bool,
    ) -> Result<()> {
        let (ours, theirs) = twin_vars(dtype)?;
        let mut fused = FusedAdamW::new(ours.clone(), params.clone())?;
        if tensor_path {
            for state in fused.vars.iter_mut() {
                state.moments = Moments::tensors(&state.var)?;
            }
        }
        let mut reference = AdamW::new(theirs.clone(), params.clone())?;
        assert_eq!(fused.vars().len(), 5, "the u32 variable is dropped");
        for step in 0..steps {
            if step == steps / 2 {
                fused.set_learning_rate(params.lr * 0.5);
                reference.set_learning_rate(params.lr * 0.5);
            }
            fused.backward_step(&loss(&ours, step)?)?;
            reference.backward_step(&loss(&theirs, step)?)?;
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(
                    bits(a)?,
                    bits(b)?,
                    "{dtype:?} step {step}: variable {i} differs from candle-nn's AdamW"
                );
            }
        }
        assert_eq!(fused.step_count(), steps);
        assert_eq!(fused.learning_rate(), params.lr * 0.5);
        // The variable without a gradient never moved; the others did.
        let (start, _) = twin_vars(dtype)?;
        assert_eq!(bits(&ours[3])?, bits(&start[3])?);
        assert_ne!(bits(&ours[0])?, bits(&start[0])?);
        assert_ne!(bits(&ours[5])?, bits(&start[5])?);
        Ok(())
    }

    #[test]
    fn matches_candle_nn_adamw_f32() -> Result<()> {
        compare(DType::F32, ParamsAdamW::default(), 12)?;
        compare(
            DType::F32,
            ParamsAdamW {
                lr: 0.05,
                beta1: 0.8,
                beta2: 0.95,
                eps: 1e-6,
                weight_decay: 0.1,
            },
            12,
        )
    }

    #[test]
    fn matches_candle_nn_adamw_f64() -> Result<()> {
        compare(DType::F64, ParamsAdamW::default(), 12)?;
        compare(
            DType::F64,
            ParamsAdamW {
                lr: 0.05,
                beta1: 0.8,
                beta2: 0.95,
                eps: 1e-6,
                weight_decay: 0.0,
            },
            12,
        )
    }

    /// The tensor-op path (the one Metal and non-contiguous parameters use) in f32 and f64
    /// is candle-nn's arithmetic too: the widening added for half precision is no cast there.
    #[test]
    fn tensor_op_path_matches_candle_nn_adamw() -> Result<()> {
        let params = ParamsAdamW {
            lr: 0.05,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-6,
            weight_decay: 0.1,
        };
        compare_on(DType::F32, params.clone(), 6, true)?;
        compare_on(DType::F64, params, 6, true)?;
        // Half precision takes it too, with f32 moments.
        let (ours, _) = twin_vars(DType::BF16)?;
        let fused = FusedAdamW::new(ours, ParamsAdamW::default())?;
        assert!(fused
            .vars
            .iter()
            .all(|s| matches!(&s.moments, Moments::Tensors { m, .. } if m.dtype() == DType::F32)));
        Ok(())
    }

    /// A hand-made gradient store whose gradient is the parameter itself.
    #[test]
    fn gradient_sharing_the_parameter_storage() -> Result<()> {
        let ours = Var::new(&[1f32, -2.0, 0.5], &Device::Cpu)?;
        let theirs = Var::new(&[1f32, -2.0, 0.5], &Device::Cpu)?;
        let mut fused = FusedAdamW::new_lr(vec![ours.clone()], 0.1)?;
        let mut reference = AdamW::new_lr(vec![theirs.clone()], 0.1)?;
        for _ in 0..3 {
            let mut grads = ours.as_tensor().sum_all()?.backward()?;
            grads.insert(ours.as_tensor(), ours.as_tensor().clone());
            fused.step(&grads)?;
            let mut grads = theirs.as_tensor().sum_all()?.backward()?;
            grads.insert(theirs.as_tensor(), theirs.as_tensor().clone());
            reference.step(&grads)?;
            assert_eq!(bits(&ours)?, bits(&theirs)?);
        }
        Ok(())
    }

    /// The new-user repro: an exact-zero gradient in f16 gave 0/0 (ε and (1 − β₂)·g²
    /// underflow to 0 in f16) and a NaN parameter after one step.
    #[test]
    fn half_precision_zero_gradient_leaves_the_parameter_finite() -> Result<()> {
        for dtype in [DType::F16, DType::BF16] {
            let v = Var::from_tensor(&Tensor::new(&[1f32, 2.], &Device::Cpu)?.to_dtype(dtype)?)?;
            let loss = v.as_tensor().narrow(0, 0, 1)?.sqr()?.sum_all()?;
            FusedAdamW::new(
                vec![v.clone()],
                ParamsAdamW {
                    lr: 0.1,
                    weight_decay: 0.,
                    ..Default::default()
                },
            )?
            .backward_step(&loss)?;
            let got = v.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
            assert!(
                (got[0] - 0.9).abs() < 2e-3 && got[1] == 2.0,
                "{dtype:?}: expected [0.9, 2.0], got {got:?}"
            );
        }
        Ok(())
    }

    /// A half-precision step is an f32 step rounded once: after every step the half
    /// parameter equals an f32 `FusedAdamW`'s (on the CPU fused path) rounded to the half
    /// dtype, with the same gradients (half-representable, zeros included). The f32 twin is
    /// reset to the rounded value after each step, so its moments, never rounded, must match
    /// too (moments kept in the half dtype would drift apart).
    #[test]
    fn half_precision_steps_in_f32() -> Result<()> {
        let dev = Device::Cpu;
        let params = ParamsAdamW {
            lr: 0.05,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let start = Tensor::new(&[0.3f32, -1.7, 2.5, 0.0, 1e-3, -4.0, 0.77, 1.0], &dev)?;
        for dtype in [DType::F16, DType::BF16] {
            let half = Var::from_tensor(&start.to_dtype(dtype)?)?;
            let wide = Var::from_tensor(&half.as_tensor().to_dtype(DType::F32)?)?;
            let mut ours = FusedAdamW::new(vec![half.clone()], params.clone())?;
            let mut twin = FusedAdamW::new(vec![wide.clone()], params.clone())?;
            assert!(matches!(twin.vars[0].moments, Moments::F32 { .. }));
            assert!(matches!(
                &ours.vars[0].moments,
                Moments::Tensors { m, v } if m.dtype() == DType::F32 && v.dtype() == DType::F32
            ));
            for step in 0..6 {
                let s = step as f32;
                let g = Tensor::new(&[1.0f32, -0.5, 0.0, 3.0, -1e-3, 0.0, 0.25 * s, -s], &dev)?
                    .to_dtype(dtype)?;
                let mut grads = half.as_tensor().sum_all()?.backward()?;
                grads.insert(half.as_tensor(), g.clone());
                ours.step(&grads)?;
                let mut grads = wide.as_tensor().sum_all()?.backward()?;
                grads.insert(wide.as_tensor(), g.to_dtype(DType::F32)?);
                twin.step(&grads)?;
                let rounded = wide.as_tensor().to_dtype(dtype)?;
                assert_eq!(
                    bits(&half)?,
                    bits(&Var::from_tensor(&rounded)?)?,
                    "{dtype:?} step {step}"
                );
                wide.set(&rounded.to_dtype(DType::F32)?)?;
            }
            let got = half.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
            assert!(got.iter().all(|x| x.is_finite()), "{dtype:?}: {got:?}");
        }
        Ok(())
    }

    /// Every hyper-parameter out of range or not finite is refused with its name and value,
    /// at construction and (after `set_params` / `set_learning_rate`) at the step, before
    /// anything is written or the step counter advances.
    #[test]
    fn hyper_parameters_are_checked() -> Result<()> {
        let good = ParamsAdamW::default();
        type Edit = fn(&mut ParamsAdamW, f64);
        let fields: [(&str, Edit, &[f64]); 5] = [
            ("lr", |p, x| p.lr = x, &[f64::NAN, -1.0, f64::INFINITY]),
            ("eps", |p, x| p.eps = x, &[f64::NAN, -1e-8, f64::INFINITY]),
            ("beta1", |p, x| p.beta1 = x, &[f64::NAN, -0.1, 1.0, 1.5]),
            (
                "beta2",
                |p, x| p.beta2 = x,
                &[f64::NAN, -0.1, 1.0, f64::INFINITY],
            ),
            (
                "weight_decay",
                |p, x| p.weight_decay = x,
                &[f64::NAN, -0.01, f64::INFINITY],
            ),
        ];
        for (name, edit, bad_values) in fields {
            for &bad in bad_values {
                let mut params = good.clone();
                edit(&mut params, bad);
                let expect = |err: Option<candle_core::Error>| {
                    let msg = err.map(|e| e.to_string()).unwrap_or_default();
                    assert!(
                        msg.contains(&format!("fused-adamw: {name} must be"))
                            && msg.contains(&format!("got {bad}")),
                        "{name} = {bad}: got {msg:?}"
                    );
                };
                let var = Var::new(&[1f32, -2.0], &Device::Cpu)?;
                expect(FusedAdamW::new(vec![var.clone()], params.clone()).err());
                let mut opt = FusedAdamW::new(vec![var.clone()], good.clone())?;
                opt.set_params(params);
                let grads = var.as_tensor().sum_all()?.backward()?;
                expect(opt.step(&grads).err());
                assert_eq!(opt.step_count(), 0, "{name} = {bad}");
                assert_eq!(var.as_tensor().to_vec1::<f32>()?, [1.0, -2.0]);
            }
        }
        // The edges that are allowed.
        let var = Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let edges = ParamsAdamW {
            lr: 0.0,
            beta1: 0.0,
            beta2: 0.0,
            eps: 0.0,
            weight_decay: 0.0,
        };
        FusedAdamW::new(vec![var.clone()], edges)?;
        // set_learning_rate cannot fail; the step refuses.
        let mut opt = FusedAdamW::new_lr(vec![var.clone()], 0.1)?;
        assert!(FusedAdamW::new_lr(vec![var.clone()], f64::NAN).is_err());
        assert!(FusedAdamW::new_lr(vec![var.clone()], -1.0).is_err());
        opt.set_learning_rate(f64::NAN);
        let err = opt
            .backward_step(&var.as_tensor().sum_all()?)
            .err()
            .map(|e| e.to_string());
        // The first line (candle appends a backtrace when RUST_BACKTRACE is set).
        assert_eq!(
            err.as_deref().and_then(|e| e.lines().next()),
            Some("fused-adamw: lr must be finite and >= 0, got NaN")
        );
        assert_eq!(opt.step_count(), 0);
        assert_eq!(var.as_tensor().to_vec1::<f32>()?, [1.0, -2.0]);
        opt.set_learning_rate(0.1);
        opt.backward_step(&var.as_tensor().sum_all()?)?;
        assert_eq!(opt.step_count(), 1);
        Ok(())
    }

    #[test]
    fn gradient_of_wrong_dtype_is_an_error() -> Result<()> {
        let var = Var::new(&[1f32, 2.0], &Device::Cpu)?;
        let mut opt = FusedAdamW::new_lr(vec![var.clone()], 0.1)?;
        let mut grads = var.as_tensor().sum_all()?.backward()?;
        grads.insert(var.as_tensor(), Tensor::new(&[1f64, 1.0], &Device::Cpu)?);
        let err = opt.step(&grads).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("F64")),
            "expected a dtype error naming F64, got {err:?}"
        );
        // The tensor-op path too: an f32 gradient for an f16 parameter is not widened
        // silently.
        let var =
            Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?.to_dtype(DType::F16)?)?;
        let mut opt = FusedAdamW::new_lr(vec![var.clone()], 0.1)?;
        let mut grads = var.as_tensor().sum_all()?.backward()?;
        grads.insert(var.as_tensor(), Tensor::new(&[1f32, 1.0], &Device::Cpu)?);
        let err = opt.step(&grads).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("F32")),
            "expected a dtype error naming F32, got {err:?}"
        );
        Ok(())
    }
}
