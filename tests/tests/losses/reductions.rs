//! Reductions over the right axis with the right accumulator: f16 and bf16 losses are summed
//! in f32 (Candle's CPU sum accumulates in the tensor's dtype, and a running sum of 8 or 11
//! significant bits stops growing long before a training batch is summed), and the
//! log-determinant of a batch of triangular factors sums each matrix's own diagonal whatever
//! the batch rank. Expected values are closed forms (n equal terms; `2 Σ log |L_ii|` of
//! diagonal matrices; `ln C` for uniform logits).

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gauss_layer::{GaussError, GaussLayer, GaussLayerConfig, Parameterization, Precision};
use gauss_losses::{
    checked_cross_entropy, log_det_from_triangular, weight_l2, weight_l2_of_layers, LambdaLoss,
    Reduction,
};

fn host(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}

/// Relative tolerance of one rounding to `dtype` plus the rounding of a few f32 operations.
fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1e-2,
        _ => 2e-3,
    }
}

fn assert_rel(got: f32, expected: f32, dtype: DType, what: &str) {
    assert!(
        (got - expected).abs() <= tol(dtype) * expected.abs(),
        "{dtype:?} {what}: got {got}, expected {expected}"
    );
}

/// Mean and sum over a batch of n equal per-sample losses `v` (exact in both dtypes):
/// `v` and `n·v`. Summed in bf16 itself, 1000 terms of 10.3125 came to 4096 (mean 4.1);
/// in f16, 5000 terms came to 32768 (mean 6.6).
#[test]
fn half_precision_batch_reductions_accumulate_in_f32() -> Result<()> {
    let v = 10.3125f32;
    for (dtype, n) in [(DType::BF16, 1000usize), (DType::F16, 5000)] {
        let per_sample = Var::from_tensor(&Tensor::full(v, n, &Device::Cpu)?.to_dtype(dtype)?)?;
        let mean = Reduction::Mean.apply(&per_sample)?;
        assert_eq!(mean.dtype(), dtype);
        assert_rel(host(&mean)?, v, dtype, "mean");
        // d mean / d sample = 1/n, through the widening casts and back in the dtype.
        let grads = mean.backward()?;
        let grad = grads.get(&per_sample).expect("the samples have a gradient");
        assert_eq!(grad.dtype(), dtype);
        for g in grad.to_dtype(DType::F32)?.to_vec1::<f32>()? {
            assert_rel(g, 1.0 / n as f32, dtype, "mean gradient");
        }
        let sum = Reduction::Sum.apply(&per_sample)?;
        assert_eq!(sum.dtype(), dtype);
        assert_rel(host(&sum)?, n as f32 * v, dtype, "sum");
    }
    Ok(())
}

/// Uniform logits over C classes: the cross-entropy is `ln C` whatever the targets; with
/// 1000 rows the bf16 loss came to 0.51, the f16 one (5000 rows) to 0.33 of it.
#[test]
fn half_precision_cross_entropy_accumulates_in_f32() -> Result<()> {
    for (dtype, n) in [(DType::BF16, 1000usize), (DType::F16, 5000)] {
        let logits = Tensor::zeros((n, 4), dtype, &Device::Cpu)?;
        let targets: Vec<u32> = (0..n as u32).map(|i| i % 4).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu)?;
        let logits = Var::from_tensor(&logits)?;
        let loss = checked_cross_entropy(&logits, &targets)?;
        assert_eq!(loss.dtype(), dtype);
        assert_rel(host(&loss)?, 4f32.ln(), dtype, "cross-entropy");
        // d loss / d logit[b, c] = (softmax − one-hot)/n = (1/4 − [c = t_b])/n.
        let grads = loss.backward()?;
        let grad = grads.get(&logits).expect("the logits have a gradient");
        assert_eq!(grad.dtype(), dtype);
        let grad = grad.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (b, row) in grad.iter().enumerate() {
            for (c, g) in row.iter().enumerate() {
                let one_hot = if c == b % 4 { 1.0 } else { 0.0 };
                let expected = (0.25 - one_hot) / n as f32;
                assert_rel(*g, expected, dtype, "cross-entropy gradient");
            }
        }
    }
    Ok(())
}

/// A diag layer of Z × 64 weights all `w` in half precision (θ = 0).
fn half_precision_layer(z: usize, w: f32, dtype: DType) -> Result<GaussLayer> {
    let d = 64;
    let config = GaussLayerConfig::with_parameterization(Parameterization::Diag);
    let raw = Tensor::zeros((z, d), dtype, &Device::Cpu)?;
    let precision = Precision::from_raw(raw, d, &config)?;
    let weight = Tensor::full(w, (z, d), &Device::Cpu)?.to_dtype(dtype)?;
    let bias = Tensor::zeros(z, dtype, &Device::Cpu)?;
    let center = Tensor::zeros((z, d), dtype, &Device::Cpu)?;
    Ok(GaussLayer::new(
        Some(weight),
        Some(bias),
        center,
        precision,
        config,
    )?)
}

/// The weight L2 is the mean of the squares: 0.0025 for 64 × 64 weights all 0.05 (bf16
/// summed its 4096 squares to about 1, a mean of 2.4e-4), and 1 for 1100 × 64 weights all 1
/// (their sum, 70400, is past f16's largest value: rounded back before the division, the
/// mean was ∞).
#[test]
fn half_precision_weight_l2_accumulates_in_f32() -> Result<()> {
    for dtype in [DType::BF16, DType::F16] {
        for (z, w, expected) in [(64usize, 0.05f32, 0.0025f32), (1100, 1.0, 1.0)] {
            let l2 = weight_l2(&half_precision_layer(z, w, dtype)?)?;
            assert_eq!(l2.dtype(), dtype);
            assert_rel(
                host(&l2)?,
                expected,
                dtype,
                &format!("weight L2 of {z} neurons"),
            );
        }
    }
    Ok(())
}

/// 2000 diag neurons with θ = 0 (P = I): every per-neuron trace term `tr Σ/d` is 1, and so is
/// their mean (bf16 stalled its sum at 256, a mean of 0.128). With θ = −4 each term is e⁴ and
/// their sum, 1.1e5, is past f16's largest value (rounded back before the division, the mean
/// was ∞).
#[test]
fn half_precision_lambda_pooling_accumulates_in_f32() -> Result<()> {
    let (z, d) = (2000usize, 2usize);
    for dtype in [DType::BF16, DType::F16] {
        for theta in [0.0f32, -4.0] {
            let config = GaussLayerConfig {
                gaussian_only: true,
                ..GaussLayerConfig::with_parameterization(Parameterization::Diag)
            };
            let raw = Tensor::full(theta, (z, d), &Device::Cpu)?.to_dtype(dtype)?;
            let precision = Precision::from_raw(raw, d, &config)?;
            let center = Tensor::zeros((z, d), dtype, &Device::Cpu)?;
            let layer = GaussLayer::new(None, None, center, precision, config)?;
            let lambda = LambdaLoss::TraceCovariance.of_layers([&layer])?;
            assert_eq!(lambda.dtype(), dtype);
            let expected = (-theta).exp();
            assert_rel(
                host(&lambda)?,
                expected,
                dtype,
                &format!("λ-loss at θ = {theta}"),
            );
        }
    }
    Ok(())
}

/// Each neuron's own term: a default cholesky layer over d = 300 inputs (no perturbation) has
/// P ≈ I/d, so Σ ≈ d·I and tr Σ ≈ d² = 90000, past f16's 65504, while the term tr Σ/d ≈ 300
/// is not. Formed in f16 the trace was ∞ (and the FGN objective with it). Expected: the
/// closed forms of a diagonal factor L, from its stored (rounded) diagonal in f64:
/// tr Σ/d = mean 1/L_ii², log det Σ = −2 Σ ln L_ii, −tr P/d = −mean L_ii².
#[test]
fn half_precision_lambda_terms_do_not_overflow_on_wide_layers() -> Result<()> {
    let (z, d) = (3usize, 300usize);
    let mut config = GaussLayerConfig::with_parameterization(Parameterization::Cholesky);
    config.init.perturbation = 0.0;
    for dtype in [DType::F16, DType::BF16] {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let layer = gauss_layer::gauss_layer(d, z, config.clone(), vb)?;
        let factor = layer.precision().factor()?.expect("cholesky has a factor");
        // f64: the closed forms, on the host.
        let diagonal = gauss_layer::ops::diagonal(&factor)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        assert!(diagonal.iter().flatten().all(|&l| l > 0.0));
        for variant in LambdaLoss::ALL {
            let expected: Vec<f32> = diagonal
                .iter()
                .map(|l| {
                    let n = l.len() as f64;
                    (match variant {
                        LambdaLoss::TraceCovariance => {
                            l.iter().map(|v| 1.0 / (v * v)).sum::<f64>() / n
                        }
                        LambdaLoss::LogdetCovariance => {
                            -2.0 * l.iter().map(|v| v.ln()).sum::<f64>()
                        }
                        LambdaLoss::NegTracePrecision => -l.iter().map(|v| v * v).sum::<f64>() / n,
                    }) as f32
                })
                .collect();
            assert!(expected[0].abs() > 0.0 && expected[0].is_finite());
            let terms = variant.per_neuron(layer.precision())?;
            // The functional core, from the factor L itself, gives the same.
            let from_factor = variant.per_neuron_from_factor(&factor)?;
            for (what, got) in [("per neuron", terms), ("from the factor", from_factor)] {
                assert_eq!(got.dtype(), dtype);
                let got = got.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                for (g, e) in got.iter().zip(&expected) {
                    assert_rel(*g, *e, dtype, &format!("{variant} {what}"));
                }
            }
        }
    }
    Ok(())
}

/// One mean has one dtype: layers of f32 and bf16 are refused with the layer named, not
/// with Candle's "dtype mismatch in add".
#[test]
fn pooled_losses_refuse_layers_of_different_dtypes() -> Result<()> {
    let f32_layer = half_precision_layer(2, 1.0, DType::F32)?;
    let bf16_layer = half_precision_layer(2, 1.0, DType::BF16)?;
    let layers = [&f32_layer, &bf16_layer];
    for error in [
        weight_l2_of_layers(layers).unwrap_err(),
        LambdaLoss::TraceCovariance.of_layers(layers).unwrap_err(),
    ] {
        assert!(matches!(error, GaussError::DType { .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("of layer 1") && message.contains("BF16"),
            "{message}"
        );
    }
    Ok(())
}

/// `log det (L Lᵀ) = 2 Σ_i log |L_ii|` per matrix, for any batch rank: a (1, 2, 2, 2) batch
/// holding diag(2, −3) and I gives [[2 ln 6, 0]] (it summed over the neuron axis before,
/// [[2 ln 2, 2 ln 3]]), and one (2, 2) matrix gives the scalar 2 ln 6 (an error before).
#[test]
fn log_det_from_triangular_sums_each_matrix_diagonal() -> Result<()> {
    // f64: host tensors; the expected values are f64 closed forms.
    let batch = Tensor::new(
        &[[[[2.0f64, 0.0], [0.5, -3.0]], [[1.0, 0.0], [0.0, 1.0]]]],
        &Device::Cpu,
    )?;
    let got = log_det_from_triangular(&batch)?.to_vec2::<f64>()?;
    let expected = 2.0 * 6f64.ln();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].len(), 2);
    assert!((got[0][0] - expected).abs() <= 1e-12 * expected, "{got:?}");
    assert!(got[0][1].abs() <= 1e-15, "{got:?}");

    let single = log_det_from_triangular(&batch.get(0)?.get(0)?)?;
    assert_eq!(single.dims(), &[] as &[usize]);
    let single = single.to_scalar::<f64>()?;
    assert!((single - expected).abs() <= 1e-12 * expected, "{single}");
    Ok(())
}
