//! `MultivariateNormal` (one neuron as a distribution) against SciPy and the closed-form KL:
//! the expected values were computed in f64 by
//! `scipy.stats.multivariate_normal(mean, cov).logpdf(x)` / `.entropy()` (SciPy 1.x) and by
//! `KL = ½[tr(Σq⁻¹Σp) + (μq − μp)ᵀΣq⁻¹(μq − μp) − d + ln det Σq − ln det Σp]` in NumPy
//! (the formula `torch.distributions.kl_divergence` uses for two MultivariateNormals).
//! The batch view (`MultivariateNormalBatch`, all neurons of a layer) is checked against the
//! same values and those of q printed by `python3 tools/density/batch_reference.py` (SciPy
//! 1.17.1, f64); its sphere case against the closed forms of an isotropic normal.
//! `torch.distributions.MultivariateNormal` (PyTorch 2.15, f64: `log_prob`, `entropy`,
//! `kl_divergence`) gives every constant below to a relative 5e-16
//! (`python3 tools/density/torch_reference.py` recomputes them and compares), so the 1e-9
//! checks here are checks against torch as well.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gauss_layer::testing::tolerance;
use gauss_layer::{
    GaussError, GaussLayer, GaussLayerConfig, MultivariateNormal, MultivariateNormalBatch,
    Parameterization,
};
use gauss_tests::{host_matrix, host_scalar, host_values, on_device};

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
// q's values (tools/density/batch_reference.py): logpdf on X, entropy; diagonal case too.
const LOG_PROB_Q: [f64; 4] = [
    -4.644819103650516,
    -4.243079083179687,
    -9.230284815011828,
    -5.213044538655634,
];
const DIAG_LOG_PROB_Q: [f64; 4] = [
    -3.993621743948073,
    -5.16028841061474,
    -12.41028841061474,
    -4.37903841061474,
];
const DIAG_ENTROPY_Q: f64 = 4.806121743948073;
const DIAG_KL_QP: f64 = 3.689884743053361;

fn normal(
    mean: [f64; 3],
    cov: [[f64; 3]; 3],
    parameterization: Parameterization,
) -> Result<MultivariateNormal> {
    normal_on(mean, cov, parameterization, DType::F64, &Device::Cpu)
}

/// The normal with `cov`, its tensors in `dtype` on `device`.
fn normal_on(
    mean: [f64; 3],
    cov: [[f64; 3]; 3],
    parameterization: Parameterization,
    dtype: DType,
    device: &Device,
) -> Result<MultivariateNormal> {
    let dev = Device::Cpu;
    Ok(MultivariateNormal::from_covariance(
        &on_device(&Tensor::new(&mean, &dev)?, dtype, device)?,
        &on_device(&Tensor::new(&cov, &dev)?, dtype, device)?,
        GaussLayerConfig::with_parameterization(parameterization),
    )?)
}

fn close(got: f64, expected: f64, what: &str) {
    close_to(got, expected, 1e-9, what);
}

fn close_to(got: f64, expected: f64, tol: f64, what: &str) {
    let err = (got - expected).abs() / expected.abs().max(1.0);
    assert!(
        err < tol,
        "{what}: got {got}, expected {expected} ({err:e})"
    );
}

// On each enabled device, in each float dtype it has (f32 to 1e-4: the inputs are rounded
// to f32 as well as the arithmetic).
gauss_layer::test_device_dtypes!(
    matches_scipy_and_the_closed_form_kl_in_every_parameterization,
    matches_references
);

fn matches_references(dtype: DType, device: &Device) -> Result<()> {
    let tol = tolerance(dtype);
    let close = |got: f64, expected: f64, what: &str| {
        close_to(got, expected, tol, &format!("{dtype:?} {what}"))
    };
    let normal =
        |mean, cov, parameterization| normal_on(mean, cov, parameterization, dtype, device);
    let x = on_device(&Tensor::new(&X, &Device::Cpu)?, dtype, device)?;
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
        for (got, expected) in host_values(&log_prob)?.iter().zip(LOG_PROB_P) {
            close(*got, expected, &format!("{parameterization} log_prob"));
        }
        close(host_scalar(&p.entropy()?)?, ENTROPY_P, "entropy p");
        close(host_scalar(&q.entropy()?)?, ENTROPY_Q, "entropy q");
        close(host_scalar(&p.kl_divergence(&q)?)?, KL_PQ, "KL(p‖q)");
        close(host_scalar(&q.kl_divergence(&p)?)?, KL_QP, "KL(q‖p)");
        let cov = host_matrix(&p.covariance()?)?;
        let precision = host_matrix(&p.precision()?.matmul(&p.covariance()?)?)?;
        for i in 0..3 {
            for j in 0..3 {
                close(cov[i][j], COV_P[i][j], "covariance");
                let identity = if i == j { 1.0 } else { 0.0 };
                let identity_tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                assert!((precision[i][j] - identity).abs() < identity_tol);
            }
        }
        assert_eq!(host_values(&p.mean()?)?, MEAN_P.to_vec());
    }
    let diagonal = |v: [f64; 3]| [[v[0], 0.0, 0.0], [0.0, v[1], 0.0], [0.0, 0.0, v[2]]];
    for parameterization in [
        Parameterization::Diag,
        Parameterization::LowRank { rank: 1 },
    ] {
        let p = normal(MEAN_P, diagonal([2.0, 0.5, 1.5]), parameterization)?;
        let q = normal(MEAN_Q, diagonal([1.0, 1.0, 3.0]), parameterization)?;
        for (got, expected) in host_values(&p.log_prob(&x)?)?.iter().zip(DIAG_LOG_PROB_P) {
            close(*got, expected, &format!("{parameterization} log_prob"));
        }
        close(host_scalar(&p.entropy()?)?, DIAG_ENTROPY_P, "diag entropy");
        close(host_scalar(&p.kl_divergence(&q)?)?, DIAG_KL_PQ, "diag KL");
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
    // An index past the last neuron is an index error (it was `InvalidConfig`, but an index
    // is not a config), naming the index and the count.
    match layer.distribution(2) {
        Err(
            err @ GaussError::IndexOutOfRange {
                index: 2, len: 2, ..
            },
        ) => assert_eq!(
            err.to_string(),
            "neuron of the layer: index 2 is out of range for 2"
        ),
        other => panic!("expected IndexOutOfRange, got {:?}", other.map(|_| ())),
    }
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

fn batch(
    means: [[f64; 3]; 2],
    covariances: [[[f64; 3]; 3]; 2],
    parameterization: Parameterization,
) -> Result<MultivariateNormalBatch> {
    let dev = Device::Cpu;
    Ok(MultivariateNormalBatch::from_covariance(
        &Tensor::new(&means, &dev)?,
        &Tensor::new(&covariances, &dev)?,
        GaussLayerConfig::with_parameterization(parameterization),
    )?)
}

/// The expected values of one batch [p, q]: log-densities of X under p and q, entropies,
/// KL(p‖q) and KL(q‖p).
struct BatchCase {
    log_prob: [[f64; 4]; 2],
    entropy: [f64; 2],
    kl: [f64; 2],
}

/// Checks the batch [p, q] (and [q, p] for the elementwise KL) against `case`.
fn check_batch(
    pq: &MultivariateNormalBatch,
    qp: &MultivariateNormalBatch,
    case: &BatchCase,
    what: &str,
) -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::new(&X, &dev)?;
    // Every sample under every member: (4, d) → (4, 2).
    let all = pq.log_prob_all(&x)?;
    assert_eq!(all.dims(), &[4, 2]);
    for (i, row) in all.to_vec2::<f64>()?.iter().enumerate() {
        close(
            row[0],
            case.log_prob[0][i],
            &format!("{what} log_prob_all p"),
        );
        close(
            row[1],
            case.log_prob[1][i],
            &format!("{what} log_prob_all q"),
        );
    }
    // torch's batch semantics: x (4, 2, d), p scores X[i], q scores X[3 − i].
    let reversed = Tensor::new(&[X[3], X[2], X[1], X[0]], &dev)?;
    let paired = Tensor::stack(&[&x, &reversed], 1)?;
    let log_prob = pq.log_prob(&paired)?;
    assert_eq!(log_prob.dims(), &[4, 2]);
    for (i, row) in log_prob.to_vec2::<f64>()?.iter().enumerate() {
        close(row[0], case.log_prob[0][i], &format!("{what} log_prob p"));
        close(
            row[1],
            case.log_prob[1][3 - i],
            &format!("{what} log_prob q"),
        );
    }
    // Leading dimensions are kept: (2, 2, 2, d) → (2, 2, 2).
    let nested = pq.log_prob(&paired.reshape((2, 2, 2, 3))?)?;
    assert_eq!(nested.dims(), &[2, 2, 2]);
    assert_eq!(
        nested.flatten_all()?.to_vec1::<f64>()?,
        log_prob.flatten_all()?.to_vec1::<f64>()?
    );
    let entropy = pq.entropy()?.to_vec1::<f64>()?;
    close(entropy[0], case.entropy[0], &format!("{what} entropy p"));
    close(entropy[1], case.entropy[1], &format!("{what} entropy q"));
    let kl = pq.kl_divergence(qp)?.to_vec1::<f64>()?;
    close(kl[0], case.kl[0], &format!("{what} KL(p‖q)"));
    close(kl[1], case.kl[1], &format!("{what} KL(q‖p)"));
    Ok(())
}

#[test]
fn batch_view_matches_scipy_and_the_closed_form_kl() -> Result<()> {
    let full_case = BatchCase {
        log_prob: [LOG_PROB_P, LOG_PROB_Q],
        entropy: [ENTROPY_P, ENTROPY_Q],
        kl: [KL_PQ, KL_QP],
    };
    for parameterization in [
        Parameterization::Cholesky,
        Parameterization::Direct,
        Parameterization::Expm,
        Parameterization::LowRank { rank: 3 },
    ] {
        let pq = batch([MEAN_P, MEAN_Q], [COV_P, COV_Q], parameterization)?;
        let qp = batch([MEAN_Q, MEAN_P], [COV_Q, COV_P], parameterization)?;
        check_batch(&pq, &qp, &full_case, &parameterization.to_string())?;
        assert_eq!((pq.batch_size(), pq.dim()), (2, 3));
        assert_eq!(
            pq.mean()?.to_vec2::<f64>()?,
            vec![MEAN_P.to_vec(), MEAN_Q.to_vec()]
        );
        let covariance = pq.covariance()?;
        assert_eq!(covariance.dims(), &[2, 3, 3]);
        let covariance = covariance.to_vec3::<f64>()?;
        let identity = pq
            .precision()?
            .matmul(&pq.covariance()?)?
            .to_vec3::<f64>()?;
        for (z, expected) in [COV_P, COV_Q].iter().enumerate() {
            for i in 0..3 {
                for j in 0..3 {
                    close(covariance[z][i][j], expected[i][j], "covariance");
                    let eye = if i == j { 1.0 } else { 0.0 };
                    assert!((identity[z][i][j] - eye).abs() < 1e-12);
                }
            }
        }
    }
    let diagonal = |v: [f64; 3]| [[v[0], 0.0, 0.0], [0.0, v[1], 0.0], [0.0, 0.0, v[2]]];
    let (diag_p, diag_q) = (diagonal([2.0, 0.5, 1.5]), diagonal([1.0, 1.0, 3.0]));
    let diag_case = BatchCase {
        log_prob: [DIAG_LOG_PROB_P, DIAG_LOG_PROB_Q],
        entropy: [DIAG_ENTROPY_P, DIAG_ENTROPY_Q],
        kl: [DIAG_KL_PQ, DIAG_KL_QP],
    };
    for parameterization in [
        Parameterization::Diag,
        Parameterization::LowRank { rank: 1 },
        Parameterization::Cholesky,
    ] {
        let pq = batch([MEAN_P, MEAN_Q], [diag_p, diag_q], parameterization)?;
        let qp = batch([MEAN_Q, MEAN_P], [diag_q, diag_p], parameterization)?;
        check_batch(
            &pq,
            &qp,
            &diag_case,
            &format!("diagonal {parameterization}"),
        )?;
    }
    // sphere, σ² = 2 (p) and 0.5 (q), against the closed forms of an isotropic normal:
    // log p(x) = −|x − μ|²/(2σ²) − (d/2)·ln(2πσ²), H = (d/2)·(1 + ln(2πσ²)),
    // KL(p‖q) = ½·[d·σp²/σq² + |μq − μp|²/σq² − d + d·ln(σq²/σp²)].
    let (vp, vq, d) = (2.0f64, 0.5f64, 3.0f64);
    let ln_2pi = (2.0 * std::f64::consts::PI).ln();
    let sq = |a: [f64; 3], b: [f64; 3]| (0..3).map(|i| (a[i] - b[i]).powi(2)).sum::<f64>();
    let log_density = |x: [f64; 3], mean: [f64; 3], v: f64| {
        -sq(x, mean) / (2.0 * v) - 0.5 * d * (ln_2pi + v.ln())
    };
    let kl = |va: f64, vb: f64, ma: [f64; 3], mb: [f64; 3]| {
        0.5 * (d * va / vb + sq(mb, ma) / vb - d + d * (vb / va).ln())
    };
    let sphere_case = BatchCase {
        log_prob: [
            X.map(|x| log_density(x, MEAN_P, vp)),
            X.map(|x| log_density(x, MEAN_Q, vq)),
        ],
        entropy: [
            0.5 * d * (1.0 + ln_2pi + vp.ln()),
            0.5 * d * (1.0 + ln_2pi + vq.ln()),
        ],
        kl: [kl(vp, vq, MEAN_P, MEAN_Q), kl(vq, vp, MEAN_Q, MEAN_P)],
    };
    let (sphere_p, sphere_q) = (diagonal([vp; 3]), diagonal([vq; 3]));
    let pq = batch(
        [MEAN_P, MEAN_Q],
        [sphere_p, sphere_q],
        Parameterization::Sphere,
    )?;
    let qp = batch(
        [MEAN_Q, MEAN_P],
        [sphere_q, sphere_p],
        Parameterization::Sphere,
    )?;
    check_batch(&pq, &qp, &sphere_case, "sphere")?;
    Ok(())
}

#[test]
fn batch_view_shapes_errors_and_sampling() -> Result<()> {
    let dev = Device::Cpu;
    let pq = batch([MEAN_P, MEAN_Q], [COV_P, COV_Q], Parameterization::Cholesky)?;
    assert!(pq.validate_args(), "on by default, as torch");
    // log_prob takes one sample per member: (…, Z, d).
    let text = pq
        .log_prob(&Tensor::zeros((4, 3), DType::F64, &dev)?)
        .unwrap_err()
        .to_string();
    assert!(text.contains("(…, 2, 3)"), "{text}");
    let empty = pq.log_prob(&Tensor::zeros((0, 2, 3), DType::F64, &dev)?)?;
    assert_eq!(empty.dims(), &[0, 2]);
    let nan = Tensor::new(&[[[0.0f64, 0.0, 0.0], [0.0, f64::NAN, 1.0]]], &dev)?;
    let text = pq.log_prob(&nan).unwrap_err().to_string();
    assert!(text.contains("NaN"), "{text}");
    let unchecked = pq.clone().with_validate_args(false).log_prob(&nan)?;
    let unchecked = unchecked.to_vec2::<f64>()?;
    assert!(unchecked[0][0].is_finite() && unchecked[0][1].is_nan());
    // KL between batches of different sizes is an error.
    let one = normal(MEAN_P, COV_P, Parameterization::Cholesky)?;
    let text = pq.kl_divergence(one.as_batch()).unwrap_err().to_string();
    assert!(text.contains("(2, 3)"), "{text}");

    // A layer with a linear part: its Gaussians; member z is `layer.distribution(z)`.
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let layer = gauss_layer::gauss_layer(3, 4, GaussLayerConfig::default(), vb)?;
    let all = layer.distributions()?;
    assert_eq!((all.batch_size(), all.dim()), (4, 3));
    let entropy = all.entropy()?.to_vec1::<f64>()?;
    for (z, value) in entropy.iter().enumerate() {
        let single = layer.distribution(z)?.entropy()?.to_scalar::<f64>()?;
        close(single, *value, "member entropy");
    }

    // Draws: (n, Z, d), the layer's own draws for the same seed; sample means within 5
    // standard errors (σ ≤ √3) of the means.
    let seeded = || <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(4);
    let draws = pq.sample(20_000, &mut seeded())?;
    assert_eq!(draws.dims(), &[20_000, 2, 3]);
    let own = pq.layer().sample(20_000, &mut seeded())?;
    assert_eq!(
        draws.flatten_all()?.to_vec1::<f64>()?,
        own.flatten_all()?.to_vec1::<f64>()?
    );
    let means = draws.mean(0)?.to_vec2::<f64>()?;
    for (got, expected) in means.iter().zip([MEAN_P, MEAN_Q]) {
        for i in 0..3 {
            assert!((got[i] - expected[i]).abs() < 5.0 * 3f64.sqrt() / 20_000f64.sqrt());
        }
    }
    Ok(())
}

#[test]
fn an_indefinite_direct_precision_is_an_error_not_nan() -> Result<()> {
    // (A + Aᵀ)/2 = [[1, 2], [2, 1]] has eigenvalues 3 and −1: no density. Every method that
    // needs P⁻¹ or log det P says so, as log_prob and sample do, instead of returning NaN.
    let dev = Device::Cpu;
    let config = GaussLayerConfig::with_parameterization(Parameterization::Direct);
    let raw = Tensor::new(&[[[1.0f64, 2.0], [2.0, 1.0]]], &dev)?;
    let precision = gauss_layer::Precision::from_raw(raw, 2, &config)?;
    let center = Tensor::zeros((1, 2), DType::F64, &dev)?;
    let config = GaussLayerConfig {
        gaussian_only: true,
        ..config
    };
    let layer = GaussLayer::new(None, None, center, precision, config)?;
    let batch = layer.distributions()?;
    let fine = batch_2d()?;
    let refused = [
        ("entropy", batch.entropy().map(|_| ())),
        ("kl (self)", batch.kl_divergence(&fine).map(|_| ())),
        ("kl (other)", fine.kl_divergence(&batch).map(|_| ())),
        (
            "one member's entropy",
            layer.distribution(0)?.entropy().map(|_| ()),
        ),
    ];
    for (what, result) in refused {
        match result {
            Err(gauss_layer::GaussError::NotPositiveDefinite { .. }) => {}
            other => panic!("{what}: expected NotPositiveDefinite, got {other:?}"),
        }
    }
    Ok(())
}

/// One standard normal in 2-D, as a batch of one.
fn batch_2d() -> Result<MultivariateNormalBatch> {
    let dev = Device::Cpu;
    Ok(MultivariateNormalBatch::from_covariance(
        &Tensor::zeros((1, 2), DType::F64, &dev)?,
        &Tensor::new(&[[[1.0f64, 0.0], [0.0, 1.0]]], &dev)?,
        GaussLayerConfig::default(),
    )?)
}

gauss_layer::test_device_dtypes!(
    layer_log_prob_of_infinite_samples_is_minus_infinity,
    infinite_samples
);

/// A sample holding ±∞ (and no NaN) has log-density −∞ under every normal: the density
/// views said so, but `GaussLayer::log_prob` and `log_prob_validated` (which checks only for
/// NaN) gave NaN, through every kernel (`∞ − ∞` in the distances). All three paths agree
/// now, for every parameterization; the finite row keeps its value, the layer's gradient
/// stays finite (the ∞ never enters the computation), and a NaN row still gives NaN.
fn infinite_samples(dtype: DType, dev: &Device) -> Result<()> {
    let inf = f64::INFINITY;
    let x = on_device(
        &Tensor::new(
            &[[inf, 0.0f64], [-inf, 1.0], [0.5, -1.0], [inf, -inf]],
            &Device::Cpu,
        )?,
        dtype,
        dev,
    )?;
    for parameterization in Parameterization::ALL {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, dev);
        let config = GaussLayerConfig {
            gaussian_only: true,
            ..GaussLayerConfig::with_parameterization(parameterization)
        };
        let layer = gauss_layer::gauss_layer(2, 2, config, vb)?;
        let log_prob = layer.log_prob(&x)?;
        let plain = host_matrix(&log_prob)?;
        let validated = host_matrix(&layer.log_prob_validated(&x)?)?;
        let single = host_values(&layer.distribution(1)?.log_prob(&x)?)?;
        for row in [0, 1, 3] {
            assert_eq!(
                plain[row],
                [-inf, -inf],
                "{parameterization} {dtype:?} row {row}"
            );
            assert_eq!(validated[row], [-inf, -inf], "{parameterization} {dtype:?}");
            assert_eq!(single[row], -inf, "{parameterization} {dtype:?} row {row}");
        }
        // The finite row: the same under every path, and as computed alone.
        let alone = host_matrix(&layer.log_prob(&x.narrow(0, 2, 1)?)?)?;
        assert!(plain[2].iter().all(|v| v.is_finite()), "{parameterization}");
        let close = |got: f64, expected: f64| {
            (got - expected).abs() <= tolerance(dtype) * expected.abs().max(1.0)
        };
        for z in 0..2 {
            assert!(
                close(plain[2][z], alone[0][z]),
                "{parameterization} {dtype:?}"
            );
            assert!(
                close(validated[2][z], alone[0][z]),
                "{parameterization} {dtype:?}"
            );
        }
        assert!(
            close(single[2], alone[0][1]),
            "{parameterization} {dtype:?}"
        );
        // No NaN reaches the gradient from the infinite rows.
        let grads = log_prob.sum_all()?.backward()?;
        for var in varmap.all_vars() {
            if let Some(grad) = grads.get(var.as_tensor()) {
                let values = host_values(grad)?;
                assert!(
                    values.iter().all(|g| g.is_finite()),
                    "{parameterization} {dtype:?}: {values:?}"
                );
            }
        }
        // NaN stays NaN (not −∞): a NaN sample has no density.
        let nan = on_device(&Tensor::new(&[[f64::NAN, inf]], &Device::Cpu)?, dtype, dev)?;
        let nan = host_values(&layer.log_prob(&nan)?)?;
        assert!(
            nan.iter().all(|v| v.is_nan()),
            "{parameterization}: {nan:?}"
        );
    }
    Ok(())
}
