use super::*;

#[test]
fn projected_fused_matches_oracle_in_f64() -> TestResult {
    // Sizes off every tile and lane multiple; 200 rows span several row tiles and chunks.
    for (seed, batch, dim, neurons) in [(1, 37, 7, 11), (2, 200, 20, 40), (3, 5, 1, 3)] {
        let c = case(seed, batch, dim, neurons, 100.0);
        let fused = projected_fused(&c.x, &c.center, &c.factor)?;
        let expected = oracle_projected(&c.x, &c.center, &c.factor)?;
        assert_eq!(fused.dims(), [batch, neurons]);
        let err = max_relative_error(&fused, &expected, 1e-3);
        assert!(
            err < 1e-9,
            "B={batch} d={dim} Z={neurons}: relative error {err:e}"
        );
    }
    Ok(())
}

#[test]
fn projected_fused_f32_agrees_with_f64_reference() -> TestResult {
    // The f64 oracle on the very f32 values: the fused f32 result must stay within 1e-5
    // relative (floor 1: where g = exp(-m2/2) is not yet negligible, absolute error matters).
    let c = case(4, 129, 33, 21, 100.0);
    let (x, center, factor) = (
        c.x.to_dtype(DType::F32)?,
        c.center.to_dtype(DType::F32)?,
        c.factor.to_dtype(DType::F32)?,
    );
    let fused = projected_fused(&x, &center, &factor)?;
    assert_eq!(fused.dtype(), DType::F32);
    let expected = oracle_projected(
        &x.to_dtype(DType::F64)?,
        &center.to_dtype(DType::F64)?,
        &factor.to_dtype(DType::F64)?,
    )?;
    let err = max_relative_error(&fused, &expected, 1.0);
    // The same projected form as plain f32 tensor ops (one GEMM against the stacked factors).
    let (neurons, dim) = center.dims2()?;
    let stacked = factor.transpose(0, 1)?.reshape((dim, neurons * dim))?;
    let projected_centers = center
        .unsqueeze(1)?
        .matmul(&factor)?
        .reshape((1, neurons * dim))?;
    let tensor_ops = x
        .matmul(&stacked)?
        .broadcast_sub(&projected_centers)?
        .sqr()?
        .reshape((129, neurons, dim))?
        .sum(2)?;
    let reference_err = max_relative_error(&tensor_ops, &expected, 1.0);
    assert!(err < 1e-5, "relative error {err:e}");
    // Shifting by the mean center must not make the fused form worse than the plain one.
    assert!(
        err <= 2.0 * reference_err + 1e-6,
        "{err:e} vs {reference_err:e}"
    );
    Ok(())
}

#[test]
fn projected_fused_gradients_match_autograd() -> TestResult {
    for (seed, batch, dim, neurons) in [(5, 70, 9, 30), (6, 3, 40, 2)] {
        let c = case(seed, batch, dim, neurons, 20.0);
        let mut rng = StdRng::seed_from_u64(seed + 100);
        let upstream = normal(&mut rng, &[batch, neurons], 1.0);
        let inputs = [&c.x, &c.center, &c.factor];
        let fused = gradients(projected_fused, inputs, &upstream)?;
        let oracle = gradients(|x, c, f| Ok(oracle_projected(x, c, f)?), inputs, &upstream)?;
        for (name, (a, b)) in ["x", "center", "factor"]
            .iter()
            .zip(fused.iter().zip(&oracle))
        {
            assert_eq!(a.dims(), b.dims(), "{name}");
            let err = gradient_error(a, b)?;
            assert!(err < 1e-10, "∂{name}: relative error {err:e}");
        }
    }
    Ok(())
}

#[test]
fn projected_fused_f32_gradients_match_autograd() -> TestResult {
    check_f32_gradients(projected_fused, &case(7, 65, 16, 17, 10.0), 107)
}

#[test]
fn projected_fused_reads_strided_and_offset_layouts() -> TestResult {
    let c = case(8, 12, 6, 5, 10.0);
    let expected = oracle_projected(&c.x, &c.center, &c.factor)?;
    // x as the transpose of its transpose (non-contiguous), centers as a narrow view with an
    // offset, factors transposed twice over the last two axes.
    let x = c.x.t()?.contiguous()?.t()?;
    assert!(!x.is_contiguous());
    let padded = Tensor::cat(&[&c.center, &c.center], 0)?;
    let center = padded.narrow(0, 5, 5)?;
    let factor = c.factor.transpose(1, 2)?.contiguous()?.transpose(1, 2)?;
    let fused = projected_fused(&x, &center, &factor)?;
    assert!(max_relative_error(&fused, &expected, 1e-3) < 1e-10);
    Ok(())
}

/// Inputs are checked once, at the public boundary (`ops`, the layer's forward); the fused
/// ops only guard that Candle hands them the shapes they were built for (an error, never a
/// slice panic) and refuse dtypes other than f32 and f64.
#[test]
fn inputs_are_checked_at_the_boundary_and_fused_ops_guard_their_build() -> TestResult {
    use crate::config::PrecisionConfig;
    let c = case(9, 4, 3, 2, 1.0);
    let p = c.factor.matmul(&c.factor.transpose(1, 2)?)?;
    let precision = Precision::from_precision_matrix(&p, PrecisionConfig::default())?;
    let auto = DistanceKernel::Auto;
    let mixed = crate::ops::mahalanobis_sq(&c.x, &c.center.to_dtype(DType::F32)?, &precision, auto);
    assert!(matches!(mixed, Err(GaussError::DType { .. })), "{mixed:?}");
    let narrow = c.x.narrow(1, 0, 2)?;
    let wrong = crate::ops::mahalanobis_sq(&narrow, &c.center, &precision, auto);
    assert!(matches!(wrong, Err(GaussError::Shape { .. })), "{wrong:?}");
    // Built for 5 rows, handed 4.
    let other = Sizes {
        batch: 5,
        ..sizes(&c.x, &c.center)?
    };
    let plan = FusedPlan::Projected(FactorMap::Identity);
    let err = distance_op::apply(other, &c.x, &c.center, &c.factor, plan).unwrap_err();
    assert!(err.to_string().contains("built for"), "{err}");
    let err =
        distance_op::apply(other, &c.x, &c.center, &c.center, FusedPlan::Diagonal).unwrap_err();
    assert!(err.to_string().contains("built for"), "{err}");
    let half = projected_fused(
        &c.x.to_dtype(DType::F16)?,
        &c.center.to_dtype(DType::F16)?,
        &c.factor.to_dtype(DType::F16)?,
    );
    let err = half.unwrap_err().to_string();
    assert!(err.contains("f32") && err.contains("f64"), "{err}");
    Ok(())
}

#[test]
fn empty_batch_gives_empty_output() -> TestResult {
    let c = case(15, 1, 4, 3, 1.0);
    let x = c.x.narrow(0, 0, 0)?;
    let m2 = projected_fused(&x, &c.center, &c.factor)?;
    assert_eq!(m2.dims(), [0, 3]);
    Ok(())
}

#[test]
fn cholesky_fused_matches_tensor_op_factor_forward_and_backward() -> TestResult {
    use crate::config::PositiveMap;
    for (exp_map, map) in [(false, PositiveMap::Softplus), (true, PositiveMap::Exp)] {
        let c = case(16, 45, 10, 14, 30.0);
        let mut rng = StdRng::seed_from_u64(116);
        // Raw values everywhere, also above the diagonal (which L ignores).
        let raw = normal(&mut rng, &[14, 10, 10], 0.7);
        let floor = 1e-3;
        let fused = |x: &Tensor, c: &Tensor, r: &Tensor| cholesky_fused(x, c, r, map, floor);
        let oracle = |x: &Tensor, c: &Tensor, r: &Tensor| -> crate::Result<Tensor> {
            Ok(oracle_projected(
                x,
                c,
                &cholesky_factor_oracle(r, exp_map, floor)?,
            )?)
        };
        let m2 = fused(&c.x, &c.center, &raw)?;
        let expected = oracle(&c.x, &c.center, &raw)?;
        assert!(max_relative_error(&m2, &expected, 1e-3) < 1e-10);
        let upstream = normal(&mut rng, &[45, 14], 1.0);
        let inputs = [&c.x, &c.center, &raw];
        let a = gradients(fused, inputs, &upstream)?;
        let b = gradients(oracle, inputs, &upstream)?;
        for (name, (a, b)) in ["x", "center", "raw"].iter().zip(a.iter().zip(&b)) {
            let err = gradient_error(a, b)?;
            assert!(
                err < 1e-10,
                "∂{name} (exp map {exp_map}): relative error {err:e}"
            );
        }
    }
    Ok(())
}

/// Data 1e4 from the origin (pixels, sensor readings), inputs near the centers: projecting
/// first (`F_zᵀ x − F_zᵀ c`, terms of about 3e4 cancelling to m2 ≈ 1) lost the portable f32
/// form 7.6e-4 of m2 (the fused op shifts by the centers' mean); from the differences it keeps
/// f32 rounding. The stacked form (lowrank's `U` part) shifts as the fused op.
/// Expected: the f64 oracle on the very f32 values.
#[test]
fn projected_tensor_op_forms_keep_their_digits_far_from_the_origin() -> TestResult {
    let c = case(21, 40, 6, 5, 1.0);
    let offset = 1e4;
    let (x, center, factor) = (
        (c.x + offset)?.to_dtype(DType::F32)?,
        (c.center + offset)?.to_dtype(DType::F32)?,
        c.factor.to_dtype(DType::F32)?,
    );
    // f64: the oracle of f32 values, on the CPU
    let as_f64 = |t: &Tensor| t.to_dtype(DType::F64);
    let expected = oracle_projected(&as_f64(&x)?, &as_f64(&center)?, &as_f64(&factor)?)?;
    for (name, got) in [
        (
            "portable",
            super::super::projected::portable(&x, &center, &factor)?,
        ),
        (
            "stacked",
            super::super::projected::stacked(&x, &center, &factor)?,
        ),
    ] {
        let err = max_relative_error(&got, &expected, 1.0);
        assert!(err < 1e-5, "{name}: relative error {err:e}");
    }
    Ok(())
}

/// One center 1e4 from the others, whose inputs sit near the origin: the portable form's
/// differences keep every neuron's digits (a shift by the centers' mean would move the near
/// neurons' terms 2000 away).
#[test]
fn projected_portable_keeps_every_neuron_when_one_center_is_far() -> TestResult {
    let c = case(22, 30, 4, 5, 1.0);
    let far = Tensor::new(&[[1e4f64, 0.0, 0.0, 0.0]], &Device::Cpu)?;
    let center = Tensor::cat(&[&c.center.narrow(0, 0, 4)?, &far], 0)?;
    let (x, center, factor) = (
        c.x.to_dtype(DType::F32)?,
        center.to_dtype(DType::F32)?,
        c.factor.to_dtype(DType::F32)?,
    );
    // f64: the oracle of f32 values, on the CPU
    let as_f64 = |t: &Tensor| t.to_dtype(DType::F64);
    let expected = oracle_projected(&as_f64(&x)?, &as_f64(&center)?, &as_f64(&factor)?)?;
    let got = super::super::projected::portable(&x, &center, &factor)?;
    let err = max_relative_error(&got, &expected, 1.0);
    assert!(err < 1e-5, "relative error {err:e}");
    Ok(())
}
