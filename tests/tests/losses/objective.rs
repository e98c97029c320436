//! The FGN objective: `total = cross_entropy + λ_l2 · mean(w²) + λ_sig · λ-loss`, with the
//! terms computed here independently (Candle's cross-entropy, the mean of the squared weights
//! over all layers, the λ-loss pooled over all neurons), and gradients reaching every
//! parameter that a term depends on. On each enabled device, in each float dtype it has.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use gauss_layer::testing::all_finite;
use gauss_layer::{gauss_layer, GaussLayerConfig, Parameterization};
use gauss_losses::{fgn_objective, weight_l2, FgnObjectiveConfig, LambdaLoss};
use gauss_tests::{host_scalar, on_device};

gauss_layer::test_device_dtypes!(objective_is_the_weighted_sum_of_its_terms, weighted_sum);

fn weighted_sum(dtype: DType, dev: &Device) -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, dev);
    let first = gauss_layer(4, 5, GaussLayerConfig::default(), vb.pp("l0"))?;
    let second_cfg = GaussLayerConfig::with_parameterization(Parameterization::Diag);
    let second = gauss_layer(5, 3, second_cfg, vb.pp("l1"))?;
    let x = on_device(
        &Tensor::randn(0.0f64, 1.0, (6, 4), &Device::Cpu)?,
        dtype,
        dev,
    )?;
    let logits = second.forward(&first.forward(&x)?)?;
    let targets = Tensor::new(&[0u32, 1, 2, 2, 1, 0], dev)?;
    let config = FgnObjectiveConfig {
        lambda_l2: 0.3,
        lambda_sigma: 0.05,
        lambda_loss: LambdaLoss::LogdetCovariance,
        ..Default::default()
    };
    let loss = fgn_objective(&logits, &targets, [&first, &second], &config)?;
    let values = loss.values()?;

    let ce = host_scalar(&candle_nn::loss::cross_entropy(&logits, &targets)?)?;
    let (w0, w1) = (first.weight().expect("w0"), second.weight().expect("w1"));
    let l2 = host_scalar(&((w0.sqr()?.sum_all()? + w1.sqr()?.sum_all()?)? / 35.0)?)?;
    let lam = host_scalar(
        &((first.precision().log_det_precision()?.sum_all()?
            + second.precision().log_det_precision()?.sum_all()?)?
            / -8.0)?,
    )?;
    // The same ops in another order: rounding of the dtype (f32 sums of a few terms).
    let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
    let close = |a: f64, b: f64| (a - b).abs() <= tol * b.abs().max(1.0);
    assert!(close(values.cross_entropy, ce), "{values:?} vs ce {ce}");
    assert!(close(values.weight_l2, l2), "{values:?} vs l2 {l2}");
    assert!(close(values.lambda, lam), "{values:?} vs lambda {lam}");
    assert!(
        close(values.total, ce + 0.3 * l2 + 0.05 * lam),
        "{values:?}"
    );
    // One layer's L2 is the plain mean of its squared weights.
    let single = host_scalar(&weight_l2(&first)?)?;
    assert!(close(single, host_scalar(&w0.sqr()?.mean_all()?)?));

    let grads = loss.total.backward()?;
    for var in varmap.all_vars() {
        let grad = grads.get(&var);
        assert!(
            grad.is_some(),
            "a parameter of shape {:?} got no gradient",
            var.dims()
        );
        let finite = grad.map(all_finite).transpose()?;
        assert_eq!(finite, Some(true), "{dtype:?}: a gradient is not finite");
    }
    Ok(())
}

#[test]
fn objective_config_round_trips_through_serde_with_defaults() -> Result<()> {
    let config: FgnObjectiveConfig =
        serde_json::from_str(r#"{"lambda_loss":"neg_trace_precision"}"#)?;
    assert_eq!(config.lambda_loss, LambdaLoss::NegTracePrecision);
    assert_eq!(config.lambda_l2, FgnObjectiveConfig::default().lambda_l2);
    let back: FgnObjectiveConfig = serde_json::from_str(&serde_json::to_string(&config)?)?;
    assert_eq!(config, back);
    Ok(())
}

/// The objective's config is strict, as the layer's: an unknown (misspelt) field is an error
/// naming it, in the config and in the Hutchinson estimator's fields. Before, `lamda_l2` was
/// ignored and the objective silently ran with the default `lambda_l2`.
#[test]
fn objective_config_refuses_unknown_fields() -> Result<()> {
    let err = serde_json::from_str::<FgnObjectiveConfig>(r#"{"lamda_l2":0.01}"#).unwrap_err();
    assert!(err.to_string().contains("lamda_l2"), "{err}");
    let err = serde_json::from_str::<FgnObjectiveConfig>(
        r#"{"trace_estimator":{"hutchinson":{"probes":4,"seed":1}}}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("seed"), "{err}");
    let config: FgnObjectiveConfig =
        serde_json::from_str(r#"{"trace_estimator":{"hutchinson":{"probes":4}}}"#)?;
    assert_eq!(
        config.trace_estimator,
        gauss_losses::TraceEstimator::Hutchinson { probes: 4 }
    );
    Ok(())
}
