use super::*;

#[test]
fn diagonal_fused_matches_oracle_forward_and_backward() -> TestResult {
    let c = case(10, 41, 11, 13, 100.0);
    let mut rng = StdRng::seed_from_u64(110);
    let diagonal = normal(&mut rng, &[13, 11], 1.0).exp()?;
    let fused = diagonal_fused(&c.x, &c.center, &diagonal)?;
    let expected = oracle_diagonal(&c.x, &c.center, &diagonal)?;
    assert!(max_relative_error(&fused, &expected, 1e-3) < 1e-12);

    let fused32 = diagonal_fused(
        &c.x.to_dtype(DType::F32)?,
        &c.center.to_dtype(DType::F32)?,
        &diagonal.to_dtype(DType::F32)?,
    )?;
    assert!(max_relative_error(&fused32, &expected, 1.0) < 1e-5);

    let upstream = normal(&mut rng, &[41, 13], 1.0);
    let inputs = [&c.x, &c.center, &diagonal];
    let fused = gradients(diagonal_fused, inputs, &upstream)?;
    let oracle = gradients(|x, c, p| Ok(oracle_diagonal(x, c, p)?), inputs, &upstream)?;
    for (a, b) in fused.iter().zip(&oracle) {
        assert!(gradient_error(a, b)? < 1e-11);
    }
    Ok(())
}

#[test]
fn diagonal_fused_rows_do_not_depend_on_the_blocking() -> TestResult {
    // The forward and backward handle input rows in blocks of four with a single-row tail;
    // each row must come out bit for bit as when it is computed alone (batch 1: tail only).
    let c = case(11, 9, 19, 5, 10.0);
    let mut rng = StdRng::seed_from_u64(111);
    let diagonal = normal(&mut rng, &[5, 19], 1.0).exp()?;
    let upstream = normal(&mut rng, &[9, 5], 1.0);
    // f64: tests of the fused CPU kernels run on the CPU only
    for dtype in [DType::F64, DType::F32] {
        let x = c.x.to_dtype(dtype)?;
        let center = c.center.to_dtype(dtype)?;
        let diagonal = diagonal.to_dtype(dtype)?;
        let upstream = upstream.to_dtype(dtype)?;
        let whole = diagonal_fused(&x, &center, &diagonal)?;
        let whole_grad_x = gradients(diagonal_fused, [&x, &center, &diagonal], &upstream)?;
        for b in 0..9 {
            let row = x.narrow(0, b, 1)?;
            let alone = diagonal_fused(&row, &center, &diagonal)?;
            let expected = whole.narrow(0, b, 1)?;
            let same = alone.eq(&expected)?.to_dtype(DType::U32)?;
            assert_eq!(
                same.sum_all()?.to_scalar::<u32>()?,
                5,
                "row {b} ({dtype:?})"
            );
            let row_grad = gradients(
                diagonal_fused,
                [&row, &center, &diagonal],
                &upstream.narrow(0, b, 1)?,
            )?;
            let same = row_grad[0]
                .eq(&whole_grad_x[0].narrow(0, b, 1)?)?
                .to_dtype(DType::U32)?;
            assert_eq!(
                same.sum_all()?.to_scalar::<u32>()?,
                19,
                "grad row {b} ({dtype:?})"
            );
        }
    }
    Ok(())
}

/// The hand-vectorized loops give the same bits at both vector widths (`cpu::simd_kernel!`:
/// baseline and, where the CPU has it, AVX2): the diagonal op's forward and backward, f32 and
/// f64.
#[test]
fn diagonal_fused_is_bit_identical_at_both_vector_widths() -> TestResult {
    use crate::cpu::{width, with_width, Width};
    let c = case(12, 23, 37, 7, 10.0);
    let mut rng = StdRng::seed_from_u64(112);
    let diagonal = normal(&mut rng, &[7, 37], 1.0).exp()?;
    let upstream = normal(&mut rng, &[23, 7], 1.0);
    // f64: tests of the fused CPU kernels run on the CPU only
    for dtype in [DType::F64, DType::F32] {
        let inputs = [&c.x, &c.center, &diagonal].map(|t| t.to_dtype(dtype));
        let [x, center, diagonal] = inputs;
        let (x, center, diagonal) = (x?, center?, diagonal?);
        let upstream = upstream.to_dtype(dtype)?;
        let run = || -> std::result::Result<Vec<Vec<f64>>, Box<dyn std::error::Error>> {
            let mut out = vec![flat(&diagonal_fused(&x, &center, &diagonal)?)?];
            for grad in gradients(diagonal_fused, [&x, &center, &diagonal], &upstream)? {
                out.push(flat(&grad)?);
            }
            Ok(out)
        };
        let widest = run()?;
        let narrower = with_width(Width::Baseline, || (width(), run()));
        let (used, values) = (narrower.0, narrower.1?);
        assert_eq!(used, Width::Baseline);
        for (a, b) in widest.iter().zip(&values) {
            let same = a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{dtype:?}: {used:?} differs from the default width");
        }
    }
    Ok(())
}

/// A tensor's values as f64 (exact for f32 and f64), row-major.
fn flat(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    // f64: a host-side copy of CPU test tensors, to compare their bits
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

#[test]
fn diagonal_portable_keeps_its_digits_away_from_the_origin() -> TestResult {
    // Pixels around 128, centers within 0.05 of the inputs, P = I/784: m2 ≈ 0.003 while each
    // term of the expansion is about Σ p x² ≈ 16000. Without the shift by the centers' mean
    // the f32 portable form lost every digit (0.0010–0.0068 for 0.0027).
    let (batch, dim, neurons) = (8, 784, 4);
    let mut rng = StdRng::seed_from_u64(211);
    let x = (normal(&mut rng, &[batch, dim], 1.0) + 128.0)?;
    let center = (x.narrow(0, 0, neurons)? + normal(&mut rng, &[neurons, dim], 0.05))?;
    let diagonal = Tensor::full(1.0 / dim as f64, (neurons, dim), &Device::Cpu)?;
    let expected = oracle_diagonal(&x, &center, &diagonal)?;
    let as_f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let portable =
        super::super::diagonal::portable(&as_f32(&x)?, &as_f32(&center)?, &as_f32(&diagonal)?)?;
    // Relative to m2 itself (no floor): the error of the shifted expansion is about
    // eps_f32 · Σ p (x − c̄)² ≈ 1e-7, against m2 ≥ 0.002 near a center.
    assert!(max_relative_error(&portable, &expected, 0.0) < 1e-3);
    Ok(())
}

/// The documented limit of the portable diagonal form: one center at 1e4 among centers near
/// 0.5 (as `convert` places a nearly dead neuron's), P = I/2, f32. The near neurons' `m2`
/// lose digits, within the documented bound `ε · Σ_i p ((x − c̄)² + (c − c̄)²)` (a few times
/// it: three terms, each rounded), and the fused op keeps them.
#[test]
fn diagonal_portable_error_stays_within_its_documented_bound() -> TestResult {
    let (batch, dim) = (5, 4);
    let mut rng = StdRng::seed_from_u64(7);
    let x = (normal(&mut rng, &[batch, dim], 0.1) + 1.0)?;
    let near = (normal(&mut rng, &[2, dim], 0.1) + 0.5)?;
    let far = Tensor::new(&[[1e4f64, 0.0, 0.0, 0.0]], &Device::Cpu)?;
    let center = Tensor::cat(&[&near, &far], 0)?;
    let diagonal = Tensor::full(0.5f64, (3, dim), &Device::Cpu)?;
    let expected = oracle_diagonal(&x, &center, &diagonal)?.to_vec2::<f64>()?;
    let as_f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let (x32, center32, diagonal32) = (as_f32(&x)?, as_f32(&center)?, as_f32(&diagonal)?);
    let portable = super::super::diagonal::portable(&x32, &center32, &diagonal32)?;
    // f64: the f32 result compared on the host (CPU test tensors)
    let portable = portable.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mean = center.mean(0)?.to_vec1::<f64>()?;
    let (xs, cs) = (x.to_vec2::<f64>()?, center.to_vec2::<f64>()?);
    let eps = f64::from(f32::EPSILON) / 2.0;
    let mut largest_error = 0f64;
    for (b, row) in xs.iter().enumerate() {
        for (z, c) in cs.iter().enumerate() {
            let size: f64 = (0..dim)
                .map(|i| 0.5 * ((row[i] - mean[i]).powi(2) + (c[i] - mean[i]).powi(2)))
                .sum();
            let error = (portable[b][z] - expected[b][z]).abs();
            assert!(
                error <= 8.0 * eps * size,
                "b {b} z {z}: error {error:e}, bound {:e}",
                eps * size
            );
            if z < 2 {
                largest_error = largest_error.max(error);
            }
        }
    }
    // The limit is real (so the exact forms are worth their cost where it matters) ...
    assert!(largest_error > 1e-3, "{largest_error:e}");
    // ... and the fused op has none of it.
    let fused = crate::kernels::distance_op::apply(
        Sizes {
            batch,
            dim,
            neurons: 3,
        },
        &x32,
        &center32,
        &diagonal32,
        crate::kernels::distance_op::FusedPlan::Diagonal,
    )?;
    assert!(max_relative_error(&fused, &oracle_diagonal(&x, &center, &diagonal)?, 0.0) < 1e-6);
    Ok(())
}

#[test]
fn portable_forms_keep_a_finite_row_whose_sum_overflows() -> TestResult {
    // The portable rule for non-finite rows adds Σ 0·x (NaN only for a non-finite row); it
    // summed x first, and [3e38, 3e38] sums to ∞ in f32, so a finite row came out NaN.
    let x = Tensor::new(&[[3e38f32, 3e38], [0.5, -0.5]], &Device::Cpu)?;
    let center = Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?;
    let diagonal = Tensor::ones((2, 2), DType::F32, &Device::Cpu)?;
    let resolved = crate::kernels::Resolved {
        kernel: crate::kernels::ResolvedKernel::DiagonalTensorOps,
        operand: Operand::Diagonal(diagonal),
        sizes: Sizes {
            batch: 2,
            dim: 2,
            neurons: 2,
        },
    };
    let m2 = super::super::run(&x, &center, &resolved)?.to_vec2::<f32>()?;
    assert!(m2[0].iter().all(|v| !v.is_nan()), "{m2:?}");
    assert_eq!(m2[1], vec![0.5, 0.5]);
    Ok(())
}

/// Half precision computes `m2` in f32: with P = I (d = 8), inputs at a, one center at
/// a + ½ and one at a − r, `m2 = 8 · ¼ = 2` and `8 r²` exactly (every value representable).
/// The expanded portable forms' terms (`Σ p x²` after the shift by the centers' mean) cancelled
/// m2 = 2 to nothing in bf16 and lost it in f16. Every parameterization and kernel, with the
/// gradient `∂Σm2/∂x = 2(x − c₀) + 2(x − c₁) = 2r − 1` per entry.
#[test]
fn half_precision_distances_are_computed_in_f32() -> TestResult {
    use crate::config::Parameterization;
    for (dtype, at, r) in [(DType::BF16, 20.0f32, 20.0f32), (DType::F16, 250.0, 30.0)] {
        let x = Var::from_tensor(&Tensor::full(at, (3, 8), &Device::Cpu)?.to_dtype(dtype)?)?;
        let center = Tensor::stack(
            &[
                Tensor::full(at + 0.5, 8, &Device::Cpu)?,
                Tensor::full(at - r, 8, &Device::Cpu)?,
            ],
            0,
        )?
        .to_dtype(dtype)?;
        let eye = Tensor::eye(8, DType::F32, &Device::Cpu)?
            .unsqueeze(0)?
            .repeat((2, 1, 1))?;
        for parameterization in Parameterization::ALL {
            let config = crate::config::PrecisionConfig::with_parameterization(parameterization);
            let precision = Precision::from_precision_matrix(&eye, config)?;
            let precision = Precision::from_raw(precision.raw().to_dtype(dtype)?, 8, config)?;
            for kernel in [
                DistanceKernel::Auto,
                DistanceKernel::Expanded,
                DistanceKernel::Naive,
            ] {
                let case = format!("{dtype:?} {parameterization} {kernel:?}");
                let m2 = mahalanobis_sq(&x, &center, &precision, kernel, false)?;
                assert_eq!(m2.dtype(), dtype);
                let values = m2.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                for row in &values {
                    let far = 8.0 * r * r;
                    assert!((row[0] - 2.0).abs() <= 0.02, "{case}: {values:?}");
                    assert!((row[1] / far - 1.0).abs() <= 0.01, "{case}: {values:?}");
                }
                let grads = m2.sum_all()?.backward()?;
                let grad = grads.get(&x).ok_or("no gradient of x")?;
                let grad = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let expected = 2.0 * r - 1.0;
                assert!(
                    grad.iter().all(|g| (g / expected - 1.0).abs() <= 0.02),
                    "{case}: {grad:?}"
                );
            }
        }
    }
    Ok(())
}
