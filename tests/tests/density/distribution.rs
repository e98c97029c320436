//! `MultivariateNormal` (one neuron as a distribution) against SciPy and the closed-form KL:
//! the expected values were computed in f64 by
//! `scipy.stats.multivariate_normal(mean, cov).logpdf(x)` / `.entropy()` (SciPy 1.x) and by
//! `KL = ½[tr(Σq⁻¹Σp) + (μq − μp)ᵀΣq⁻¹(μq − μp) − d + ln det Σq − ln det Σp]` in NumPy
//! (the formula `torch.distributions.kl_divergence` uses for two MultivariateNormals).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gauss_layer::{GaussLayer, GaussLayerConfig, MultivariateNormal, Parameterization};

const MEAN_P: [f64; 3] = [0.5, -1.0, 2.0];
const COV_P: [[f64; 3]; 3] = [[2.0, 0.3, -0.4], [0.3, 1.0, 0.2], [-0.4, 0.2, 0.5]];
const MEAN_Q: [f64; 3] = [-0.25, 0.75, 1.5];
const COV_Q: [[f64; 3]; 3] = [[1.0, -0.2, 0.1], [-0.2, 3.0, 0.6], [0.1, 0.6, 0.8]];
const X: [[f64; 3]; 4] = [
    [0.0, 0.0, 0.0],
    [0.5, -1.0, 2.0],
    [3.0, -2.0, 1.0],
    [-1.5, 0.25, 2.5],
];
const LOG_PROB_P: [f64; 4] = [
    -11.418650824160224,
    -2.5543329830807613,
    -5.129295501821391,
    -4.960629834654975,
];
const ENTROPY_P: f64 = 4.054332983080762;
const ENTROPY_Q: f64 = 4.5917548764243135;
const KL_PQ: f64 = 1.869912937355834;
const KL_QP: f64 = 4.885741524947302;
// Diagonal covariances diag(2, 0.5, 1.5) (p) and diag(1, 1, 3) (q), same means.
const DIAG_LOG_PROB_P: [f64; 4] = [
    -5.355381487001434,
    -2.9595481536681003,
    -5.855381487001434,
    -5.605381487001434,
];
const DIAG_ENTROPY_P: f64 = 4.4595481536681;
const DIAG_KL_PQ: f64 = 2.2007402569466397;

fn normal(
    mean: [f64; 3],
    cov: [[f64; 3]; 3],
    parameterization: Parameterization,
) -> Result<MultivariateNormal> {
    let dev = Device::Cpu;
    Ok(MultivariateNormal::from_covariance(
        &Tensor::new(&mean, &dev)?,
        &Tensor::new(&cov, &dev)?,
        GaussLayerConfig {
            parameterization,
            ..Default::default()
        },
    )?)
}

fn close(got: f64, expected: f64, what: &str) {
    let err = (got - expected).abs() / expected.abs().max(1.0);
    assert!(
        err < 1e-9,
        "{what}: got {got}, expected {expected} ({err:e})"
    );
}

#[test]
fn matches_scipy_and_the_closed_form_kl_in_every_parameterization() -> Result<()> {
    let x = Tensor::new(&X, &Device::Cpu)?;
    let full = [
        Parameterization::Cholesky,
        Parameterization::Direct,
        Parameterization::Expm,
        Parameterization::LowRank { rank: 3 },
    ];
    for parameterization in full {
        let p = normal(MEAN_P, COV_P, parameterization)?;
        let q = normal(MEAN_Q, COV_Q, parameterization)?;
        let log_prob = p.log_prob(&x)?;
        assert_eq!(log_prob.dims(), &[4], "(N), as torch");
        for (got, expected) in log_prob.to_vec1::<f64>()?.iter().zip(LOG_PROB_P) {
            close(*got, expected, &format!("{parameterization} log_prob"));
        }
        close(p.entropy()?.to_scalar()?, ENTROPY_P, "entropy p");
        close(q.entropy()?.to_scalar()?, ENTROPY_Q, "entropy q");
        close(p.kl_divergence(&q)?.to_scalar()?, KL_PQ, "KL(p‖q)");
        close(q.kl_divergence(&p)?.to_scalar()?, KL_QP, "KL(q‖p)");
        let cov = p.covariance()?.to_vec2::<f64>()?;
        let precision = p.precision()?.matmul(&p.covariance()?)?.to_vec2::<f64>()?;
        for i in 0..3 {
            for j in 0..3 {
                close(cov[i][j], COV_P[i][j], "covariance");
                let identity = if i == j { 1.0 } else { 0.0 };
                assert!((precision[i][j] - identity).abs() < 1e-12);
            }
        }
        assert_eq!(p.mean()?.to_vec1::<f64>()?, MEAN_P.to_vec());
    }
    let diagonal = |v: [f64; 3]| [[v[0], 0.0, 0.0], [0.0, v[1], 0.0], [0.0, 0.0, v[2]]];
    for parameterization in [
        Parameterization::Diag,
        Parameterization::LowRank { rank: 1 },
    ] {
        let p = normal(MEAN_P, diagonal([2.0, 0.5, 1.5]), parameterization)?;
        let q = normal(MEAN_Q, diagonal([1.0, 1.0, 3.0]), parameterization)?;
        for (got, expected) in p
            .log_prob(&x)?
            .to_vec1::<f64>()?
            .iter()
            .zip(DIAG_LOG_PROB_P)
        {
            close(*got, expected, &format!("{parameterization} log_prob"));
        }
        close(p.entropy()?.to_scalar()?, DIAG_ENTROPY_P, "diag entropy");
        close(p.kl_divergence(&q)?.to_scalar()?, DIAG_KL_PQ, "diag KL");
    }
    Ok(())
}

#[test]
fn shapes_validation_and_sampling() -> Result<()> {
    let dev = Device::Cpu;
    let p = normal(MEAN_P, COV_P, Parameterization::Cholesky)?;
    assert!(p.validate_args(), "on by default, as torch");
    let batch = Tensor::zeros((2, 5, 3), DType::F64, &dev)?;
    assert_eq!(p.log_prob(&batch)?.dims(), &[2, 5]);
    let nan = Tensor::new(&[[0.0f64, 0.0, 0.0], [0.0, f64::NAN, 1.0]], &dev)?;
    let text = p.log_prob(&nan).unwrap_err().to_string();
    assert!(text.contains("NaN") && text.contains("row 1"), "{text}");
    let unchecked = p.clone().with_validate_args(false).log_prob(&nan)?;
    assert!(unchecked.to_vec1::<f64>()?[1].is_nan());
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let draws = p.sample(20_000, &mut rng)?;
    assert_eq!(draws.dims(), &[20_000, 3]);
    // The sample mean is within 5 standard errors (σ ≤ √2) of the mean.
    let mean = draws.mean(0)?.to_vec1::<f64>()?;
    for (m, expected) in mean.iter().zip(MEAN_P) {
        assert!((m - expected).abs() < 5.0 * 2f64.sqrt() / 20_000f64.sqrt());
    }
    // One neuron of a two-neuron layer is the same distribution.
    let layer = GaussLayer::from_covariance(
        &Tensor::new(&[MEAN_Q, MEAN_P], &dev)?,
        &Tensor::new(&[COV_Q, COV_P], &dev)?,
        GaussLayerConfig::default(),
    )?;
    let second = layer.distribution(1)?;
    close(
        second.entropy()?.to_scalar()?,
        ENTROPY_P,
        "neuron 1 entropy",
    );
    assert!(layer.distribution(2).is_err());
    Ok(())
}

#[test]
fn rsample_carries_gradients_to_the_layer() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let layer = gauss_layer::gauss_layer(
        3,
        2,
        GaussLayerConfig {
            gaussian_only: true,
            ..Default::default()
        },
        vb,
    )?;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let draws = layer.distribution(0)?.rsample(4, &mut rng)?;
    let grads = draws.sum_all()?.backward()?;
    let center = varmap
        .all_vars()
        .into_iter()
        .find(|v| v.dims() == [2, 3])
        .expect("the center variable");
    // d(Σ draws)/dc = n per coordinate for neuron 0, nothing for neuron 1.
    let grad = grads.get(&center).expect("a gradient").to_vec2::<f64>()?;
    assert_eq!(grad, vec![vec![4.0; 3], vec![0.0; 3]]);
    Ok(())
}
