//! Bad input gets a clear error naming what was expected and what came, never a panic or NaN.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::{gauss_layer, GaussError, GaussLayerConfig, Parameterization, PrecisionConfig};
use gauss_losses::{
    checked_cross_entropy, fgn_objective, layer_nll, nll_covariance_factor, nll_precision_factor,
    weight_l2_of_layers, FgnObjectiveConfig, LambdaLoss, Reduction,
};

fn dev() -> Device {
    Device::Cpu
}

#[test]
fn mismatched_dims_name_expected_and_got() -> Result<()> {
    let x = Tensor::zeros((4, 3), DType::F64, &dev())?;
    let mean = Tensor::zeros(2, DType::F64, &dev())?;
    let tril = Tensor::eye(3, DType::F64, &dev())?;
    let err = nll_precision_factor(&x, &mean, &tril, Reduction::Mean).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GaussError::Shape { .. }), "{msg}");
    assert!(
        msg.contains("mean") && msg.contains("(3)") && msg.contains("[2]"),
        "{msg}"
    );

    let mean = Tensor::zeros(3, DType::F64, &dev())?;
    let wide = Tensor::eye(4, DType::F64, &dev())?;
    let msg = nll_covariance_factor(&x, &mean, &wide, Reduction::Sum)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("(3, 3)") && msg.contains("[4, 4]"), "{msg}");

    let flat = Tensor::zeros(12, DType::F64, &dev())?;
    let msg = nll_precision_factor(&flat, &mean, &tril, Reduction::Mean)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("samples x") && msg.contains("[12]"), "{msg}");

    let f32_mean = Tensor::zeros(3, DType::F32, &dev())?;
    let err = nll_precision_factor(&x, &f32_mean, &tril, Reduction::Mean).unwrap_err();
    assert!(matches!(err, GaussError::DType { .. }), "{err}");
    Ok(())
}

#[test]
fn empty_batch_is_an_error() -> Result<()> {
    let x = Tensor::zeros((0, 3), DType::F64, &dev())?;
    let mean = Tensor::zeros(3, DType::F64, &dev())?;
    let tril = Tensor::eye(3, DType::F64, &dev())?;
    let err = nll_precision_factor(&x, &mean, &tril, Reduction::Mean).unwrap_err();
    assert!(matches!(err, GaussError::EmptyBatch { .. }), "{err}");
    let err = nll_covariance_factor(&x, &mean, &tril, Reduction::Mean).unwrap_err();
    assert!(matches!(err, GaussError::EmptyBatch { .. }), "{err}");
    Ok(())
}

#[test]
fn layer_losses_check_width_and_layers() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev());
    let layer = gauss_layer(3, 2, GaussLayerConfig::default(), vb)?;
    let x = Tensor::zeros((5, 4), DType::F64, &dev())?;
    let msg = layer_nll(&layer, &x, Reduction::None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("(batch, 3)") && msg.contains("[5, 4]"),
        "{msg}"
    );

    let logits = Tensor::zeros((5, 2), DType::F64, &dev())?;
    let targets = Tensor::new(&[0u32, 1, 0], &dev())?;
    let msg = checked_cross_entropy(&logits, &targets)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("(5)") && msg.contains("[3]"), "{msg}");
    let float_targets = Tensor::zeros(5, DType::F64, &dev())?;
    assert!(checked_cross_entropy(&logits, &float_targets).is_err());

    let none: [&gauss_layer::GaussLayer; 0] = [];
    assert!(matches!(
        weight_l2_of_layers(none),
        Err(GaussError::NoLayers { .. })
    ));
    let targets = Tensor::new(&[0u32, 1, 0, 1, 1], &dev())?;
    let bad = FgnObjectiveConfig {
        lambda_l2: -1.0,
        ..Default::default()
    };
    let msg = fgn_objective(&logits, &targets, [&layer], &bad)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("lambda_l2") && msg.contains("-1"), "{msg}");
    Ok(())
}

/// Documented choice (gauss_losses::positive_definite): a `direct` precision that is not
/// positive definite is an error naming the neuron, never a NaN loss.
#[test]
fn indefinite_direct_precision_is_an_error_not_nan() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev());
    let cfg = GaussLayerConfig {
        precision: PrecisionConfig::with_parameterization(Parameterization::Direct),
        gaussian_only: true,
        ..Default::default()
    };
    let layer = gauss_layer(2, 2, cfg, vb)?;
    // Neuron 1 gets P = diag(1, −1).
    let indefinite = Tensor::new(
        &[[[1.0f64, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, -1.0]]],
        &dev(),
    )?;
    varmap
        .data()
        .lock()
        .expect("varmap lock")
        .get("precision")
        .expect("direct layer stores `precision`")
        .set(&indefinite)?;
    let x = Tensor::zeros((3, 2), DType::F64, &dev())?;
    let err = layer_nll(&layer, &x, Reduction::Mean).unwrap_err();
    assert!(
        matches!(err, GaussError::NotPositiveDefinite { neuron: 1, .. }),
        "{err}"
    );
    for variant in LambdaLoss::ALL {
        let err = variant.of_layers([&layer]).unwrap_err();
        assert!(
            matches!(err, GaussError::NotPositiveDefinite { .. }),
            "{err}"
        );
    }
    Ok(())
}

/// The functional core of the λ-loss refuses a singular factor for the two covariance terms
/// (they invert `L`: inf values and NaN gradients before), naming the neuron; `tr P` needs no
/// inverse and takes it.
#[test]
fn singular_factors_are_an_error_for_the_covariance_terms() -> Result<()> {
    let tril = Tensor::new(
        &[[[1.0f64, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.5, 0.0]]],
        &dev(),
    )?;
    for variant in [LambdaLoss::TraceCovariance, LambdaLoss::LogdetCovariance] {
        match variant.per_neuron_from_factor(&tril) {
            Err(GaussError::Numerical { reason, .. }) => {
                assert!(
                    reason.contains("neuron 1") && reason.contains("entry 1"),
                    "{reason}"
                )
            }
            other => panic!("{variant}: expected a numerical error, got {other:?}"),
        }
    }
    // tr P = |L|²_F / −d per neuron: (1 + 4) / −2 and (1 + 0.25) / −2.
    let values = LambdaLoss::NegTracePrecision
        .per_neuron_from_factor(&tril)?
        .to_vec1::<f64>()?;
    assert_eq!(values, vec![-2.5, -0.625]);
    Ok(())
}
