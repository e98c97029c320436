//! The `adamw` CUDA kernel, run on the CPU by the emulation, against candle-nn's `AdamW`
//! (tensor ops on the CPU): equal bit for bit after several steps, in f32 and f64, which is
//! what lets `FusedAdamW` on CUDA promise candle-nn's arithmetic.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use cuda_emulation::{adamw, AdamState, KernelFloat};

/// The step's scalars as candle-nn 0.11's `AdamW::step` forms them (in f64, then rounded to the
/// dtype once, as `tensor * f64` does).
fn scalars<T: KernelFloat>(params: &ParamsAdamW, step: i32, round: fn(f64) -> T) -> [T; 9] {
    let lr = params.lr;
    [
        params.beta1,
        1.0 - params.beta1,
        params.beta2,
        1.0 - params.beta2,
        1.0 / (1.0 - params.beta1.powi(step)),
        1.0 / (1.0 - params.beta2.powi(step)),
        1.0 - lr * params.weight_decay,
        params.eps,
        lr,
    ]
    .map(round)
}

fn check<T>(dtype: DType, round: fn(f64) -> T) -> Result<()>
where
    T: KernelFloat + candle_core::WithDType + PartialEq + std::fmt::Debug,
{
    let n = 1000;
    let params = ParamsAdamW {
        lr: 3e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    let init = Tensor::randn(0f64, 1.0, n, &Device::Cpu)?.to_dtype(dtype)?;
    let var = Var::from_tensor(&init)?;
    let mut reference = AdamW::new(vec![var.clone()], params.clone())?;
    let mut theta = init.to_vec1::<T>()?;
    let (mut m, mut v) = (vec![T::default(); n], vec![T::default(); n]);
    for step in 1..=5 {
        let grad = (Tensor::randn(0f64, 1.0, n, &Device::Cpu)? * (step as f64 * 10f64).powi(2))?
            .to_dtype(dtype)?;
        // Per-element scales 0 (first ten), 1e-9 (√v̂ near ε), 1e-4, 1 and 1e3.
        let scales: Vec<f64> = (0..n)
            .map(|i| {
                if i < 10 {
                    0.0
                } else {
                    [1e-9, 1e-4, 1.0, 1e3][i % 4]
                }
            })
            .collect();
        let grad =
            grad.broadcast_mul(&Tensor::from_vec(scales, n, &Device::Cpu)?.to_dtype(dtype)?)?;
        // d/dθ Σ θ ⊙ grad = grad exactly (the sum's backward is ones).
        reference.backward_step(&(var.as_tensor() * &grad)?.sum_all()?)?;
        adamw(
            AdamState {
                theta: &mut theta,
                m: &mut m,
                v: &mut v,
            },
            &grad.to_vec1::<T>()?,
            &scalars(&params, step, round),
            // Odd block sizes: the kernel must not depend on them.
            [1, 7, 256][step as usize % 3],
        );
        let expected = var.as_tensor().to_vec1::<T>()?;
        let first_difference = theta.iter().zip(&expected).position(|(a, b)| a != b);
        assert_eq!(
            first_difference,
            None,
            "{dtype:?} step {step}: kernel and candle-nn differ (kernel {:?}, candle-nn {:?})",
            first_difference.map(|i| theta[i]),
            first_difference.map(|i| expected[i])
        );
    }
    Ok(())
}

#[test]
fn f32_kernel_equals_candle_nn_adamw_bit_for_bit() -> Result<()> {
    check::<f32>(DType::F32, |v| v as f32)
}

#[test]
fn f64_kernel_equals_candle_nn_adamw_bit_for_bit() -> Result<()> {
    check::<f64>(DType::F64, |v| v)
}
