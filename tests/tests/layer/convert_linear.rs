//! Classical → Gaussian conversion keeps the linear layer's outputs near the data (within the
//! Gaussian's tolerance `|y_lin| · (1 - g)`, `1 - g ≤ m2/2`) and puts every center on its
//! neuron's zero line (`w·c + b = 0`).

use anyhow::Result;
use candle_core::{DType, Module, D};
use candle_nn::Linear;
use gauss_layer::convert::{linear_to_gauss_layer, mlp_to_gauss_net, ConvertOptions, InitialWidth};
use gauss_layer::Parameterization;

use gauss_tests::randn;

fn linear(fan_in: usize, fan_out: usize) -> Result<Linear> {
    Ok(Linear::new(
        randn(&[fan_out, fan_in], 0.5)?,
        Some(randn(&[fan_out], 0.5)?),
    ))
}

#[test]
fn converted_layer_matches_near_the_data_and_centers_lie_on_zero_lines() -> Result<()> {
    let lin = linear(6, 5)?;
    let x = randn(&[32, 6], 1.0)?;
    let scale = 1e-4;
    for parameterization in Parameterization::ALL {
        let options = ConvertOptions {
            parameterization,
            width: InitialWidth::PrecisionScale(scale),
            ..Default::default()
        };
        let layer = linear_to_gauss_layer(&lin, &options)?;
        let w = lin.weight();
        let b = lin.bias().expect("bias");
        // Zero line: w·c + b = 0 (closed form; f64 rounding only).
        let on_line = ((layer.center() * w)?.sum(D::Minus1)? + b)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(on_line < 1e-12, "{parameterization}: w·c + b = {on_line}");

        let y_lin = lin.forward(&x)?;
        let (y, g) = layer.forward_with_gaussian(&x, None)?;
        // m2 = scale · |x - c|² for P = scale · I, and 1 - exp(-m2/2) ≤ m2/2.
        let delta = x
            .unsqueeze(1)?
            .broadcast_sub(&layer.center().unsqueeze(0)?)?;
        let m2 = (delta.sqr()?.sum(D::Minus1)? * scale)?;
        let expected_g = (m2.neg()? * 0.5)?.exp()?;
        let g_err = (&g - &expected_g)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(
            g_err < 1e-9,
            "{parameterization}: g differs from exp(-m2/2) by {g_err}"
        );
        let bound = ((y_lin.abs()? * (&m2 * 0.5)?)? + 1e-12)?;
        let excess = ((y - &y_lin)?.abs()? - bound)?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(
            excess <= 0.0,
            "{parameterization}: outside tolerance by {excess}"
        );
    }
    Ok(())
}

#[test]
fn converted_tanh_mlp_matches_the_classical_one_near_the_data() -> Result<()> {
    let layers = vec![linear(4, 8)?, linear(8, 3)?];
    let x = randn(&[16, 4], 1.0)?;
    let options = ConvertOptions {
        width: InitialWidth::PrecisionScale(1e-6),
        tanh: true,
        ..Default::default()
    };
    let net = mlp_to_gauss_net(&layers, &options)?;
    let classical = layers[1].forward(&layers[0].forward(&x)?.tanh()?)?;
    let y = net.forward(&x, false)?;
    let diff = (&y - &classical)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = classical.abs()?.max_all()?.to_scalar::<f64>()?;
    // Each Gaussian is within ~1e-6·|x-c|²/2 of 1: a relative error of order 1e-4 here.
    assert!(diff / scale < 1e-3, "relative difference {}", diff / scale);
    assert_eq!(y.dtype(), DType::F64);
    Ok(())
}

#[test]
fn original_rule_sets_each_layers_width_from_its_own_size() -> Result<()> {
    // convert_classic_to_fgn: inv_covars = 1/(init_factor·Z) per layer, read as P = 2σ²·I
    // (sphere, diag, chol) or A + Aᵀ = 2σ·I (full). Layers of 8 and 3 neurons, init_factor 4.
    use gauss_layer::import::FgnCovarType;
    let layers = vec![linear(5, 8)?, linear(8, 3)?];
    for covar_type in FgnCovarType::ALL {
        let options = ConvertOptions::fgn_original(covar_type, 4.0);
        let net = mlp_to_gauss_net(&layers, &options)?;
        assert_eq!(
            net.layers()[0].config().precision.parameterization,
            covar_type.parameterization()
        );
        assert!(net.layers()[0].config().tanh && !net.layers()[1].config().tanh);
        for (layer, z) in net.layers().iter().zip([8.0f64, 3.0]) {
            let sigma = 1.0 / (4.0 * z);
            let expected = match covar_type {
                FgnCovarType::Full => 2.0 * sigma,
                _ => 2.0 * sigma * sigma,
            };
            let p = layer.precision().precision_matrix()?;
            let d = layer.in_features();
            let eye = candle_core::Tensor::eye(d, DType::F64, &candle_core::Device::Cpu)?;
            let want = (eye * expected)?.unsqueeze(0)?.broadcast_as(p.dims())?;
            let err = gauss_layer::testing::relative_error(&p, &want.contiguous()?)?;
            assert!(err < 1e-12, "{covar_type}: P differs by {err}");
        }
    }
    Ok(())
}

/// A converted network holds plain tensors; `to_trainable` gives a copy whose every tensor is
/// a variable: it computes the same outputs bit for bit, and one optimizer step over its
/// `VarMap` moves the centers and precisions too (over the classical `VarMap` they never
/// moved), while the converted network itself is left as it was.
#[test]
fn to_trainable_makes_every_tensor_of_a_converted_net_a_variable() -> Result<()> {
    use candle_nn::{Optimizer, SGD};
    let layers = vec![linear(4, 8)?, linear(8, 3)?];
    let options = ConvertOptions {
        width: InitialWidth::PrecisionScale(0.1),
        ..Default::default()
    };
    let converted = mlp_to_gauss_net(&layers, &options)?;
    let before = converted.named_tensors();
    let (net, varmap) = converted.to_trainable()?;
    assert_eq!(varmap.all_vars().len(), before.len());
    let x = randn(&[16, 4], 1.0)?;
    let same = (converted.forward(&x, false)? - net.forward(&x, false)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert_eq!(same, 0.0);
    let mut sgd = SGD::new(varmap.all_vars(), 0.1)?;
    sgd.backward_step(&net.forward(&x, true)?.sqr()?.mean_all()?)?;
    for ((name, old), (_, new)) in before.iter().zip(net.named_tensors()) {
        let moved = (old - &new)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(moved > 0.0, "{name} did not move");
    }
    // The converted network's own tensors are untouched.
    for ((name, old), (_, now)) in before.iter().zip(converted.named_tensors()) {
        let moved = (old - &now)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert_eq!(moved, 0.0, "{name} of the converted network changed");
    }
    Ok(())
}
