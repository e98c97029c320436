//! Bad input gets a clear error naming what was expected and what came, never a panic or NaN.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::{gauss_layer, GaussError, GaussLayerConfig, Parameterization, PrecisionConfig};
use gauss_losses::{
    checked_cross_entropy, fgn_objective, layer_nll, log_det_from_triangular,
    mixture_nll_from_components, nll_covariance_factor, nll_from_mahalanobis, nll_precision_factor,
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
    // No layers: named as the objective's argument (it was "weight L2: ...", a term the
    // caller never asked for), and the dtype of float targets names the dtypes it takes.
    let msg = fgn_objective(&logits, &targets, none, &FgnObjectiveConfig::default())
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("fgn_objective's `layers`"), "{msg}");
    let msg = checked_cross_entropy(&logits, &float_targets)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("U8, U32 or I64") && msg.contains("F64"),
        "{msg}"
    );
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

/// A class target outside `0..C` is an error naming the row. Before, the largest value of the
/// index dtype (Candle's gather padding) silently gave 0 for its row, dropping the sample:
/// logits [[1, 2, 3], [0, 0, 0]] with targets [2, u32::MAX] came to (ln(e + e² + e³) − 3)/2.
#[test]
fn cross_entropy_refuses_targets_outside_the_classes() -> Result<()> {
    // f64: host tensors of the test.
    let logits = Tensor::new(&[[1.0f64, 2.0, 3.0], [0.0, 0.0, 0.0]], &dev())?;
    let bad = [
        Tensor::new(&[2u32, u32::MAX], &dev())?,
        Tensor::new(&[2u32, 3], &dev())?,
        Tensor::new(&[2u8, u8::MAX], &dev())?,
        Tensor::new(&[2i64, i64::MAX], &dev())?,
        Tensor::new(&[2i64, -1], &dev())?,
    ];
    for targets in &bad {
        match checked_cross_entropy(&logits, targets) {
            Err(GaussError::Data { origin, reason }) => {
                assert_eq!(origin, "class targets");
                assert!(
                    reason.contains("row 1") && reason.contains("0..3"),
                    "{reason}"
                );
            }
            other => panic!("{targets}: expected a data error, got {other:?}"),
        }
    }
    // In range: the mean of −log softmax, (ln(e + e² + e³) − 3 + ln 3)/2.
    let e = std::f64::consts::E;
    let expected = ((e + e * e + e * e * e).ln() - 3.0 + 3f64.ln()) / 2.0;
    for targets in [
        Tensor::new(&[2u32, 1], &dev())?,
        Tensor::new(&[2u8, 1], &dev())?,
        Tensor::new(&[2i64, 1], &dev())?,
    ] {
        let got = checked_cross_entropy(&logits, &targets)?.to_scalar::<f64>()?;
        assert!(
            (got - expected).abs() <= 1e-12 * expected,
            "{got} vs {expected}"
        );
    }
    Ok(())
}

/// No classes and no mixture components are shape errors naming the argument (Candle's
/// "empty tensor for reduce" before).
#[test]
fn zero_classes_and_zero_components_are_shape_errors() -> Result<()> {
    // f64: host tensors of the test.
    let empty = Tensor::zeros((2, 0), DType::F64, &dev())?;
    let targets = Tensor::new(&[0u32, 0], &dev())?;
    let err = checked_cross_entropy(&empty, &targets).unwrap_err();
    assert!(
        matches!(&err, GaussError::Shape { what, .. } if what == "logits"),
        "{err}"
    );
    // f64: host tensor of the test.
    let no_logits = Tensor::zeros(0, DType::F64, &dev())?;
    let err = mixture_nll_from_components(&empty, &no_logits, Reduction::Mean).unwrap_err();
    assert!(
        matches!(&err, GaussError::Shape { what, .. } if what == "component nll"),
        "{err}"
    );
    Ok(())
}

/// Integer tensors where the losses need floats are a dtype error naming the argument; Candle
/// has no integer log/exp/affine kernels and panicked ("no unary function for u32", "attempt to
/// subtract with overflow") in each of these.
#[test]
fn integer_tensors_are_a_dtype_error_not_a_panic() -> Result<()> {
    let x = Tensor::new(&[[1u32, 2], [3, 4]], &dev())?;
    let mean = Tensor::new(&[0u32, 0], &dev())?;
    let factor = Tensor::new(&[[1u32, 0], [0, 1]], &dev())?;
    let factors = factor.unsqueeze(0)?;
    let targets = Tensor::new(&[0u32, 1], &dev())?;
    let is_dtype_error = |result: gauss_layer::Result<Tensor>, what: &str| match result {
        Err(GaussError::DType { .. }) => {}
        other => panic!("{what}: expected a dtype error, got {other:?}"),
    };
    is_dtype_error(
        nll_covariance_factor(&x, &mean, &factor, Reduction::Mean),
        "nll_covariance_factor",
    );
    is_dtype_error(
        nll_precision_factor(&x, &mean, &factor, Reduction::Mean),
        "nll_precision_factor",
    );
    for variant in LambdaLoss::ALL {
        is_dtype_error(variant.per_neuron_from_factor(&factors), variant.name());
    }
    is_dtype_error(
        mixture_nll_from_components(&x, &mean, Reduction::Mean),
        "mixture_nll_from_components",
    );
    is_dtype_error(checked_cross_entropy(&x, &targets), "checked_cross_entropy");
    is_dtype_error(log_det_from_triangular(&factors), "log_det_from_triangular");
    is_dtype_error(
        nll_from_mahalanobis(&mean, &Tensor::new(0u32, &dev())?, 2),
        "nll_from_mahalanobis",
    );
    Ok(())
}

/// `Reduction::Mean` of no samples is an `EmptyBatch` error (it was 0/0, NaN per column);
/// the sum of no samples is 0 (the empty sum); a scalar has no batch axis to reduce.
#[test]
fn mean_of_an_empty_batch_is_an_error_not_nan() -> Result<()> {
    let empty = Tensor::zeros((0, 3), DType::F32, &dev())?;
    let err = Reduction::Mean.apply(&empty).unwrap_err();
    assert!(matches!(err, GaussError::EmptyBatch { .. }), "{err}");
    assert_eq!(
        Reduction::Sum.apply(&empty)?.to_vec1::<f32>()?,
        vec![0.0; 3]
    );
    assert_eq!(Reduction::None.apply(&empty)?.dims(), &[0, 3]);
    let scalar = Tensor::new(1f32, &dev())?;
    let err = Reduction::Mean.apply(&scalar).unwrap_err();
    assert!(matches!(err, GaussError::Shape { .. }), "{err}");
    Ok(())
}

/// `nll_from_mahalanobis` names a `log_det_precision` that does not fit `mahalanobis_sq`
/// (shape, dtype) instead of Candle's bare "shape mismatch in broadcast_add" or "dtype
/// mismatch in add"; the documented pairs (B) with () and (B, Z) with (Z) still work.
#[test]
fn nll_from_mahalanobis_names_mismatched_log_dets() -> Result<()> {
    let m2 = Tensor::zeros((3, 2), DType::F32, &dev())?;
    for bad in [vec![3], vec![2, 2], vec![3, 2], vec![1, 3, 2]] {
        let log_det = Tensor::zeros(bad.as_slice(), DType::F32, &dev())?;
        match nll_from_mahalanobis(&m2, &log_det, 2) {
            Err(GaussError::Shape { what, got, .. }) => {
                assert_eq!(what, "log_det_precision");
                assert_eq!(got, bad);
            }
            other => panic!("{bad:?}: expected a Shape error, got {other:?}"),
        }
    }
    let scalar = Tensor::new(0f32, &dev())?;
    let err = nll_from_mahalanobis(&scalar, &scalar, 2).unwrap_err();
    assert!(matches!(err, GaussError::Shape { .. }), "{err}");
    let half = Tensor::zeros(2, DType::F16, &dev())?;
    let err = nll_from_mahalanobis(&m2, &half, 2).unwrap_err();
    assert!(
        matches!(
            err,
            GaussError::DType {
                got: DType::F16,
                ..
            }
        ),
        "{err}"
    );
    let z = Tensor::zeros(2, DType::F32, &dev())?;
    assert_eq!(nll_from_mahalanobis(&m2, &z, 2)?.dims(), [3, 2]);
    assert_eq!(nll_from_mahalanobis(&m2, &scalar, 2)?.dims(), [3, 2]);
    let column = Tensor::zeros(3, DType::F32, &dev())?;
    assert_eq!(nll_from_mahalanobis(&column, &scalar, 2)?.dims(), [3]);
    Ok(())
}

/// `log_det_from_triangular` of a tensor that is not a batch of square matrices names its
/// argument ("triangular factors") and the shape that came, not the internal diagonal op.
#[test]
fn log_det_from_triangular_names_a_non_square_argument() -> Result<()> {
    for dims in [vec![3usize, 2], vec![4], vec![2, 3, 2]] {
        let factors = Tensor::zeros(dims.as_slice(), DType::F32, &dev())?;
        let message = log_det_from_triangular(&factors).unwrap_err().to_string();
        assert!(
            message.starts_with("triangular factors: expected shape (..., d, d)")
                && message.contains(&format!("{dims:?}")),
            "{message}"
        );
    }
    Ok(())
}
