//! Mixture NLL sanity: with one neuron the mixture weight is 1 (log weight 0) whatever the
//! logit, so the mixture NLL equals the neuron's plain NLL; with several neurons it equals
//! `−log Σ_z softmax(logits)_z exp(−nll_z)` computed on the host. On each enabled device, in
//! each float dtype it has.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::testing::tolerance;
use gauss_layer::{gauss_layer, GaussError, GaussLayerConfig};
use gauss_losses::{
    layer_nll, mixture_logits, mixture_nll, mixture_nll_from_components, Reduction,
};

use gauss_tests::{gradient_of, host_values, on_device};

gauss_layer::test_device_dtypes!(single_component_mixture_equals_plain_nll, single_component);

fn single_component(dtype: DType, device: &Device) -> Result<()> {
    let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, device);
    let cfg = GaussLayerConfig {
        gaussian_only: true,
        ..Default::default()
    };
    let layer = gauss_layer(3, 1, cfg, vb.pp("layer"))?;
    let x = on_device(
        &Tensor::randn(0.0f64, 2.0, (10, 3), &Device::Cpu)?,
        dtype,
        device,
    )?;
    let plain = host_values(&layer_nll(&layer, &x, Reduction::None)?.squeeze(1)?)?;
    for logit in [0.0f64, 3.7] {
        let logits = on_device(&Tensor::new(&[logit], &Device::Cpu)?, dtype, device)?;
        let mixture = host_values(&mixture_nll(&layer, &x, &logits, Reduction::None)?)?;
        for (m, p) in mixture.iter().zip(&plain) {
            assert!(
                (m - p).abs() <= tol * p.abs().max(1.0),
                "{dtype:?}: {m} vs {p}"
            );
        }
    }
    // The learnable logits start at zero.
    let logits = mixture_logits(1, vb.pp("mixture"))?;
    assert_eq!(host_values(&logits)?, vec![0.0]);
    Ok(())
}

gauss_layer::test_device_dtypes!(
    mixture_matches_host_log_sum_exp_and_is_differentiable,
    log_sum_exp
);

fn log_sum_exp(dtype: DType, device: &Device) -> Result<()> {
    // Inputs exact in f32 too, so only the arithmetic's rounding differs between dtypes.
    let components = [[1.0f64, 2.5, 0.25], [30.0, 700.0, 29.5]];
    let logits = [0.25f64, -1.0, 0.5];
    let comp = on_device(&Tensor::new(&components, &Device::Cpu)?, dtype, device)?;
    let logits_var = Var::from_tensor(&on_device(
        &Tensor::new(&logits, &Device::Cpu)?,
        dtype,
        device,
    )?)?;
    let got = mixture_nll_from_components(&comp, &logits_var, Reduction::None)?;
    let tol = if dtype == DType::F64 {
        1e-12
    } else {
        tolerance(dtype) / 10.0
    };
    let norm: f64 = logits.iter().map(|l| l.exp()).sum();
    for (row, value) in components.iter().zip(host_values(&got)?) {
        // Shift by the smallest nll so exp does not underflow (the second row is far out).
        let min = row.iter().copied().fold(f64::INFINITY, f64::min);
        let sum: f64 = row
            .iter()
            .zip(&logits)
            .map(|(n, l)| l.exp() / norm * (-(n - min)).exp())
            .sum();
        let expected = min - sum.ln();
        assert!(
            (value - expected).abs() <= tol * expected.abs(),
            "{dtype:?}: {value} vs {expected}"
        );
    }
    let mean = mixture_nll_from_components(&comp, &logits_var, Reduction::Mean)?;
    let values = host_values(&gradient_of(&mean, &logits_var)?)?;
    assert!(values.iter().all(|g| g.is_finite()));
    // Softmax gradients sum to zero.
    assert!(
        values.iter().sum::<f64>().abs() < tol,
        "{dtype:?}: {values:?}"
    );
    Ok(())
}

gauss_layer::test_device_dtypes!(
    mixture_nll_of_far_away_samples_is_infinite,
    far_away_samples
);

/// A sample whose NLL is +∞ under every component (its squared Mahalanobis distance
/// overflows the dtype: f64 from |x| ≈ 1e155, f32 from ≈ 1e20) has mixture NLL +∞, the
/// `−log 0` of an empty mixture sum: Candle's `log_sum_exp` gave NaN there (its shift is
/// `−∞ − (−∞)`), and one such sample made the mean NaN. The finite row keeps its value,
/// `−ln Σ_z π_z e^{−nll_z}` with `π = softmax(0, 0) = (½, ½)`, and the gradient of the
/// finite rows' mean stays finite.
fn far_away_samples(dtype: DType, device: &Device) -> Result<()> {
    let inf = f64::INFINITY;
    // From the components' NLLs directly: a row of +∞ and a finite row (nll 1 and 2).
    let comp = on_device(
        &Tensor::new(&[[inf, inf], [1.0f64, 2.0]], &Device::Cpu)?,
        dtype,
        device,
    )?;
    let logits = Var::from_tensor(&on_device(
        &Tensor::new(&[0.0f64, 0.0], &Device::Cpu)?,
        dtype,
        device,
    )?)?;
    let got = host_values(&mixture_nll_from_components(
        &comp,
        &logits,
        Reduction::None,
    )?)?;
    // −ln(½e^{−1} + ½e^{−2}).
    let expected = -(0.5 * (-1f64).exp() + 0.5 * (-2f64).exp()).ln();
    assert_eq!(got[0], inf, "{dtype:?}: {got:?}");
    assert!(
        (got[1] - expected).abs() < tolerance(dtype),
        "{dtype:?}: {got:?}"
    );
    let mean = mixture_nll_from_components(&comp, &logits, Reduction::Mean)?;
    assert_eq!(host_values(&mean)?, vec![inf], "{dtype:?}");
    let finite = mixture_nll_from_components(&comp.narrow(0, 1, 1)?, &logits, Reduction::Mean)?;
    let grad = host_values(&gradient_of(&finite, &logits)?)?;
    assert!(grad.iter().all(|g| g.is_finite()), "{dtype:?}: {grad:?}");
    // Through a layer: a sample far from both neurons.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, device);
    let layer = gauss_layer(2, 2, GaussLayerConfig::default(), vb.pp("layer"))?;
    let logits = mixture_logits(2, vb.pp("mixture"))?;
    // |x|² · λ_max(P) overflows: f64's largest is 1.8e308, f32's 3.4e38.
    let far = if dtype == DType::F64 { 1e155 } else { 1e20 };
    let x = on_device(
        &Tensor::new(&[[far, 0.0f64], [0.0, 0.0]], &Device::Cpu)?,
        dtype,
        device,
    )?;
    let nll = host_values(&mixture_nll(&layer, &x, &logits, Reduction::None)?)?;
    assert_eq!(nll[0], inf, "{dtype:?}: {nll:?}");
    assert!(nll[1].is_finite(), "{dtype:?}: {nll:?}");
    Ok(())
}

/// Logits asked for again with another number of components: an error on `num_components`
/// (Candle's "shape mismatch on mixture_logits: [2] <> [1]" came with a backtrace); the same
/// size returns the same variable.
#[test]
fn mixture_logits_of_another_size_are_named() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let first = mixture_logits(1, vb.pp("mixture"))?;
    let again = mixture_logits(1, vb.pp("mixture"))?;
    assert_eq!(first.id(), again.id());
    let error = mixture_logits(2, vb.pp("mixture")).unwrap_err();
    assert!(matches!(error, GaussError::InvalidConfig { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("`num_components` 2: the VarBuilder already holds `mixture_logits`")
            && !message.contains("backtrace"),
        "{message}"
    );
    Ok(())
}
