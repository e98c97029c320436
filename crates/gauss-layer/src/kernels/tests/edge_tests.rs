use super::*;
use crate::config::PrecisionConfig;

/// Every fused plan on many edge shapes, f64, against the (B, Z, d) oracle: values and
/// gradients (x, center, operand).
#[test]
fn fused_plans_match_the_oracle_on_edge_shapes() -> TestResult {
    let plans: Vec<(&str, FusedPlan)> = vec![
        ("diag", FusedPlan::Diagonal),
        ("proj-id", FusedPlan::Projected(FactorMap::Identity)),
        (
            "proj-chol",
            FusedPlan::Projected(FactorMap::Cholesky {
                positive_map: PositiveMap::Softplus,
                floor: 1e-3,
            }),
        ),
        (
            "exp-mat",
            FusedPlan::Expanded {
                source: Source::Matrix,
                projected_forward: false,
            },
        ),
        (
            "exp-id",
            FusedPlan::Expanded {
                source: Source::Factor(FactorMap::Identity),
                projected_forward: false,
            },
        ),
        (
            "exp-chol",
            FusedPlan::Expanded {
                source: Source::Factor(FactorMap::Cholesky {
                    positive_map: PositiveMap::Exp,
                    floor: 0.0,
                }),
                projected_forward: false,
            },
        ),
        (
            "exp-chol-pf",
            FusedPlan::Expanded {
                source: Source::Factor(FactorMap::Cholesky {
                    positive_map: PositiveMap::Softplus,
                    floor: 0.0,
                }),
                projected_forward: true,
            },
        ),
    ];
    let mut seed = 1000;
    for &batch in &[0usize, 1, 2, 7, 9, 63, 64, 65, 257, 300] {
        for &dim in &[1usize, 2, 3, 8, 9, 17] {
            for &neurons in &[1usize, 2, 5] {
                seed += 1;
                let c = case(seed, batch.max(1), dim, neurons, 2.0);
                let x = c.x.narrow(0, 0, batch)?;
                let mut rng = StdRng::seed_from_u64(seed + 7);
                let raw = normal(&mut rng, &[neurons, dim, dim], 0.5);
                let diag = normal(&mut rng, &[neurons, dim], 1.0).exp()?;
                let up = normal(&mut rng, &[batch, neurons], 1.0);
                for (name, plan) in &plans {
                    let plan = *plan;
                    let operand = match plan {
                        FusedPlan::Diagonal => diag.clone(),
                        FusedPlan::Projected(FactorMap::Identity)
                        | FusedPlan::Expanded {
                            source: Source::Factor(FactorMap::Identity),
                            ..
                        } => c.factor.clone(),
                        FusedPlan::Expanded {
                            source: Source::Matrix,
                            ..
                        } => precision_of(&c)?,
                        _ => raw.clone(),
                    };
                    let oracle = |x: &Tensor, ce: &Tensor, op: &Tensor| -> crate::Result<Tensor> {
                        Ok(match plan {
                            FusedPlan::Diagonal => oracle_diagonal(x, ce, op)?,
                            FusedPlan::Projected(FactorMap::Identity)
                            | FusedPlan::Expanded {
                                source: Source::Factor(FactorMap::Identity),
                                ..
                            } => oracle_projected(x, ce, op)?,
                            FusedPlan::Expanded {
                                source: Source::Matrix,
                                ..
                            } => {
                                let sym = ((op + op.transpose(1, 2)?)? * 0.5)?;
                                super::super::naive::portable(x, ce, &sym)?
                            }
                            FusedPlan::Projected(FactorMap::Cholesky {
                                positive_map,
                                floor,
                            })
                            | FusedPlan::Expanded {
                                source:
                                    Source::Factor(FactorMap::Cholesky {
                                        positive_map,
                                        floor,
                                    }),
                                ..
                            } => oracle_projected(
                                x,
                                ce,
                                &cholesky_factor_oracle(
                                    op,
                                    positive_map == PositiveMap::Exp,
                                    floor,
                                )?,
                            )?,
                        })
                    };
                    let fused = |x: &Tensor, ce: &Tensor, op: &Tensor| {
                        distance_op::apply(sizes(x, ce)?, x, ce, op, plan)
                    };
                    let m2 = fused(&x, &c.center, &operand)?;
                    let expected = oracle(&x, &c.center, &operand)?;
                    assert_eq!(m2.dims(), [batch, neurons]);
                    if batch > 0 {
                        let err = max_relative_error(&m2, &expected, 1e-2);
                        assert!(err < 1e-9, "{name} B={batch} d={dim} Z={neurons}: {err:e}");
                    }
                    let inputs = [&x, &c.center, &operand];
                    if batch == 0 {
                        continue;
                    }
                    let a = gradients(fused, inputs, &up)?;
                    let b = gradients(oracle, inputs, &up)?;
                    for (gname, (a, b)) in ["x", "c", "op"].iter().zip(a.iter().zip(&b)) {
                        assert_eq!(a.dims(), b.dims(), "{name} {gname}");
                        if a.elem_count() == 0 {
                            continue;
                        }
                        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
                        let err = max_relative_error(a, b, scale);
                        assert!(
                            err < 1e-9,
                            "{name} ∂{gname} B={batch} d={dim} Z={neurons}: {err:e}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// The non-finite-row rule through the resolver and `run_layer` for every parameterization,
/// route, kernel and dtype: a NaN or ±∞ in one input row makes that row of `m2`, `g` and `y`
/// NaN and leaves the other rows as they were.
#[test]
fn non_finite_rows_give_nan_in_that_row_only_everywhere() -> TestResult {
    use crate::config::{GaussLayerConfig, Parameterization};
    use crate::kernels::layer_op::Linear;
    let dim = 3;
    let neurons = 4;
    for parameterization in Parameterization::ALL {
        for portable in [false, true] {
            for kernel in [
                DistanceKernel::Auto,
                DistanceKernel::Projected,
                DistanceKernel::Expanded,
                DistanceKernel::Naive,
            ] {
                for &batch in &[1usize, 5, 70] {
                    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                        for dtype in [DType::F64, DType::F32] {
                            let config = GaussLayerConfig {
                                precision: PrecisionConfig {
                                    parameterization,
                                    portable,
                                    ..Default::default()
                                },
                                ..Default::default()
                            };
                            let c = case(5, batch, dim, neurons, 1.0);
                            let mut rng = StdRng::seed_from_u64(9);
                            let raw_shape = Precision::raw_shape(parameterization, neurons, dim);
                            let mut raw = normal(&mut rng, &raw_shape, 0.3);
                            if parameterization == Parameterization::Direct {
                                raw = precision_of(&c)?;
                            }
                            let weight = normal(&mut rng, &[neurons, dim], 1.0).to_dtype(dtype)?;
                            let bias = normal(&mut rng, &[neurons], 1.0).to_dtype(dtype)?;
                            let raw = raw.to_dtype(dtype)?;
                            let center = c.center.to_dtype(dtype)?;
                            let row = batch / 2;
                            let mut xv = c.x.to_vec2::<f64>()?;
                            xv[row][dim - 1] = bad;
                            let xbad = Tensor::new(xv, &Device::Cpu)?.to_dtype(dtype)?;
                            let x = c.x.to_dtype(dtype)?;
                            let precision = Precision::from_raw(raw.clone(), dim, &config)?;
                            let Ok(resolved) = super::super::resolve(
                                sizes(&x, &center)?,
                                &x,
                                &center,
                                &precision,
                                kernel,
                                portable,
                            ) else {
                                continue;
                            };
                            let what = format!(
                                "{parameterization} portable {portable} {kernel:?} {:?} B={batch} {bad} {dtype:?}",
                                resolved.kernel
                            );
                            let linear = Linear {
                                weight: &weight,
                                bias: Some(bias.clone()),
                                tanh: true,
                            };
                            for with_linear in [false, true] {
                                let l = with_linear.then_some(&linear);
                                let (y0, g0) = resolved.run_layer(&x, &center, l)?;
                                let (y1, g1) = resolved.run_layer(&xbad, &center, l)?;
                                let m0 = super::super::run(&x, &center, &resolved)?;
                                let m1 = super::super::run(&xbad, &center, &resolved)?;
                                for (name, a, b) in [("y", y0, y1), ("g", g0, g1), ("m2", m0, m1)] {
                                    // f64: CPU test
                                    let a = a.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                                    // f64: CPU test
                                    let b = b.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                                    for r in 0..batch {
                                        for z in 0..neurons {
                                            if r == row {
                                                assert!(
                                                    b[r][z].is_nan(),
                                                    "{what} {name}: row {r} {:?}",
                                                    b[r]
                                                );
                                            } else {
                                                assert!(
                                                    (a[r][z] - b[r][z]).abs()
                                                        <= 1e-5 * a[r][z].abs().max(1.0),
                                                    "{what} {name}: {} vs {}",
                                                    a[r][z],
                                                    b[r][z]
                                                );
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The fused layer op on edge shapes (B around the chunk and tile sizes, d = 1, Z = 1),
/// tanh and bias on and off, against the layer composed from tensor ops in f64.
#[test]
fn fused_layer_op_matches_composed_layer_on_edge_shapes() -> TestResult {
    let plans = [
        FusedPlan::Projected(FactorMap::Cholesky {
            positive_map: PositiveMap::Softplus,
            floor: 1e-3,
        }),
        FusedPlan::Expanded {
            source: Source::Factor(FactorMap::Cholesky {
                positive_map: PositiveMap::Softplus,
                floor: 1e-3,
            }),
            projected_forward: false,
        },
        FusedPlan::Expanded {
            source: Source::Factor(FactorMap::Cholesky {
                positive_map: PositiveMap::Softplus,
                floor: 1e-3,
            }),
            projected_forward: true,
        },
    ];
    let mut seed = 5000;
    for &batch in &[1usize, 2, 8, 9, 65, 300] {
        for &dim in &[1usize, 2, 9] {
            for &neurons in &[1usize, 3, 9] {
                for tanh in [false, true] {
                    for with_bias in [false, true] {
                        for plan in plans {
                            seed += 1;
                            let c = case(seed, batch, dim, neurons, 1.0);
                            let mut rng = StdRng::seed_from_u64(seed);
                            let raw = normal(&mut rng, &[neurons, dim, dim], 0.4);
                            let weight = normal(&mut rng, &[neurons, dim], 0.5);
                            let bias = normal(&mut rng, &[neurons], 0.5);
                            let up_y = normal(&mut rng, &[batch, neurons], 1.0);
                            let up_g = normal(&mut rng, &[batch, neurons], 1.0);
                            let tensors = [&c.x, &c.center, &raw, &weight, &bias];
                            let run = |fused: bool| -> std::result::Result<
                                Vec<Tensor>,
                                Box<dyn std::error::Error>,
                            > {
                                let vars = tensors
                                    .iter()
                                    .map(|t| Var::from_tensor(t))
                                    .collect::<candle_core::Result<Vec<_>>>()?;
                                let [x, center, raw, weight, bias] =
                                    [0, 1, 2, 3, 4].map(|i| vars[i].as_tensor());
                                let b = with_bias.then_some(bias);
                                let (y, g) = if fused {
                                    layer_op::forward(
                                        sizes(x, center)?,
                                        x,
                                        center,
                                        weight,
                                        b,
                                        raw,
                                        plan,
                                        tanh,
                                    )?
                                } else {
                                    let l = cholesky_factor_oracle(raw, false, 1e-3)?;
                                    let m2 = oracle_projected(x, center, &l)?;
                                    let g = (m2 * -0.5)?.exp()?;
                                    let mut lin = x.matmul(&weight.t()?)?;
                                    if let Some(b) = b {
                                        lin = lin.broadcast_add(&b.unsqueeze(0)?)?;
                                    }
                                    if tanh {
                                        lin = lin.tanh()?;
                                    }
                                    ((lin * &g)?, g)
                                };
                                let loss = (y.mul(&up_y)?.sum_all()? + g.mul(&up_g)?.sum_all()?)?;
                                let grads = loss.backward()?;
                                let mut out = vec![y, g];
                                for (i, v) in vars.iter().enumerate() {
                                    if i == 4 && !with_bias {
                                        continue;
                                    }
                                    out.push(grads.get(v.as_tensor()).cloned().ok_or("missing")?);
                                }
                                Ok(out)
                            };
                            let a = run(true)?;
                            let b = run(false)?;
                            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                                let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
                                let err = max_relative_error(a, b, scale);
                                assert!(err < 1e-9, "{plan:?} B={batch} d={dim} Z={neurons} tanh {tanh} bias {with_bias}: output {i} error {err:e}");
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Transposed and stride-0 (broadcast) inputs give the same bits as contiguous ones.
#[test]
fn strided_and_broadcast_inputs_give_the_same_bits() -> TestResult {
    let plans = [
        FusedPlan::Diagonal,
        FusedPlan::Projected(FactorMap::Identity),
        FusedPlan::Expanded {
            source: Source::Matrix,
            projected_forward: false,
        },
        FusedPlan::Expanded {
            source: Source::Factor(FactorMap::Cholesky {
                positive_map: PositiveMap::Exp,
                floor: 0.0,
            }),
            projected_forward: false,
        },
    ];
    for plan in plans {
        for dtype in [DType::F64, DType::F32] {
            let (batch, dim, neurons) = (11, 5, 3);
            let c = case(3, batch, dim, neurons, 1.0);
            let mut rng = StdRng::seed_from_u64(3);
            let operand = match plan {
                FusedPlan::Diagonal => normal(&mut rng, &[neurons, dim], 1.0).exp()?,
                FusedPlan::Expanded {
                    source: Source::Matrix,
                    ..
                } => precision_of(&c)?,
                _ => c.factor.clone(),
            }
            .to_dtype(dtype)?;
            let x = c.x.to_dtype(dtype)?;
            let one = c.center.narrow(0, 1, 1)?.to_dtype(dtype)?;
            let center = one.broadcast_as((neurons, dim))?;
            let xt = x.t()?.contiguous()?.t()?;
            let opt = if operand.rank() == 3 {
                operand.transpose(1, 2)?.contiguous()?.transpose(1, 2)?
            } else {
                operand.t()?.contiguous()?.t()?
            };
            let a = distance_op::apply(
                sizes(&x, &center)?,
                &x,
                &center.contiguous()?,
                &operand,
                plan,
            )?;
            let b = distance_op::apply(sizes(&x, &center)?, &xt, &center, &opt, plan)?;
            assert_eq!(max_relative_error(&a, &b, 1e-3), 0.0, "{plan:?}");
            if plan != FusedPlan::Diagonal {
                let w = normal(&mut rng, &[neurons, dim], 1.0).to_dtype(dtype)?;
                let bias = normal(&mut rng, &[neurons], 1.0).to_dtype(dtype)?;
                let (ya, ga) = layer_op::forward(
                    sizes(&x, &center)?,
                    &x,
                    &center.contiguous()?,
                    &w,
                    Some(&bias),
                    &operand,
                    plan,
                    true,
                )?;
                let (yb, gb) = layer_op::forward(
                    sizes(&x, &center)?,
                    &xt,
                    &center,
                    &w.t()?.contiguous()?.t()?,
                    Some(&bias),
                    &opt,
                    plan,
                    true,
                )?;
                assert_eq!(max_relative_error(&ya, &yb, 1e-3), 0.0);
                assert_eq!(max_relative_error(&ga, &gb, 1e-3), 0.0);
            }
        }
    }
    Ok(())
}

/// Every fused plan in f32 against itself in f64 on the same values: values and gradients
/// within what f32 explains.
#[test]
fn fused_plans_in_f32_agree_with_f64() -> TestResult {
    let plans = [
        FusedPlan::Diagonal,
        FusedPlan::Projected(FactorMap::Identity),
        FusedPlan::Expanded {
            source: Source::Matrix,
            projected_forward: false,
        },
        FusedPlan::Expanded {
            source: Source::Factor(FactorMap::Identity),
            projected_forward: false,
        },
        FusedPlan::Expanded {
            source: Source::Factor(FactorMap::Identity),
            projected_forward: true,
        },
    ];
    let mut seed = 9000;
    for &batch in &[1usize, 9, 65, 300] {
        for &dim in &[1usize, 3, 9, 40] {
            for &neurons in &[1usize, 5] {
                for plan in plans {
                    seed += 1;
                    let c = case(seed, batch, dim, neurons, 1.0);
                    let mut rng = StdRng::seed_from_u64(seed);
                    let operand = match plan {
                        FusedPlan::Diagonal => normal(&mut rng, &[neurons, dim], 1.0).exp()?,
                        FusedPlan::Expanded {
                            source: Source::Matrix,
                            ..
                        } => precision_of(&c)?,
                        _ => c.factor.clone(),
                    };
                    let up = normal(&mut rng, &[batch, neurons], 1.0);
                    let f32s = [&c.x, &c.center, &operand, &up]
                        .map(|t| t.to_dtype(DType::F32))
                        .into_iter()
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    // f64: CPU test
                    let f64s = f32s
                        .iter()
                        // f64: CPU test
                        .map(|t| t.to_dtype(DType::F64))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    let fused = |x: &Tensor, ce: &Tensor, op: &Tensor| {
                        distance_op::apply(sizes(x, ce)?, x, ce, op, plan)
                    };
                    let a = gradients(fused, [&f32s[0], &f32s[1], &f32s[2]], &f32s[3])?;
                    let b = gradients(fused, [&f64s[0], &f64s[1], &f64s[2]], &f64s[3])?;
                    let ma = fused(&f32s[0], &f32s[1], &f32s[2])?;
                    let mb = fused(&f64s[0], &f64s[1], &f64s[2])?;
                    let err = max_relative_error(&ma, &mb, 1.0);
                    assert!(
                        err < 1e-4,
                        "{plan:?} B={batch} d={dim} Z={neurons} m2 {err:e}"
                    );
                    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                        let err = gradient_error(a, b)?;
                        assert!(
                            err < 1e-4,
                            "{plan:?} B={batch} d={dim} Z={neurons} grad {i} {err:e}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Forced kernels (and `Auto`) for every parameterization, with and without a width floor, on
/// both routes and small edge shapes, against the naive form: values and gradients.
#[test]
fn forced_kernels_agree_with_naive_on_edge_shapes() -> TestResult {
    use crate::config::{GaussLayerConfig, Parameterization};
    for &(batch, dim, neurons) in &[(1usize, 1usize, 1usize), (23, 5, 7), (4, 3, 2), (40, 4, 3)] {
        for parameterization in Parameterization::ALL {
            for width_floor in [None, Some(0.5)] {
                if width_floor.is_some()
                    && matches!(parameterization, Parameterization::LowRank { .. })
                {
                    continue;
                }
                if matches!(parameterization, Parameterization::LowRank { rank } if rank > dim) {
                    continue;
                }
                for portable in [false, true] {
                    for kernel in [
                        DistanceKernel::Projected,
                        DistanceKernel::Expanded,
                        DistanceKernel::Auto,
                    ] {
                        let config = GaussLayerConfig {
                            precision: PrecisionConfig {
                                parameterization,
                                width_floor,
                                portable,
                                ..Default::default()
                            },
                            ..Default::default()
                        };
                        let c = case(17, batch, dim, neurons, 1.0);
                        let mut rng = StdRng::seed_from_u64(117);
                        let raw_shape = Precision::raw_shape(parameterization, neurons, dim);
                        let mut raw = normal(&mut rng, &raw_shape, 0.3);
                        if parameterization == Parameterization::Direct {
                            raw = precision_of(&c)?;
                        }
                        let upstream = normal(&mut rng, &[batch, neurons], 1.0);
                        let precision = Precision::from_raw(raw.clone(), dim, &config)?;
                        if super::super::resolve(
                            sizes(&c.x, &c.center)?,
                            &c.x,
                            &c.center,
                            &precision,
                            kernel,
                            portable,
                        )
                        .is_err()
                        {
                            continue;
                        }
                        let run = |kernel: DistanceKernel| {
                            gradients(
                                |x, center, raw| {
                                    let precision = Precision::from_raw(raw.clone(), dim, &config)?;
                                    mahalanobis_sq(x, center, &precision, kernel, portable)
                                },
                                [&c.x, &c.center, &raw],
                                &upstream,
                            )
                        };
                        let what = format!("{parameterization} {width_floor:?} portable {portable} {kernel:?} B={batch} d={dim} Z={neurons}");
                        let a = mahalanobis_sq(&c.x, &c.center, &precision, kernel, portable)?;
                        let b = mahalanobis_sq(
                            &c.x,
                            &c.center,
                            &precision,
                            DistanceKernel::Naive,
                            portable,
                        )?;
                        let err = max_relative_error(&a, &b, 1.0);
                        assert!(err < 1e-9, "{what}: m2 {err:e}");
                        for (name, (a, b)) in ["x", "c", "raw"]
                            .iter()
                            .zip(run(kernel)?.iter().zip(&run(DistanceKernel::Naive)?))
                        {
                            let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
                            let err = max_relative_error(a, b, scale);
                            assert!(err < 1e-8, "{what}: ∂{name} {err:e}");
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
