use super::*;

#[test]
fn expanded_matches_oracle_forward_and_backward_in_f64() -> TestResult {
    let c = case(11, 33, 8, 9, 100.0);
    let precision = precision_of(&c)?;
    let expanded = expanded_portable(&c.x, &c.center, &precision)?;
    let expected = oracle_projected(&c.x, &c.center, &c.factor)?;
    // Centers of norm 100 cost the expanded form digits even in f64 (floor 1 as above).
    assert!(max_relative_error(&expanded, &expected, 1.0) < 1e-8);

    let mut rng = StdRng::seed_from_u64(111);
    let upstream = normal(&mut rng, &[33, 9], 1.0);
    let small = case(12, 33, 8, 9, 2.0);
    let precision = precision_of(&small)?;
    let inputs = [&small.x, &small.center, &precision];
    let fast = gradients(expanded_portable, inputs, &upstream)?;
    let naive = |x: &Tensor, c: &Tensor, p: &Tensor| -> crate::Result<Tensor> {
        let diff = x.unsqueeze(1)?.broadcast_sub(&c.unsqueeze(0)?)?;
        let pd = diff
            .unsqueeze(2)?
            .broadcast_matmul(&p.unsqueeze(0)?)?
            .squeeze(2)?;
        Ok(pd.mul(&diff)?.sum(D::Minus1)?)
    };
    let oracle = gradients(naive, inputs, &upstream)?;
    for (name, (a, b)) in ["x", "center"].iter().zip(fast.iter().zip(&oracle)) {
        let err = gradient_error(a, b)?;
        assert!(err < 1e-10, "∂{name}: relative error {err:e}");
    }
    // ∂P: the expanded form sees only the symmetric part of P, so compare symmetrized.
    let sym = |t: &Tensor| t.add(&t.transpose(1, 2)?)?.affine(0.5, 0.0);
    let (a, b) = (sym(&fast[2])?, sym(&oracle[2])?);
    assert!(gradient_error(&a, &b)? < 1e-10);
    Ok(())
}

#[test]
fn expanded_conditioning_check_flags_far_centers_in_f32() -> TestResult {
    let near = case(13, 4, 8, 6, 1.0);
    let far = case(14, 4, 8, 6, 100.0);
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    assert!(expanded_is_accurate(
        &f32_of(&near.center)?,
        &f32_of(&precision_of(&near)?)?
    )?);
    assert!(!expanded_is_accurate(
        &f32_of(&far.center)?,
        &f32_of(&precision_of(&far)?)?
    )?);
    // f64 has about 9 more digits: the far case is fine there.
    assert!(expanded_is_accurate(&far.center, &precision_of(&far)?)?);
    // And where the check passes in f32, the f32 result is within 1e-5 (floor 1).
    let expanded = expanded_portable(
        &f32_of(&near.x)?,
        &f32_of(&near.center)?,
        &f32_of(&precision_of(&near)?)?,
    )?;
    let expected = oracle_projected(&near.x, &near.center, &near.factor)?;
    let err = max_relative_error(&expanded, &expected, 1.0);
    assert!(err < 1e-5, "relative error {err:e}");
    Ok(())
}

#[test]
fn expanded_fused_matches_oracle_in_f64() -> TestResult {
    // Sizes off every tile multiple; d = 40 makes the forward's row tiles shorter than 64, 70
    // neurons span two neuron blocks, 300 rows several chunks.
    for (seed, batch, dim, neurons) in [(21, 37, 7, 11), (22, 300, 40, 70), (23, 5, 1, 3)] {
        let c = case(seed, batch, dim, neurons, 2.0);
        let expected = oracle_projected(&c.x, &c.center, &c.factor)?;
        let from_matrix = expanded_fused(&c.x, &c.center, &precision_of(&c)?)?;
        let from_factor = expanded_fused_factor(&c.x, &c.center, &c.factor)?;
        for m2 in [from_matrix, from_factor] {
            assert_eq!(m2.dims(), [batch, neurons]);
            let err = max_relative_error(&m2, &expected, 1.0);
            assert!(
                err < 1e-10,
                "B={batch} d={dim} Z={neurons}: relative error {err:e}"
            );
        }
    }
    Ok(())
}

#[test]
fn expanded_fused_f32_within_1e5_where_the_check_passes() -> TestResult {
    for (seed, batch, dim, neurons, norm) in [
        (31, 90, 8, 20, 1.0),
        (32, 70, 16, 33, 2.0),
        (33, 50, 32, 9, 1.0),
    ] {
        let c = case(seed, batch, dim, neurons, norm);
        // Random triangular factors are ill-conditioned (κ grows with d); damp the
        // off-diagonal part so that P stays within the check's condition limit.
        let eye = Tensor::eye(dim, DType::F64, &Device::Cpu)?;
        let diagonal = c.factor.broadcast_mul(&eye)?;
        let factor = ((&c.factor - &diagonal)? * 0.1)?.add(&diagonal)?;
        let [x, center, factor] =
            [&c.x, &c.center, &factor].map(|t| t.to_dtype(DType::F32).expect("f32"));
        let precision = factor.matmul(&factor.transpose(1, 2)?)?;
        assert!(expanded_is_accurate(&center, &precision)?, "seed {seed}");
        let m2 = expanded_fused_factor(&x, &center, &factor)?;
        // f64: tests of the fused CPU kernels run on the CPU only
        // The f64 oracle on the very f32 values (floor 1: the unit width scale of g).
        let as64 = |t: &Tensor| t.to_dtype(DType::F64);
        let expected = oracle_projected(&as64(&x)?, &as64(&center)?, &as64(&factor)?)?;
        let err = max_relative_error(&m2, &expected, 1.0);
        assert!(err < 1e-5, "seed {seed}: relative error {err:e}");
    }
    Ok(())
}

/// Centers of norm 100 (spread far beyond the unit widths): the check sends `Auto` to the
/// projected form in f32; forced, the expanded form holds only the documented bound
/// (absolute error a few `eps·|c - c̄|²·‖P‖_∞`), not 1e-5; in f64 it stays within 1e-9.
#[test]
fn expanded_fused_far_centers_fall_back_and_keep_the_documented_bound() -> TestResult {
    use crate::config::{DistanceKernel, GaussLayerConfig};
    use crate::kernels::ResolvedKernel;
    use crate::precision::Precision;
    let far = case(41, 60, 12, 10, 100.0);
    let near = case(42, 60, 12, 10, 1.0);
    let config = GaussLayerConfig::default();
    for (c, expected) in [
        (&far, ResolvedKernel::ProjectedFused),
        (&near, ResolvedKernel::ExpandedFused),
    ] {
        let [x, center, factor] =
            [&c.x, &c.center, &c.factor].map(|t| t.to_dtype(DType::F32).expect("f32"));
        let precision = Precision::from_raw(factor, 12, &config)?;
        let kernel = resolve_kernel(&x, &center, &precision, DistanceKernel::Auto)?;
        assert_eq!(kernel, expected);
    }
    let [x, center, factor] =
        [&far.x, &far.center, &far.factor].map(|t| t.to_dtype(DType::F32).expect("f32"));
    let m2 = expanded_fused_factor(&x, &center, &factor)?;
    // f64: tests of the fused CPU kernels run on the CPU only
    let as64 = |t: &Tensor| t.to_dtype(DType::F64);
    let expected = oracle_projected(&as64(&x)?, &as64(&center)?, &as64(&factor)?)?;
    let scale = expanded_scale(&as64(&center)?, &precision_of(&far)?)?;
    // f64: tests of the fused CPU kernels run on the CPU only
    let abs_err = (m2.to_dtype(DType::F64)? - &expected)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert!(
        abs_err <= 16.0 * f32::EPSILON as f64 * scale,
        "abs error {abs_err:e} vs scale {scale:e}"
    );
    let m2 = expanded_fused_factor(&far.x, &far.center, &far.factor)?;
    let expected = oracle_projected(&far.x, &far.center, &far.factor)?;
    let err = max_relative_error(&m2, &expected, 1.0);
    assert!(err < 1e-9, "f64 relative error {err:e}");
    Ok(())
}

#[test]
fn expanded_fused_gradients_match_autograd() -> TestResult {
    use crate::config::PositiveMap;
    use crate::kernels::distance_op::{FusedDistance, FusedPlan};
    use crate::kernels::expanded::Source;
    use crate::kernels::factors::FactorMap;
    let naive = |x: &Tensor, c: &Tensor, p: &Tensor| -> crate::Result<Tensor> {
        let diff = x.unsqueeze(1)?.broadcast_sub(&c.unsqueeze(0)?)?;
        let pd = diff
            .unsqueeze(2)?
            .broadcast_matmul(&p.unsqueeze(0)?)?
            .squeeze(2)?;
        Ok(pd.mul(&diff)?.sum(D::Minus1)?)
    };
    let check = |fast: &[Tensor], slow: &[Tensor], what: &str| {
        for (name, (a, b)) in ["x", "center", "precision"]
            .iter()
            .zip(fast.iter().zip(slow))
        {
            let err = gradient_error(a, b)?;
            assert!(err < 1e-10, "{what} ∂{name}: relative error {err:e}");
        }
        Ok::<(), candle_core::Error>(())
    };
    for (seed, batch, dim, neurons) in [(51, 70, 9, 30), (52, 300, 5, 3), (53, 3, 30, 2)] {
        let c = case(seed, batch, dim, neurons, 2.0);
        let mut rng = StdRng::seed_from_u64(seed + 100);
        let upstream = normal(&mut rng, &[batch, neurons], 1.0);
        // Matrix input: the op uses its symmetric part, so compare symmetrized ∂P.
        let p = precision_of(&c)?;
        let inputs = [&c.x, &c.center, &p];
        let mut fast = gradients(expanded_fused, inputs, &upstream)?;
        let mut slow = gradients(naive, inputs, &upstream)?;
        let sym = |t: &Tensor| t.add(&t.transpose(1, 2)?)?.affine(0.5, 0.0);
        fast[2] = sym(&fast[2])?;
        slow[2] = sym(&slow[2])?;
        check(&fast, &slow, "matrix")?;
        let inputs = [&c.x, &c.center, &c.factor];
        let fast = gradients(expanded_fused_factor, inputs, &upstream)?;
        let slow = gradients(|x, c, f| Ok(oracle_projected(x, c, f)?), inputs, &upstream)?;
        check(&fast, &slow, "factor")?;
        // Raw Cholesky parameter (map inside the op), expanded and projected forward.
        let raw = normal(&mut rng, &[neurons, dim, dim], 0.4);
        let map = FactorMap::Cholesky {
            positive_map: PositiveMap::Softplus,
            floor: 1e-3,
        };
        let slow = gradients(
            |x, c, r| {
                Ok(oracle_projected(
                    x,
                    c,
                    &cholesky_factor_oracle(r, false, 1e-3)?,
                )?)
            },
            [&c.x, &c.center, &raw],
            &upstream,
        )?;
        for projected_forward in [false, true] {
            let plan = FusedPlan::Expanded {
                source: Source::Factor(map),
                projected_forward,
            };
            let fast = gradients(
                |x, c, r| {
                    let sizes = super::sizes(x, c)?;
                    Ok(x.apply_op3(c, r, FusedDistance { plan, sizes })?)
                },
                [&c.x, &c.center, &raw],
                &upstream,
            )?;
            check(&fast, &slow, "raw cholesky")?;
        }
    }
    Ok(())
}

#[test]
fn expanded_fused_f32_gradients_match_autograd() -> TestResult {
    check_f32_gradients(expanded_fused_factor, &case(61, 65, 16, 17, 1.0), 161)
}

/// Indefinite (and not symmetric) matrices `A` for two neurons, inputs on both sides of the
/// cone where `(x − c)ᵀ A (x − c) = 0`, an upstream gradient and the layer's weight and bias.
fn indefinite_case() -> candle_core::Result<[Tensor; 6]> {
    let mut rng = StdRng::seed_from_u64(77);
    let x = normal(&mut rng, &[9, 3], 1.0);
    let center = normal(&mut rng, &[2, 3], 0.5);
    let a = Tensor::new(
        &[
            [[1.0f64, 0.4, 0.0], [-0.2, -0.8, 0.1], [0.0, 0.3, 0.5]],
            [[-1.0, 0.0, 0.2], [0.0, 0.6, 0.0], [0.2, 0.0, 0.9]],
        ],
        &Device::Cpu,
    )?;
    let up = normal(&mut rng, &[9, 2], 1.0);
    let weight = normal(&mut rng, &[2, 3], 1.0);
    let bias = normal(&mut rng, &[2], 1.0);
    Ok([x, center, a, up, weight, bias])
}

/// Where a precision matrix that is not positive definite makes `m2` negative, every form
/// clamps it to 0, so its gradient there is 0 (the naive form's `relu`, and central
/// differences: `m2` stays 0 under a small step); the fused expanded backward differentiated
/// the negative value instead, in the distance op and in the layer op.
#[test]
fn expanded_fused_passes_no_gradient_through_a_clamped_negative_m2() -> TestResult {
    let [x, center, a, up, weight, bias] = indefinite_case()?;
    let naive = |x: &Tensor, c: &Tensor, a: &Tensor| -> crate::Result<Tensor> {
        let sym = ((a + a.transpose(1, 2)?)? * 0.5)?;
        super::super::naive::portable(x, c, &sym)
    };
    let m2 = naive(&x, &center, &a)?;
    // f64: a CPU test
    let values = m2.flatten_all()?.to_vec1::<f64>()?;
    let clamped = values.iter().filter(|&&v| v == 0.0).count();
    assert!(clamped >= 3 && clamped + 3 <= values.len(), "{values:?}");
    let inputs = [&x, &center, &a];
    let fused = gradients(expanded_fused, inputs, &up)?;
    let oracle = gradients(naive, inputs, &up)?;
    for (name, (f, o)) in ["x", "center", "matrix"]
        .iter()
        .zip(fused.iter().zip(&oracle))
    {
        let err = gradient_error(f, o)?;
        assert!(err < 1e-12, "distance op ∂{name}: relative error {err:e}");
    }
    // Central differences of the fused forward itself, in every coordinate of x.
    // f64: a CPU test
    let mut xv = x.flatten_all()?.to_vec1::<f64>()?;
    // f64: a CPU test
    let up_v = up.flatten_all()?.to_vec1::<f64>()?;
    // f64: a CPU test
    let grad_x = fused[0].flatten_all()?.to_vec1::<f64>()?;
    let loss = |xv: &[f64]| -> crate::Result<f64> {
        let x = Tensor::from_slice(xv, (9, 3), &Device::Cpu)?;
        // f64: a CPU test
        let m2 = expanded_fused(&x, &center, &a)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Ok(m2.iter().zip(&up_v).map(|(m, u)| m * u).sum())
    };
    let h = 1e-6;
    for k in 0..xv.len() {
        let v = xv[k];
        xv[k] = v + h;
        let plus = loss(&xv)?;
        xv[k] = v - h;
        let minus = loss(&xv)?;
        xv[k] = v;
        let fd = (plus - minus) / (2.0 * h);
        assert!(
            (fd - grad_x[k]).abs() < 1e-6,
            "∂x[{k}]: {} against {fd}",
            grad_x[k]
        );
    }
    // The fused layer op (its backward sees g = 1 where m2 was clamped).
    let plan = FusedPlan::Expanded {
        source: Source::Matrix,
        projected_forward: false,
    };
    for tanh in [false, true] {
        let run = |fused: bool| -> std::result::Result<Vec<Tensor>, Box<dyn std::error::Error>> {
            let vars = [&x, &center, &a, &weight, &bias]
                .iter()
                .map(|t| Var::from_tensor(t))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let [x, c, a, w, b] = [0, 1, 2, 3, 4].map(|i| vars[i].as_tensor());
            let (y, g) = if fused {
                layer_op::forward(sizes(x, c)?, x, c, w, Some(b), a, plan, tanh)?
            } else {
                let g = (naive(x, c, a)? * -0.5)?.exp()?;
                let mut lin = x.matmul(&w.t()?)?.broadcast_add(&b.unsqueeze(0)?)?;
                if tanh {
                    lin = lin.tanh()?;
                }
                ((lin * &g)?, g)
            };
            let loss = (y.mul(&up)?.sum_all()? + g.mul(&up)?.sum_all()?)?;
            let grads = loss.backward()?;
            Ok(vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).cloned().ok_or("missing gradient"))
                .collect::<std::result::Result<Vec<_>, _>>()?)
        };
        let names = ["x", "center", "matrix", "weight", "bias"];
        for (name, (f, o)) in names.iter().zip(run(true)?.iter().zip(&run(false)?)) {
            let err = gradient_error(f, o)?;
            assert!(
                err < 1e-12,
                "layer op (tanh {tanh}) ∂{name}: relative error {err:e}"
            );
        }
    }
    Ok(())
}

/// f32 inputs of ±1e20 overflow the products of the tensor-op forms that cancel (∞ − ∞): `m2`
/// is NaN there, as the fused forms give, never the 0 that `relu` made of it (g = 1: full
/// confidence far from the data). A negative `m2` (a precision that is not positive
/// definite) still clamps to 0, and the other row is untouched.
#[test]
fn tensor_op_clamps_keep_an_overflowed_m2_nan() -> TestResult {
    let x = Tensor::new(&[[1e20f32, 1e20], [0.5, 0.0]], &Device::Cpu)?;
    let center = Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?;
    // Neuron 0: positive definite with a negative off-diagonal; neuron 1: eigenvalues 3, −1.
    let precision = Tensor::new(
        &[[[1.0f32, -0.5], [-0.5, 1.0]], [[1.0, 2.0], [2.0, 1.0]]],
        &Device::Cpu,
    )?;
    for (name, m2) in [
        (
            "naive",
            super::super::naive::portable(&x, &center, &precision)?,
        ),
        (
            "expanded",
            super::super::expanded::portable(&x, &center, &precision)?,
        ),
    ] {
        let m2 = m2.to_vec2::<f32>()?;
        // The true m2 of row 0 are 1e40 and 6e40: NaN or ∞ in f32, never a finite value.
        assert!(
            m2[0].iter().all(|v| v.is_nan() || *v == f32::INFINITY),
            "{name}: {m2:?}"
        );
        // Row 1, (0.5, 0): 0.25 for neuron 0, 0.25 for neuron 1 (its x sits on a positive
        // direction's component), to rounding.
        assert!(
            (m2[1][0] - 0.25).abs() < 1e-6 && (m2[1][1] - 0.25).abs() < 1e-6,
            "{name}: {m2:?}"
        );
    }
    // A negative m2 clamps to 0: x = (1, −1) against neuron 1 gives 1 − 4 + 1 = −2.
    let x = Tensor::new(&[[1.0f32, -1.0]], &Device::Cpu)?;
    for m2 in [
        super::super::naive::portable(&x, &center, &precision)?,
        super::super::expanded::portable(&x, &center, &precision)?,
    ] {
        assert_eq!(m2.to_vec2::<f32>()?[0][1], 0.0);
    }
    Ok(())
}
