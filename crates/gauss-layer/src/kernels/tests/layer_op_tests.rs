use super::*;
use crate::config::PrecisionConfig;

/// The fused layer op against the layer composed from tensor ops (naive distances), for
/// cholesky (raw fed to the op), cholesky with a width floor and expm (factor fed to the op)
/// and direct (the matrix), with and without a bias: outputs and gradients to every input.
#[test]
fn fused_layer_matches_composed_layer() -> TestResult {
    use crate::config::{DistanceKernel, GaussLayerConfig, Parameterization};
    use crate::precision::Precision;
    let (batch, dim, neurons) = (19, 6, 9);
    // Auto takes the expanded form here (centers of norm 2); the forced kernels cover the
    // projected form and the expanded form from the raw Cholesky parameter.
    let cases = [
        (Parameterization::Cholesky, None, true, DistanceKernel::Auto),
        (
            Parameterization::Cholesky,
            None,
            false,
            DistanceKernel::Auto,
        ),
        (
            Parameterization::Cholesky,
            None,
            true,
            DistanceKernel::Projected,
        ),
        (
            Parameterization::Cholesky,
            None,
            true,
            DistanceKernel::Expanded,
        ),
        (
            Parameterization::Cholesky,
            Some(0.7),
            true,
            DistanceKernel::Auto,
        ),
        (
            Parameterization::Cholesky,
            Some(0.7),
            true,
            DistanceKernel::Projected,
        ),
        (Parameterization::Expm, None, true, DistanceKernel::Auto),
        (Parameterization::Direct, None, true, DistanceKernel::Auto),
    ];
    for (parameterization, width_floor, with_bias, kernel) in cases {
        let config = GaussLayerConfig {
            precision: PrecisionConfig {
                parameterization,
                width_floor,
                ..Default::default()
            },
            ..Default::default()
        };
        let c = case(18, batch, dim, neurons, 2.0);
        let mut rng = StdRng::seed_from_u64(118);
        let raw_shape = Precision::raw_shape(parameterization, neurons, dim);
        let mut raw = normal(&mut rng, &raw_shape, 0.3);
        if parameterization == Parameterization::Direct {
            raw = precision_of(&c)?;
        }
        let weight = normal(&mut rng, &[neurons, dim], 1.0);
        let bias = normal(&mut rng, &[neurons], 1.0);
        let up_y = normal(&mut rng, &[batch, neurons], 1.0);
        let up_g = normal(&mut rng, &[batch, neurons], 1.0);
        let tensors = [&c.x, &c.center, &raw, &weight, &bias];
        let run = |fused: bool| -> std::result::Result<Vec<Tensor>, Box<dyn std::error::Error>> {
            let vars = tensors
                .iter()
                .map(|t| Var::from_tensor(t))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let [x, center, raw, weight, bias] = [0, 1, 2, 3, 4].map(|i| vars[i].as_tensor());
            let precision = Precision::from_raw(raw.clone(), dim, &config)?;
            let bias = with_bias.then_some(bias);
            let (y, g) = if fused {
                layer_fused(x, center, weight, bias, &precision, kernel)?
                    .ok_or("fused path expected")?
            } else {
                let m2 = mahalanobis_sq(x, center, &precision, DistanceKernel::Naive, false)?;
                let g = (m2 * -0.5)?.exp()?;
                let mut linear = x.matmul(&weight.t()?)?;
                if let Some(bias) = bias {
                    linear = linear.broadcast_add(&bias.unsqueeze(0)?)?;
                }
                ((linear * &g)?, g)
            };
            let loss = (y.mul(&up_y)?.sum_all()? + g.mul(&up_g)?.sum_all()?)?;
            let grads = loss.backward()?;
            let mut out = vec![y, g];
            for (i, v) in vars.iter().enumerate() {
                if i == 4 && !with_bias {
                    continue;
                }
                out.push(
                    grads
                        .get(v.as_tensor())
                        .cloned()
                        .ok_or("missing gradient")?,
                );
            }
            Ok(out)
        };
        let fused = run(true)?;
        let composed = run(false)?;
        let names = ["y", "g", "∂x", "∂center", "∂raw", "∂weight", "∂bias"];
        for (name, (a, b)) in names.iter().zip(fused.iter().zip(&composed)) {
            let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
            let err = max_relative_error(a, b, scale);
            assert!(
                err < 1e-9,
                "{parameterization} floor {width_floor:?} bias {with_bias} {kernel:?}: {name} error {err:e}"
            );
        }
    }
    Ok(())
}

/// Training must be reproducible: the fused backward sums per-thread partials, and the same
/// inputs must give bit-identical gradients on every call (a static work schedule).
#[test]
fn fused_layer_gradients_are_bit_reproducible() -> TestResult {
    use crate::{gauss_layer, GaussLayerConfig, InitConfig};
    use candle_nn::{VarBuilder, VarMap};
    for (dim, neurons) in [(16, 64), (48, 24)] {
        let varmap = VarMap::new();
        let config = GaussLayerConfig {
            init: InitConfig {
                seed: Some(7),
                ..Default::default()
            },
            ..Default::default()
        };
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let layer = gauss_layer(dim, neurons, config, vb)?;
        let x = normal(&mut StdRng::seed_from_u64(3), &[512, dim], 0.3).to_dtype(DType::F32)?;
        let gradients = || -> std::result::Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
            let (y, _) = layer.forward_with_gaussian(&x, None)?;
            let grads = y.sqr()?.sum_all()?.backward()?;
            let mut all = Vec::new();
            for var in varmap.all_vars() {
                let grad = grads.get(&var).ok_or("a parameter got no gradient")?;
                all.push(grad.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(all)
        };
        let first = gradients()?;
        for _ in 0..3 {
            assert_eq!(gradients()?, first, "d = {dim}, Z = {neurons}");
        }
    }
    Ok(())
}

/// The fused layer op carries no state between forward and backward: a loss on `g` alone,
/// on `y` alone, and a second backward pass over the same graph all give the gradients of
/// the layer composed from tensor ops.
#[test]
fn fused_layer_backward_is_stateless() -> TestResult {
    use crate::config::{GaussLayerConfig, InitConfig};
    use crate::{gauss_layer, DistanceKernel as Kernel};
    use candle_nn::{VarBuilder, VarMap};
    let varmap = VarMap::new();
    let config = |kernel| GaussLayerConfig {
        kernel,
        init: InitConfig {
            seed: Some(3),
            ..Default::default()
        },
        ..Default::default()
    };
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let fused = gauss_layer(6, 5, config(Kernel::Auto), vb.clone())?;
    // The same tensors through the naive kernel: no fused layer op.
    let composed = gauss_layer(6, 5, config(Kernel::Naive), vb)?;
    let x = normal(&mut StdRng::seed_from_u64(9), &[11, 6], 0.7);
    let gradients = |layer: &crate::GaussLayer,
                     pick: usize|
     -> std::result::Result<Vec<Tensor>, Box<dyn std::error::Error>> {
        let (y, g) = layer.forward_with_gaussian(&x, None)?;
        let loss = match pick {
            0 => g.sqr()?.sum_all()?,
            _ => y.sqr()?.sum_all()?,
        };
        let mut out = Vec::new();
        // Two backward passes over the one graph must agree.
        for _ in 0..2 {
            let grads = loss.backward()?;
            for var in varmap.all_vars() {
                // A loss on g alone does not reach the linear part of the composed layer.
                let grad = match grads.get(&var) {
                    Some(grad) => grad.clone(),
                    None => var.zeros_like()?,
                };
                out.push(grad);
            }
        }
        Ok(out)
    };
    for pick in [0, 1] {
        let a = gradients(&fused, pick)?;
        let b = gradients(&composed, pick)?;
        let half = a.len() / 2;
        for (i, (ga, gb)) in a.iter().zip(&b).enumerate() {
            let err = gradient_error(ga, gb)?;
            assert!(err < 1e-10, "loss {pick}, gradient {i}: {err:e}");
        }
        for (first, second) in a[..half].iter().zip(&a[half..]) {
            assert_eq!(
                first.flatten_all()?.to_vec1::<f64>()?,
                second.flatten_all()?.to_vec1::<f64>()?,
                "second backward"
            );
        }
    }
    Ok(())
}

/// The fused linear op (the linear part of the diagonal and low-rank layers on the CPU)
/// against Candle's matmul, broadcast add and tanh: the output and the gradients of x, W and
/// b, with and without tanh and bias, in f64 (to rounding) and f32.
#[test]
fn fused_linear_matches_tensor_ops() -> TestResult {
    let (batch, dim, neurons) = (37, 11, 9);
    let mut rng = StdRng::seed_from_u64(131);
    let x = normal(&mut rng, &[batch, dim], 1.0);
    let weight = normal(&mut rng, &[neurons, dim], 0.5);
    let bias = normal(&mut rng, &[neurons], 0.5);
    let upstream = normal(&mut rng, &[batch, neurons], 1.0);
    let sizes = Sizes {
        batch,
        dim,
        neurons,
    };
    // f64: tests of the fused CPU kernels run on the CPU only
    for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        for (tanh, with_bias) in [(true, true), (true, false), (false, true), (false, false)] {
            let run =
                |fused: bool| -> std::result::Result<Vec<Tensor>, Box<dyn std::error::Error>> {
                    let vars = [&x, &weight, &bias]
                        .map(|t| t.to_dtype(dtype).and_then(|t| Var::from_tensor(&t)));
                    let [x, weight, bias] = vars;
                    let (x, weight, bias) = (x?, weight?, bias?);
                    let bias_in = with_bias.then_some(bias.as_tensor());
                    let y = linear_op::forward(fused, sizes, &x, &weight, bias_in, tanh)?;
                    let grads = (&y * upstream.to_dtype(dtype)?)?.sum_all()?.backward()?;
                    let mut out = vec![y];
                    for var in [&x, &weight] {
                        out.push(
                            grads
                                .get(var.as_tensor())
                                .cloned()
                                .ok_or("missing gradient")?,
                        );
                    }
                    if with_bias {
                        out.push(grads.get(bias.as_tensor()).cloned().ok_or("missing ∂b")?);
                    } else {
                        assert!(grads.get(bias.as_tensor()).is_none(), "∂b without a bias");
                    }
                    Ok(out)
                };
            let (fused, ops) = (run(true)?, run(false)?);
            for (name, (a, b)) in ["y", "∂x", "∂W", "∂b"].iter().zip(fused.iter().zip(&ops)) {
                // f64: CPU test tensors
                let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
                let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
                let err = max_relative_error(&a, &b, scale);
                assert!(
                    err < tolerance,
                    "{dtype:?} tanh {tanh} bias {with_bias}: {name} error {err:e}"
                );
            }
        }
    }
    Ok(())
}
