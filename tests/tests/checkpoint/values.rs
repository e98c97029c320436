//! Values at the edges: non-finite parameters are refused at load (naming the tensor and the
//! element) unless an inspection tool opts out; an expm precision whose matrix exponential
//! overflows is an error at forward, not NaN; `repair` refuses a NaN matrix.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gauss_layer::checkpoint::{self, LoadOptions};
use gauss_layer::testing::linalg;
use gauss_layer::{repair, GaussError, GaussLayerConfig, GaussNetConfig, Parameterization};

use gauss_tests::{new_net, small_diag_net_config, temp_dir};

fn checkpoint_reason<T: std::fmt::Debug>(result: gauss_layer::Result<T>) -> String {
    match result {
        Err(GaussError::Checkpoint { reason, .. }) => reason,
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

#[test]
fn non_finite_parameters_are_refused_unless_asked_for() -> Result<()> {
    let dir = temp_dir("ckpt-values")?;
    let (net, varmap) = new_net(small_diag_net_config(), DType::F32)?;
    let center = "layers.1.center";
    let var = varmap.data().lock().expect("lock")[center].clone();
    let dims = var.dims().to_vec();
    for (what, value) in [
        ("NaN", f32::NAN),
        ("inf", f32::INFINITY),
        ("-inf", f32::NEG_INFINITY),
    ] {
        let mut values = vec![0.5f32; dims.iter().product()];
        values[3] = value;
        var.set(&Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?)?;
        let path = dir.join("nan.safetensors");
        net.save(&path)?;
        let reason = checkpoint_reason(checkpoint::load(&path, &Device::Cpu, None));
        assert!(
            reason.contains(center) && reason.contains(what) && reason.contains("index 3"),
            "{reason}"
        );
        // Opened on purpose for inspection: the value is there.
        let options = LoadOptions {
            allow_non_finite: true,
            ..Default::default()
        };
        let loaded = checkpoint::load_with_options(&path, &Device::Cpu, &options)?;
        let got = loaded.net.layers()[1]
            .center()
            .flatten_all()?
            .to_vec1::<f32>()?[3];
        assert_eq!(got.to_bits(), value.to_bits(), "{what}");
    }
    // A finite f64 value that overflows the requested f32.
    let (net64, varmap64) = new_net(small_diag_net_config(), DType::F64)?;
    let var = varmap64.data().lock().expect("lock")[center].clone();
    let mut values = vec![0.5f64; dims.iter().product()];
    values[1] = 1e300;
    var.set(&Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?)?;
    let path = dir.join("big.safetensors");
    net64.save(&path)?;
    assert!(checkpoint::load(&path, &Device::Cpu, None).is_ok());
    let reason = checkpoint_reason(checkpoint::load(&path, &Device::Cpu, Some(DType::F32)));
    assert!(
        reason.contains(center) && reason.contains("overflows F32"),
        "{reason}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A negative running variance makes every output of the network NaN (the batch norm divides
/// by √(var + eps)): the loader refuses it, naming the tensor and the element, as the importer
/// does; a variance of 0 loads (eps > 0 keeps the division finite).
#[test]
fn a_negative_running_variance_is_refused() -> Result<()> {
    let dir = temp_dir("ckpt-variance")?;
    let config = GaussNetConfig {
        input_batch_norm: true,
        batch_norm: true,
        ..small_diag_net_config()
    };
    for name in ["norms.0.running_var", "input_norm.running_var"] {
        let (net, varmap) = new_net(config.clone(), DType::F32)?;
        let var = varmap.data().lock().expect("lock")[name].clone();
        let width = var.dims()[0];
        let path = dir.join("variance.safetensors");
        for (value, refused) in [(-5.0f32, true), (0.0, false)] {
            let mut values = vec![1.0f32; width];
            values[1] = value;
            var.set(&Tensor::from_vec(values, width, &Device::Cpu)?)?;
            net.save(&path)?;
            let loaded = checkpoint::load(&path, &Device::Cpu, None);
            if refused {
                let reason = checkpoint_reason(loaded);
                assert!(
                    reason.contains(name) && reason.contains("index 1") && reason.contains(">= 0"),
                    "{reason}"
                );
            } else {
                let y = loaded?
                    .net
                    .forward(&Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, false)?;
                assert!(y
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .all(|v| v.is_finite()));
            }
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn an_overflowing_matrix_exponential_is_an_error_not_nan() -> Result<()> {
    // expm(800 I) = e^800 I overflows f32 (largest e^88.7); expm(1e5 I) overflows f64.
    for (dtype, diagonal) in [(DType::F32, 800.0), (DType::F64, 1e5)] {
        let a = (Tensor::eye(3, dtype, &Device::Cpu)? * diagonal)?.unsqueeze(0)?;
        let ok = Tensor::zeros((1, 3, 3), dtype, &Device::Cpu)?;
        let batch = Tensor::cat(&[&ok, &a], 0)?;
        let err = linalg::expm_symmetric(&batch).unwrap_err().to_string();
        assert!(
            err.contains("overflows") && err.contains("neuron 1"),
            "{err}"
        );
        assert!(linalg::trace_expm_symmetric(&batch).is_err());
    }
    // Just inside the range: e^80 I in f32 is finite, and comes out finite.
    let a = (Tensor::eye(2, DType::F32, &Device::Cpu)? * 80.0)?.unsqueeze(0)?;
    let e = linalg::expm_symmetric(&a)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert!(e.iter().all(|v| v.is_finite()) && (e[0] / 80f32.exp() - 1.0).abs() < 1e-4);
    // A diagonal spread that overflows in the scaling-and-squaring (e^±400 about the mean)
    // even though the mean is 0.
    let spread = Tensor::new(&[[[400.0f32, 0.0], [0.0, -400.0]]], &Device::Cpu)?;
    assert!(linalg::expm_symmetric(&spread).is_err());

    // Through a layer: a raw expm diagonal of 800 in f32 gives an error at forward.
    let config = GaussNetConfig {
        in_features: 3,
        hidden: vec![],
        out_features: 2,
        layer: GaussLayerConfig::with_parameterization(Parameterization::Expm),
        ..Default::default()
    };
    let (net, varmap) = new_net(config, DType::F32)?;
    let raw = varmap.data().lock().expect("lock")["layers.0.precision_log"].clone();
    raw.set(
        &(Tensor::eye(3, DType::F32, &Device::Cpu)? * 800.0)?
            .broadcast_as((2, 3, 3))?
            .contiguous()?,
    )?;
    let x = Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?;
    match net.forward(&x, false) {
        Err(e) => assert!(e.to_string().contains("overflows"), "{e}"),
        Ok(y) => panic!("forward returned {y} instead of an error"),
    }
    Ok(())
}

#[test]
fn repair_refuses_non_finite_matrices() -> Result<()> {
    let a = Tensor::new(
        &[[[1.0f64, 0.0], [0.0, 1.0]], [[1.0, f64::NAN], [0.0, 1.0]]],
        &Device::Cpu,
    )?;
    let err = repair::repair_matrices(&a, 1e-3).unwrap_err().to_string();
    assert!(err.contains("neuron 1") && err.contains("NaN"), "{err}");
    // In place on a variable: an error, and the variable is untouched.
    let var = Var::from_tensor(&a)?;
    assert!(repair::repair_var_in_place(&var, 1e-3).is_err());
    let after = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    assert!(after[5].is_nan() && after[0] == 1.0);
    Ok(())
}

/// A non-finite value in a precision tensor: `allow_non_finite` does not open it (every layer
/// refuses a raw precision outside its range when it is built), so the refusal must not say
/// it would (it did: "LoadOptions::allow_non_finite opens it for inspection"), and with the
/// option the error still names the tensor and the element.
#[test]
fn a_non_finite_precision_is_refused_with_or_without_the_opt_out() -> Result<()> {
    let dir = temp_dir("ckpt-values-precision")?;
    let (net, varmap) = new_net(small_diag_net_config(), DType::F32)?;
    let name = "layers.0.precision_log_diag";
    let var = varmap.data().lock().expect("lock")[name].clone();
    let dims = var.dims().to_vec();
    let mut values = vec![0.5f32; dims.iter().product()];
    values[1] = f32::NAN;
    var.set(&Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?)?;
    let path = dir.join("nan-precision.safetensors");
    net.save(&path)?;
    let reason = checkpoint_reason(checkpoint::load(&path, &Device::Cpu, None));
    assert!(
        reason.contains(name) && reason.contains("NaN") && reason.contains("index 1"),
        "{reason}"
    );
    assert!(
        !reason.contains("opens it"),
        "promises an opt-out that does not open it: {reason}"
    );
    let options = LoadOptions {
        allow_non_finite: true,
        ..Default::default()
    };
    let reason = checkpoint_reason(checkpoint::load_with_options(&path, &Device::Cpu, &options));
    assert!(
        reason.contains("precision_log_diag") && reason.contains("NaN"),
        "{reason}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
