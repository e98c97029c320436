//! `e^x` elementwise as one Candle op whose CPU f32 form is vectorized, for the parameter maps
//! that exponentiate a whole (Z, d) tensor every step (diag's `e^θ` in the forward and `e^{−θ}`
//! in the λ-loss's `tr Σ`). Candle's CPU `exp` calls libm once per element: at d = 784 those
//! two maps were 18 % of a single-threaded MNIST diag training step.
//!
//! The arithmetic is written out (range reduction, a polynomial, the exponent in the bits)
//! because the vector libraries that offer `exp` (`wide`, `sleef`) pick their instructions when
//! the crate is compiled: a plain x86-64 build gets SSE2 without a rounding instruction, and
//! `wide`'s `exp` measured slower than libm here. Written as plain loops, the body compiles
//! through [`simd_kernel!`](super::simd_kernel) at the CPU's width, picked at run time (f64
//! keeps libm's `exp` inside the same ops). Every other device and `portable` run Candle's
//! own `exp` ([`exp`] asks [`crate::route::backend`]).

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::{row_major, simd_kernel, with_row_major, Real};
use crate::route::{backend, Backend};

/// `e^x` elementwise: the op on the fused CPU route (f32 vectorized, within 2 ulp of libm;
/// f64 libm's own values), Candle's `exp` elsewhere (`portable`, other devices and dtypes).
/// Both have the gradient `∂x = ∂y ∘ e^x`.
///
/// # Shapes
/// any → the same
pub(crate) fn exp(x: &Tensor, portable: bool) -> candle_core::Result<Tensor> {
    match backend(x.device(), x.dtype(), portable) {
        Backend::CpuFused => x.apply_op1(Exp),
        Backend::Cuda | Backend::Portable => x.exp(),
    }
}

/// `e^x` for one f32 in arithmetic that vectorizes: `x = n ln 2 + r` with `|r| ≤ ln 2 / 2`
/// (Cody–Waite: `ln 2` split so that `n · LN2_HI` is exact), `e^r` by its Taylor polynomial
/// of degree 7 (truncation below 5e-9 relative), `2^n` written into the exponent bits.
/// Results that would be subnormal are 0, overflow is `+∞`, NaN stays NaN.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 355 / 512: 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to an integer
    const MAX: f32 = 88.722_84; // ln(f32::MAX)
    const MIN: f32 = -87.336_55; // ln(f32::MIN_POSITIVE)
    let clamped = x.clamp(MIN, MAX);
    // Rounded n and its integer from the same sum: n sits in the low bits of the mantissa
    // (integer arithmetic on the bits, so the conversion vectorizes too; wrapping, because
    // a NaN input carries arbitrary bits here and is replaced at the end).
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let mut poly = 1.0 / 5040.0;
    for coefficient in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        poly = poly * r + coefficient;
    }
    // 2^n as 2^(n − n/2) · 2^(n/2): n reaches 128 near MAX, beyond a normal float's exponent.
    let low = n_int >> 1;
    let power = |k: i32| f32::from_bits((k.wrapping_add(127) as u32) << 23);
    let value = (poly * power(n_int.wrapping_sub(low))) * power(low);
    let value = if x < MIN { 0.0 } else { value };
    let value = if x > MAX { f32::INFINITY } else { value };
    if x.is_nan() {
        x
    } else {
        value
    }
}

/// `tanh x` for one f32 in arithmetic that vectorizes: below |x| = 0.625 Cephes' odd
/// polynomial (`tanhf.c`, relative error 1.3e-7), above it `1 − 2 / (e^{2|x|} + 1)` with the
/// sign of x (no cancellation there: the result is above 0.55). ±∞ give ±1, NaN stays NaN.
#[inline(always)]
pub(super) fn tanh_f32(x: f32) -> f32 {
    let z = x * x;
    let mut poly = -5.704_988_7e-3;
    for coefficient in [2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1] {
        poly = poly * z + coefficient;
    }
    // x itself at ±0, whose sign the sum would drop.
    let small = if x == 0.0 { x } else { poly * z * x + x };
    let magnitude = 1.0 - 2.0 / (exp_f32(2.0 * x.abs()) + 1.0);
    let large = if x < 0.0 { -magnitude } else { magnitude };
    if x.abs() < 0.625 {
        small
    } else {
        large
    }
}

simd_kernel! {
    /// `out[i] = e^{values[i]}`, f32 through [`exp_f32`], f64 through libm.
    fn exp_into<T: Real>(values: &[T], out: &mut [T]) {
        for (o, &v) in out.iter_mut().zip(values) {
            *o = v.exp_vectorizable();
        }
    }
}

/// `e^x` of every element (f32 vectorized, see [`exp_f32`]).
pub(crate) fn exp_slice<T: Real>(values: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); values.len()];
    exp_into(values, &mut out);
    out
}

/// The op behind [`exp`] on the fused CPU route.
struct Exp;

impl CustomOp1 for Exp {
    fn name(&self) -> &'static str {
        "vectorized-exp"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(exp_slice(&row_major::<f32>(storage, layout)?)),
            CpuStorage::F64(_) => CpuStorage::F64(exp_slice(&row_major::<f64>(storage, layout)?)),
            _ => bail!("{}: supports f32 and f64", self.name()),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        result: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.mul(result)?))
    }
}

/// `Σ_i e^{−x_zi}` for each row z of a (Z, d) tensor, as one op on the fused f32 and f64 CPU
/// route (tensor ops elsewhere): diag's `tr Σ` from `θ`. Its backward,
/// `∂x_zi = −∂y_z e^{−x_zi}`, is one pass too, where the tensor ops' chain (negate,
/// exponentiate, sum) costs a (Z, d) gradient and its accumulation per op.
///
/// # Shapes
/// `x`: (Z, d) → (Z)
pub(crate) fn sum_exp_negated(x: &Tensor, portable: bool) -> candle_core::Result<Tensor> {
    match backend(x.device(), x.dtype(), portable) {
        Backend::CpuFused => x.apply_op1(SumExpNegated),
        Backend::Cuda | Backend::Portable => x.neg()?.exp()?.sum(1),
    }
}

simd_kernel! {
    /// `out[i] = e^{−values[i]} · scale`.
    fn scaled_exp_negated_into<T: Real>(values: &[T], scale: T, out: &mut [T]) {
        for (o, &v) in out.iter_mut().zip(values) {
            *o = (T::zero() - v).exp_vectorizable() * scale;
        }
    }
}

/// Row sums of `e^{−x}` for the `rows` rows of `values`.
fn row_sums_exp_negated<T: Real>(values: &[T], rows: usize) -> Vec<T> {
    let width = values.len() / rows.max(1);
    let mut terms = vec![T::zero(); width];
    values
        .chunks_exact(width.max(1))
        .take(rows)
        .map(|row| {
            scaled_exp_negated_into(row, T::one(), &mut terms);
            terms.iter().fold(T::zero(), |total, &term| total + term)
        })
        .collect()
}

/// `−∂y_z e^{−x_zi}` for every element.
fn gradient_exp_negated<T: Real>(values: &[T], upstream: &[T]) -> Vec<T> {
    let width = values.len() / upstream.len().max(1);
    let mut out = vec![T::zero(); values.len()];
    for ((row, out_row), &g) in values
        .chunks_exact(width.max(1))
        .zip(out.chunks_exact_mut(width.max(1)))
        .zip(upstream)
    {
        scaled_exp_negated_into(row, T::zero() - g, out_row);
    }
    out
}

/// [`gradient_exp_negated`] of the CPU tensors `x` (Z, d) and `upstream` (Z), as `T`.
fn gradient_tensor<T: Real>(x: &Tensor, upstream: &Tensor) -> candle_core::Result<Tensor> {
    let values = with_row_major::<T, _>(x, |values| {
        with_row_major::<T, _>(upstream, |g| Ok(gradient_exp_negated(values, g)))
    })?;
    Tensor::from_vec(values, x.shape(), x.device())
}

/// The op behind [`sum_exp_negated`] on the fused CPU route.
struct SumExpNegated;

impl SumExpNegated {
    fn rows(&self, dims: &[usize]) -> candle_core::Result<usize> {
        match *dims {
            [rows, _] => Ok(rows),
            ref dims => bail!("{}: expected (Z, d), got {dims:?}", self.name()),
        }
    }
}

impl CustomOp1 for SumExpNegated {
    fn name(&self) -> &'static str {
        "sum-exp-negated"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let rows = self.rows(layout.dims())?;
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(row_sums_exp_negated(
                &row_major::<f32>(storage, layout)?,
                rows,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(row_sums_exp_negated(
                &row_major::<f64>(storage, layout)?,
                rows,
            )),
            _ => bail!("{}: supports f32 and f64", self.name()),
        };
        Ok((out, Shape::from(rows)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _result: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.rows(x.dims())?;
        let grad = grad.to_dtype(x.dtype())?;
        let out = match x.dtype() {
            DType::F32 => gradient_tensor::<f32>(x, &grad)?,
            DType::F64 => gradient_tensor::<f64>(x, &grad)?,
            other => bail!("{}: supports f32 and f64, got {other:?}", self.name()),
        };
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::cpu::{with_width, Width};

    /// Units in the last place between two finite floats of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn agrees_with_libm_within_two_ulp_over_the_normal_range() {
        // A sweep over every x whose e^x is a normal float, 200,003 points (the tail is not
        // a multiple of a vector width).
        let values: Vec<f32> = (0..200_003)
            .map(|i| -87.3 + i as f32 * (176.0 / 200_003.0))
            .collect();
        let fast = exp_slice(&values);
        for (&x, &y) in values.iter().zip(&fast) {
            let libm = x.exp();
            if libm.is_finite() {
                assert!(ulps(y, libm) <= 2, "e^{x}: {y} against libm {libm}");
            }
        }
    }

    #[test]
    fn special_values() {
        let out = exp_slice(&[
            0.0f32,
            -0.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            88.8,
            -88.0,
            88.72,
        ]);
        assert_eq!(out[..4], [1.0, 1.0, 0.0, f32::INFINITY]);
        assert!(out[4].is_nan());
        assert_eq!(out[5], f32::INFINITY);
        assert_eq!(out[6], 0.0, "subnormal results are flushed to 0");
        assert!(out[7].is_finite() && ulps(out[7], 88.72f32.exp()) <= 2);
    }

    #[test]
    fn every_width_gives_the_same_bits() {
        let values: Vec<f32> = (0..1001).map(|i| -40.0 + i as f32 * 0.08).collect();
        let wide = exp_slice(&values);
        let baseline = with_width(Width::Baseline, || exp_slice(&values));
        assert_eq!(
            wide.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            baseline.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    /// `op(x)`'s values, then the gradient of `Σ weights ∘ op(x)` by `x`, as f64 (on the CPU),
    /// for the fused route and then the portable one.
    fn fused_and_portable(
        op: impl Fn(&Tensor, bool) -> candle_core::Result<Tensor>,
        x: &Var,
        weights: &Tensor,
    ) -> candle_core::Result<[Vec<f64>; 2]> {
        let run = |portable: bool| -> candle_core::Result<Vec<f64>> {
            let y = op(x.as_tensor(), portable)?;
            let grads = (&y * weights)?.sum_all()?.backward()?;
            let Some(grad) = grads.get(x.as_tensor()) else {
                panic!("no gradient for x (portable {portable})");
            };
            // f64: a unit test on Device::Cpu (`x` and `weights` build there)
            let values = y.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            // f64: the same CPU test tensors
            let grad = grad.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            Ok([values, grad].concat())
        };
        Ok([run(false)?, run(true)?])
    }

    #[test]
    fn op_values_and_gradient_match_candles_exp() -> candle_core::Result<()> {
        // d/dx Σ w ∘ e^x = w ∘ e^x: the op (fused route) against Candle's exp (portable).
        let x = Var::new(&[[-1.5f32, 0.0, 0.25], [2.0, -3.0, 0.5]], &Device::Cpu)?;
        let weights = Tensor::new(&[[1f32, -2.0, 0.5], [3.0, 1.0, -1.0]], &Device::Cpu)?;
        let [fused, candle] = fused_and_portable(exp, &x, &weights)?;
        // The f32 values came through f64 exactly.
        for (a, b) in fused.iter().zip(&candle) {
            assert!(ulps(*a as f32, *b as f32) <= 2, "{a} against {b}");
        }
        // A strided input (a transpose) is read in row-major order.
        let t = x.as_tensor().t()?;
        let fused_t = exp(&t, false)?.flatten_all()?.to_vec1::<f32>()?;
        let candle_t = t.exp()?.flatten_all()?.to_vec1::<f32>()?;
        for (a, b) in fused_t.iter().zip(&candle_t) {
            assert!(ulps(*a, *b) <= 2);
        }
        Ok(())
    }

    #[test]
    fn sum_exp_negated_and_its_gradient_match_the_tensor_ops() -> candle_core::Result<()> {
        // f64 (libm inside the op too): the same values to rounding; f32: within a few ulp.
        let theta = [
            [-1.5f64, 0.0, 0.25, 3.0],
            [2.0, -3.0, 0.5, 1.0],
            [0.1, 0.2, 0.3, 0.4],
        ];
        let weights = Tensor::new(&[1f64, -2.0, 0.5], &Device::Cpu)?;
        for dtype in [DType::F64, DType::F32] {
            let x = Var::from_tensor(&Tensor::new(&theta, &Device::Cpu)?.to_dtype(dtype)?)?;
            let weights = weights.to_dtype(dtype)?;
            let [fused, ops] = fused_and_portable(sum_exp_negated, &x, &weights)?;
            let tolerance = if dtype == DType::F64 { 1e-14 } else { 1e-6 };
            for (fused, ops) in fused.iter().zip(&ops) {
                assert!(
                    (fused - ops).abs() <= tolerance * ops.abs(),
                    "{dtype:?}: {fused} against {ops}"
                );
            }
        }
        // Not (Z, d): named in the error.
        let flat = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        let Err(err) = sum_exp_negated(&flat.reshape((1, 1, 2))?, false) else {
            panic!("a rank-3 input was accepted");
        };
        assert!(err.to_string().contains("expected (Z, d)"), "{err}");
        Ok(())
    }

    #[test]
    fn tanh_agrees_with_libm_within_four_ulp() {
        let values: Vec<f32> = (0..100_001)
            .map(|i| -12.0 + i as f32 * (24.0 / 100_000.0))
            .chain([
                0.0,
                -0.0,
                1e-30,
                -1e-30,
                0.625,
                -0.625,
                0.624_999_9,
                50.0,
                -50.0,
            ])
            .collect();
        for &x in &values {
            let (fast, libm) = (tanh_f32(x), x.tanh());
            assert!(
                ulps(fast.abs(), libm.abs()) <= 4 && fast.signum() == libm.signum(),
                "tanh {x}: {fast} against libm {libm}"
            );
        }
        assert_eq!(tanh_f32(f32::INFINITY), 1.0);
        assert_eq!(tanh_f32(f32::NEG_INFINITY), -1.0);
        assert!(tanh_f32(f32::NAN).is_nan());
    }
}
