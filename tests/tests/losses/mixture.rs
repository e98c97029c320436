//! Mixture NLL sanity: with one neuron the mixture weight is 1 (log weight 0) whatever the
//! logit, so the mixture NLL equals the neuron's plain NLL; with several neurons it equals
//! `−log Σ_z softmax(logits)_z exp(−nll_z)` computed on the host.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::{gauss_layer, GaussLayerConfig};
use gauss_losses::{
    layer_nll, mixture_logits, mixture_nll, mixture_nll_from_components, Reduction,
};

use gauss_tests::gradient_of;

#[test]
fn single_component_mixture_equals_plain_nll() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = GaussLayerConfig {
        gaussian_only: true,
        ..Default::default()
    };
    let layer = gauss_layer(3, 1, cfg, vb.pp("layer"))?;
    let x = Tensor::randn(0.0f64, 2.0, (10, 3), &Device::Cpu)?;
    let plain = layer_nll(&layer, &x, Reduction::None)?
        .squeeze(1)?
        .to_vec1::<f64>()?;
    for logit in [0.0f64, 3.7] {
        let logits = Tensor::new(&[logit], &Device::Cpu)?;
        let mixture = mixture_nll(&layer, &x, &logits, Reduction::None)?.to_vec1::<f64>()?;
        for (m, p) in mixture.iter().zip(&plain) {
            assert!((m - p).abs() <= 1e-12 * p.abs().max(1.0), "{m} vs {p}");
        }
    }
    // The learnable logits start at zero.
    let logits = mixture_logits(1, vb.pp("mixture"))?;
    assert_eq!(logits.to_vec1::<f64>()?, vec![0.0]);
    Ok(())
}

#[test]
fn mixture_matches_host_log_sum_exp_and_is_differentiable() -> Result<()> {
    let components = [[1.0f64, 2.5, 0.2], [30.0, 700.0, 29.5]];
    let logits = [0.3f64, -1.0, 0.5];
    let comp = Tensor::new(&components, &Device::Cpu)?;
    let logits_var = Var::new(&logits, &Device::Cpu)?;
    let got = mixture_nll_from_components(&comp, &logits_var, Reduction::None)?;
    let norm: f64 = logits.iter().map(|l| l.exp()).sum();
    for (row, value) in components.iter().zip(got.to_vec1::<f64>()?) {
        // Shift by the smallest nll so exp does not underflow (the second row is far out).
        let min = row.iter().copied().fold(f64::INFINITY, f64::min);
        let sum: f64 = row
            .iter()
            .zip(&logits)
            .map(|(n, l)| l.exp() / norm * (-(n - min)).exp())
            .sum();
        let expected = min - sum.ln();
        assert!(
            (value - expected).abs() <= 1e-12 * expected.abs(),
            "{value} vs {expected}"
        );
    }
    let mean = mixture_nll_from_components(&comp, &logits_var, Reduction::Mean)?;
    let values = gradient_of(&mean, &logits_var)?.to_vec1::<f64>()?;
    assert!(values.iter().all(|g| g.is_finite()));
    // Softmax gradients sum to zero.
    assert!(values.iter().sum::<f64>().abs() < 1e-12);
    Ok(())
}
