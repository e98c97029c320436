//! The fused ops compute `∂x` only where Candle will use it: the first layer's input (the
//! data) tracks no op, so its gradient is skipped, and every other gradient is the same to
//! the bit as when `x` is a variable.

use super::*;
use crate::config::PrecisionConfig;

/// The parameters' gradients (flattened, in f64) and whether `x` got one.
type Outcome = (Vec<Vec<f64>>, bool);

/// Gradients of `Σ G ∘ out` with respect to `params` (variables), and whether Candle
/// returned one for `x`, with `x` a variable (`x_is_variable`) or plain data.
fn parameter_gradients(
    op: &dyn Fn(&Tensor, &[Tensor]) -> crate::Result<Tensor>,
    x: &Tensor,
    params: &[Tensor],
    x_is_variable: bool,
    upstream_seed: u64,
) -> std::result::Result<Outcome, Box<dyn std::error::Error>> {
    let x_var = Var::from_tensor(x)?;
    let x_in = if x_is_variable {
        x_var.as_tensor().clone()
    } else {
        x.clone()
    };
    let vars = params
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&x_in, &tensors)?;
    let upstream = normal(&mut StdRng::seed_from_u64(upstream_seed), out.dims(), 1.0);
    let grads = out
        .mul(&upstream.to_dtype(out.dtype())?)?
        .sum_all()?
        .backward()?;
    let mut values = Vec::new();
    for var in &vars {
        let grad = grads
            .get(var.as_tensor())
            .ok_or("a parameter got no gradient")?;
        // f64: tests of the fused CPU kernels run on the CPU only
        values.push(grad.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
    }
    Ok((values, grads.get(&x_in).is_some()))
}

/// Runs `op` with `x` as plain data and as a variable: the data gets no gradient, the
/// variable one, and the parameters' gradients agree bit for bit.
fn check(
    name: &str,
    op: &dyn Fn(&Tensor, &[Tensor]) -> crate::Result<Tensor>,
    x: &Tensor,
    params: &[Tensor],
) -> TestResult {
    let (from_data, data_has_gradient) = parameter_gradients(op, x, params, false, 5)?;
    let (from_variable, variable_has_gradient) = parameter_gradients(op, x, params, true, 5)?;
    assert!(!data_has_gradient, "{name}: the data input got a gradient");
    assert!(
        variable_has_gradient,
        "{name}: the variable input got no gradient"
    );
    assert_eq!(
        from_data, from_variable,
        "{name}: parameter gradients differ"
    );
    Ok(())
}

#[test]
fn fused_ops_skip_the_gradient_of_an_input_that_tracks_nothing() -> TestResult {
    let c = case(21, 37, 9, 6, 5.0);
    let mut rng = StdRng::seed_from_u64(121);
    let diagonal = normal(&mut rng, &[6, 9], 1.0).exp()?;
    let precision = precision_of(&c)?;
    let weight = normal(&mut rng, &[6, 9], 0.3);
    let bias = normal(&mut rng, &[6], 0.3);
    // f64: tests of the fused CPU kernels run on the CPU only
    for dtype in [DType::F64, DType::F32] {
        let cast = |t: &Tensor| t.to_dtype(dtype).expect("cast");
        let x = cast(&c.x);
        type DistanceOp = fn(&Tensor, &Tensor, &Tensor) -> crate::Result<Tensor>;
        let distance_ops: [(&str, DistanceOp, &Tensor); 4] = [
            ("diagonal", diagonal_fused, &diagonal),
            ("projected", projected_fused, &c.factor),
            ("expanded, matrix", expanded_fused, &precision),
            ("expanded, factor", expanded_fused_factor, &c.factor),
        ];
        for (name, op, operand) in distance_ops {
            let params = [cast(&c.center), cast(operand)];
            check(name, &|x, p| op(x, &p[0], &p[1]), &x, &params)?;
        }
        let sizes = Sizes {
            batch: 37,
            dim: 9,
            neurons: 6,
        };
        for tanh in [true, false] {
            check(
                &format!("fused linear, tanh {tanh}"),
                &|x, p| linear_op::forward(true, sizes, x, &p[0], Some(&p[1]), tanh),
                &x,
                &[cast(&weight), cast(&bias)],
            )?;
        }
        for kernel in [DistanceKernel::Projected, DistanceKernel::Expanded] {
            let layer = |x: &Tensor, p: &[Tensor]| -> crate::Result<Tensor> {
                let precision = Precision::from_raw(p[3].clone(), 9, PrecisionConfig::default())?;
                let fused = layer_fused(x, &p[0], &p[1], Some(&p[2]), &precision, kernel)?;
                let (y, g) = fused.ok_or_else(|| GaussError::config("kernel", "no fused op"))?;
                Ok((y + g)?)
            };
            check(
                &format!("fused layer, {kernel:?}"),
                &layer,
                &x,
                &[cast(&c.center), cast(&weight), cast(&bias), cast(&c.factor)],
            )?;
        }
    }
    Ok(())
}
