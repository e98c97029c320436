//! Round trips of every parameterization against closed forms (eigenvalues from faer).

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::config::GaussLayerConfig;
use crate::linalg::host;
use crate::testing::relative_error;

fn config(parameterization: Parameterization, width_floor: Option<f64>) -> GaussLayerConfig {
    GaussLayerConfig {
        precision: PrecisionConfig {
            parameterization,
            width_floor,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A random SPD (or diagonal / scaled identity) batch for a parameterization.
fn random_precision(parameterization: Parameterization, z: usize, d: usize) -> Tensor {
    let dev = Device::Cpu;
    match parameterization {
        Parameterization::Diag => linalg::diag_embed(
            &Tensor::randn(0f64, 1.0, (z, d), &dev)
                .unwrap()
                .exp()
                .unwrap(),
        )
        .unwrap(),
        Parameterization::Sphere => {
            let s = Tensor::randn(0f64, 1.0, (z, 1, 1), &dev)
                .unwrap()
                .exp()
                .unwrap();
            Tensor::eye(d, DType::F64, &dev)
                .unwrap()
                .broadcast_mul(&s)
                .unwrap()
        }
        // δ I plus rank 2: what lowrank:2 represents exactly.
        Parameterization::LowRank { rank } => {
            let u = Tensor::randn(0f64, 0.5, (z, d, rank), &dev).unwrap();
            let eye = (Tensor::eye(d, DType::F64, &dev).unwrap() * 0.7).unwrap();
            linalg::gram(&u).unwrap().broadcast_add(&eye).unwrap()
        }
        _ => {
            let a = Tensor::randn(0f64, 0.5, (z, d, d), &dev).unwrap();
            let eye = Tensor::eye(d, DType::F64, &dev).unwrap();
            linalg::gram(&a).unwrap().broadcast_add(&eye).unwrap()
        }
    }
}

/// Host reference: eigenvalues of each symmetric block.
fn eigenvalues(matrices: &Tensor) -> Vec<Vec<f64>> {
    let (z, d, values) = host::to_host_matrices(matrices, "m").unwrap();
    (0..z)
        .map(|n| {
            let block = host::symmetric_block(&values[n * d * d..(n + 1) * d * d], d);
            host::symmetric_eigen(&block, n).unwrap().0
        })
        .collect()
}

#[test]
fn every_parameterization_round_trips_and_is_consistent() {
    let (z, d) = (3, 5);
    for parameterization in Parameterization::ALL {
        for width_floor in [None, Some(0.3)] {
            if width_floor.is_some() && matches!(parameterization, Parameterization::LowRank { .. })
            {
                continue; // not supported with lowrank (a config error, tested in config.rs)
            }
            let cfg = config(parameterization, width_floor);
            // Under a width floor the matrix handed in is the effective precision; keep it
            // wider than the floor allows by shrinking it.
            let mut p = random_precision(parameterization, z, d);
            if let Some(s) = width_floor {
                let biggest = eigenvalues(&p)
                    .iter()
                    .flatten()
                    .fold(0.0f64, |m, v| m.max(*v));
                p = (p * (0.5 / (s * s * biggest))).unwrap();
            }
            let what = format!("{parameterization} floor {width_floor:?}");
            let precision = Precision::from_precision_matrix(&p, &cfg).unwrap();
            let back = precision.precision_matrix().unwrap();
            assert!(
                relative_error(&back, &p).unwrap() < 1e-10,
                "{what}: P round trip"
            );

            // S P = I.
            let s = precision.covariance_matrix().unwrap();
            let eye = Tensor::eye(d, DType::F64, &Device::Cpu)
                .unwrap()
                .broadcast_as((z, d, d))
                .unwrap();
            let product = linalg::matmul(&s, &p).unwrap();
            assert!(
                relative_error(&product, &eye).unwrap() < 1e-9,
                "{what}: S P = I"
            );

            // log det and traces against the eigenvalues (closed forms).
            let eig = eigenvalues(&p);
            let log_det: Vec<f64> = eig.iter().map(|e| e.iter().map(|l| l.ln()).sum()).collect();
            let tr_s: Vec<f64> = eig
                .iter()
                .map(|e| e.iter().map(|l| 1.0 / l).sum())
                .collect();
            let tr_p: Vec<f64> = eig.iter().map(|e| e.iter().sum()).collect();
            let t = |v: Vec<f64>| Tensor::new(v, &Device::Cpu).unwrap();
            assert!(
                relative_error(&precision.log_det_precision().unwrap(), &t(log_det)).unwrap()
                    < 1e-9,
                "{what}: log det"
            );
            assert!(
                relative_error(&precision.trace_covariance().unwrap(), &t(tr_s)).unwrap() < 1e-9,
                "{what}: tr S"
            );
            assert!(
                relative_error(&precision.trace_precision().unwrap(), &t(tr_p)).unwrap() < 1e-9,
                "{what}: tr P"
            );

            // The factor reproduces P.
            if let Some(f) = precision.factor().unwrap() {
                assert!(
                    relative_error(&linalg::gram(&f).unwrap(), &p).unwrap() < 1e-9,
                    "{what}: F Fᵀ"
                );
            }
            if let Some(diag) = precision.diagonal_precision().unwrap() {
                assert!(
                    relative_error(&diag, &linalg::diagonal(&p).unwrap()).unwrap() < 1e-12,
                    "{what}: diagonal"
                );
            }
        }
    }
}

#[test]
fn width_floor_adds_to_the_covariance() {
    // diag: p = e^θ, σ = 0.5: effective variance e^{−θ} + 0.25 (closed form).
    let cfg = config(Parameterization::Diag, Some(0.5));
    let raw = Tensor::new(&[[0.0f64, 2.0, -1.0]], &Device::Cpu).unwrap();
    let precision = Precision::from_raw(raw, 3, &cfg).unwrap();
    let p = precision
        .diagonal_precision()
        .unwrap()
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    for (got, theta) in p[0].iter().zip([0.0f64, 2.0, -1.0]) {
        let expected = 1.0 / ((-theta).exp() + 0.25);
        assert!((got - expected).abs() < 1e-14 * expected);
    }
    // Full forms: covariance = S_base + σ² I.
    let cfg = config(Parameterization::Cholesky, Some(0.5));
    let raw = Tensor::randn(0f64, 1.0, (2, 4, 4), &Device::Cpu).unwrap();
    let floored = Precision::from_raw(raw.clone(), 4, &cfg).unwrap();
    let base = Precision::from_raw(raw, 4, &config(Parameterization::Cholesky, None)).unwrap();
    let eye = (Tensor::eye(4, DType::F64, &Device::Cpu).unwrap() * 0.25).unwrap();
    let expected = base
        .covariance_matrix()
        .unwrap()
        .broadcast_add(&eye)
        .unwrap();
    assert!(relative_error(&floored.covariance_matrix().unwrap(), &expected).unwrap() < 1e-12);
}

#[test]
fn unrepresentable_matrices_are_errors() {
    let not_pd = Tensor::new(&[[[1.0f64, 2.0], [2.0, 1.0]]], &Device::Cpu).unwrap();
    for parameterization in [Parameterization::Cholesky, Parameterization::Expm] {
        let err = Precision::from_precision_matrix(&not_pd, &config(parameterization, None));
        assert!(matches!(
            err,
            Err(GaussError::NotPositiveDefinite { neuron: 0, .. })
        ));
    }
    let full = Tensor::new(&[[[2.0f64, 0.5], [0.5, 2.0]]], &Device::Cpu).unwrap();
    assert!(
        Precision::from_precision_matrix(&full, &config(Parameterization::Diag, None)).is_err()
    );
    let diag = Tensor::new(&[[[2.0f64, 0.0], [0.0, 3.0]]], &Device::Cpu).unwrap();
    assert!(
        Precision::from_precision_matrix(&diag, &config(Parameterization::Sphere, None)).is_err()
    );
    // Wrong raw shapes name the tensor.
    let err = Precision::from_raw(
        Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        4,
        &config(Parameterization::Diag, None),
    )
    .unwrap_err();
    assert!(err.to_string().contains("precision_log_diag"), "{err}");
}

#[test]
fn diagonal_forms_initialize_without_dense_matrices() {
    // A 784 → 256 diag layer: the raw tensor is (256, 784) and the seeded draw has as many
    // values; a dense (Z, d, d) f64 buffer would be 1.26 GB.
    let cfg = GaussLayerConfig {
        precision: PrecisionConfig::with_parameterization(Parameterization::Diag),
        init: crate::config::InitConfig {
            seed: Some(3),
            ..Default::default()
        },
        ..Default::default()
    };
    let raw = Precision::initial_raw(256, 784, &cfg, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(raw.dims(), &[256, 784]);
    let values = raw.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expected = (1.0f64 / 784.0).ln();
    assert!(values.iter().all(|&v| ((v as f64) - expected).abs() < 1e-2));
    assert!(values.iter().any(|&v| v as f64 != expected as f32 as f64));
}

#[test]
fn initial_raw_is_close_to_scaled_identity() {
    for parameterization in Parameterization::ALL {
        let cfg = config(parameterization, None);
        let raw = Precision::initial_raw(3, 4, &cfg, DType::F64, &Device::Cpu).unwrap();
        let p = Precision::from_raw(raw, 4, &cfg)
            .unwrap()
            .precision_matrix()
            .unwrap();
        let eye = (Tensor::eye(4, DType::F64, &Device::Cpu).unwrap() * 0.25).unwrap();
        let err = relative_error(&p, &eye.broadcast_as((3, 4, 4)).unwrap()).unwrap();
        // lowrank starts with U = 0.1·√scale·N (so that U has a gradient): U Uᵀ is a few
        // percent of scale·I.
        let tolerance = match parameterization {
            Parameterization::LowRank { .. } => 0.1,
            _ => 0.02,
        };
        assert!(err < tolerance && err > 0.0, "{parameterization}: {err}");
    }
}

/// The fused statistics op (CPU default path) against the tensor-op forms (portable path)
/// for every full parameterization: values and gradients to the raw tensor, f64.
#[test]
fn fused_statistics_match_the_tensor_op_forms() {
    use candle_core::Var;
    let (z, d) = (4, 9);
    for parameterization in [
        Parameterization::Cholesky,
        Parameterization::Direct,
        Parameterization::Expm,
    ] {
        let mut cfg = config(parameterization, None);
        let p = random_precision(parameterization, z, d);
        let raw = Precision::from_precision_matrix(&p, &cfg)
            .unwrap()
            .raw()
            .clone();
        let var = Var::from_tensor(&raw).unwrap();
        type Statistic = fn(&Precision) -> crate::Result<Tensor>;
        let statistics: [(&str, Statistic); 3] = [
            ("log det", Precision::log_det_precision),
            ("tr S", Precision::trace_covariance),
            ("tr P", Precision::trace_precision),
        ];
        for (name, statistic) in statistics {
            let mut results = Vec::new();
            for portable in [false, true] {
                cfg.precision.portable = portable;
                let precision = Precision::from_raw(var.as_tensor().clone(), d, &cfg).unwrap();
                let value = statistic(&precision).unwrap();
                // A weighted sum, so every neuron's gradient is scaled differently.
                let weights = Tensor::new(&[1.0f64, -2.0, 0.5, 3.0], &Device::Cpu).unwrap();
                let grad = (value.clone() * weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grad = grad.get(var.as_tensor()).unwrap().clone();
                results.push((value, grad));
            }
            let what = format!("{parameterization} {name}");
            let (fused, portable) = (&results[0], &results[1]);
            assert!(
                relative_error(&fused.0, &portable.0).unwrap() < 1e-10,
                "{what}: value"
            );
            // Both gradients act on the raw tensor: compare their effect on symmetric and
            // lower-triangular perturbations through the symmetric part (direct, expm read
            // only the symmetric part; cholesky only the lower triangle).
            let (a, b) = match parameterization {
                Parameterization::Cholesky => (
                    linalg::tril(&fused.1).unwrap(),
                    linalg::tril(&portable.1).unwrap(),
                ),
                _ => (
                    linalg::symmetrize(&fused.1).unwrap(),
                    linalg::symmetrize(&portable.1).unwrap(),
                ),
            };
            assert!(relative_error(&a, &b).unwrap() < 1e-9, "{what}: gradient");
        }
    }
}

/// Half-precision statistics sum in f32: Candle's CPU sum accumulates in the tensor's dtype,
/// which over d = 200 terms lost most digits (bf16 diag `log det P` −1352 for −1416, f16
/// cholesky −1445 for −1420 at d = 256). Expected values: the same statistics in f64 of the
/// very raw values the half tensor holds (so only the half arithmetic differs), within eight
/// unit roundoffs of the dtype (f16 3.9e-3, bf16 3.1e-2: bf16's `L⁻¹`, squared, is off by
/// about three roundoffs before any sum).
#[test]
fn half_precision_statistics_accumulate_in_f32() {
    let d = 200;
    for parameterization in Parameterization::ALL {
        for width_floor in [None, Some(0.3)] {
            if width_floor.is_some() && matches!(parameterization, Parameterization::LowRank { .. })
            {
                continue; // lowrank takes no width floor
            }
            let cfg = config(parameterization, width_floor);
            for dtype in [DType::F16, DType::BF16] {
                let raw = Precision::initial_raw(2, d, &cfg, dtype, &Device::Cpu).unwrap();
                let half = Precision::from_raw(raw.clone(), d, &cfg).unwrap();
                // f64: the reference, on Device::Cpu
                let exact =
                    Precision::from_raw(raw.to_dtype(DType::F64).unwrap(), d, &cfg).unwrap();
                type Statistic = fn(&Precision) -> crate::Result<Tensor>;
                let statistics: [(&str, Statistic); 3] = [
                    ("log det", Precision::log_det_precision),
                    ("tr S", Precision::trace_covariance),
                    ("tr P", Precision::trace_precision),
                ];
                for (name, statistic) in statistics {
                    let got = statistic(&half).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    let expected = statistic(&exact).unwrap();
                    let err = relative_error(&got, &expected).unwrap();
                    assert!(
                        err < 8.0 * linalg::unit_roundoff(dtype),
                        "{parameterization} floor {width_floor:?} {dtype:?} {name}: {:?} vs {:?} (relative error {err:e})",
                        got.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                        expected.to_vec1::<f64>().unwrap()
                    );
                }
            }
        }
    }
}

/// f16 holds ln P within ±½ ln 65504 = ±5.5449, so the default scale 1/d fits up to d = 255:
/// past it the log-scale forms are refused in the init's terms (`init.precision_scale`, with
/// the way out), where the error was a raw value out of range. Cholesky and direct store a
/// factor or P itself and still start; an explicit scale in range starts every form.
#[test]
fn half_precision_log_scale_forms_name_the_init_scale_past_d_255() {
    for parameterization in Parameterization::ALL {
        let cfg = config(parameterization, None);
        let fits = Precision::initial_raw(2, 255, &cfg, DType::F16, &Device::Cpu);
        assert!(fits.is_ok(), "{parameterization} at d = 255: {fits:?}");
        let result = Precision::initial_raw(2, 300, &cfg, DType::F16, &Device::Cpu);
        let stores_log = matches!(
            parameterization,
            Parameterization::Diag
                | Parameterization::Sphere
                | Parameterization::LowRank { .. }
                | Parameterization::Expm
        );
        if !stores_log {
            assert!(result.is_ok(), "{parameterization}: {result:?}");
            continue;
        }
        let message = result.unwrap_err().to_string();
        assert!(
            message.contains("init.precision_scale")
                && message.contains("the default 1/d")
                && message.contains("d = 300")
                && message.contains("f32"),
            "{message}"
        );
        let mut in_range = cfg.clone();
        in_range.init.precision_scale = Some(1.0 / 200.0);
        let raw = Precision::initial_raw(2, 300, &in_range, DType::F16, &Device::Cpu).unwrap();
        Precision::from_raw(raw, 300, &in_range).unwrap();
    }
}

/// The way out an init error offers fits the dtype: an f32 diag layer with a scale of 1e30
/// (ln P = 69, past f32's ±44.4) was told to "build the layer in f32"; bf16's range is f32's,
/// so both are pointed at f64. A direct perturbation so large that P is not positive definite
/// (1e6: a diagonal entry of −1.2e5 at d = 3) blamed `init.precision_scale`; it names
/// `init.perturbation` now, as the factoring forms do.
#[test]
fn init_errors_name_the_cause_and_a_way_out_that_fits_the_dtype() {
    let mut diag = config(Parameterization::Diag, None);
    diag.init.precision_scale = Some(1e30);
    for dtype in [DType::F32, DType::BF16] {
        let message = Precision::initial_raw(2, 3, &diag, dtype, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("init.precision_scale")
                && message.contains("build the layer in f64")
                && !message.contains("build the layer in f32"),
            "{dtype:?}: {message}"
        );
    }
    let mut direct = config(Parameterization::Direct, None);
    direct.init.perturbation = 1e6;
    direct.init.seed = Some(0);
    for parameterization in [Parameterization::Direct, Parameterization::Cholesky] {
        let cfg = GaussLayerConfig {
            precision: PrecisionConfig {
                parameterization,
                ..direct.precision
            },
            ..direct.clone()
        };
        match Precision::initial_raw(4, 3, &cfg, DType::F32, &Device::Cpu) {
            Err(GaussError::InvalidConfig { field, reason }) => {
                assert_eq!(field, "init.perturbation", "{parameterization}: {reason}")
            }
            other => {
                panic!("{parameterization}: expected an init.perturbation error, got {other:?}")
            }
        }
    }
}

/// A NaN or ∞ in a precision matrix is refused by every parameterization's inverse map,
/// naming the neuron and the entry: diag and sphere read only the diagonal and tested the
/// off-diagonal entries with `f64::max`, which drops NaN, so a NaN there was silently
/// accepted (and cholesky called it "not positive definite", with a NaN eigenvalue).
#[test]
fn non_finite_precision_matrices_are_refused_naming_the_entry() {
    for bad in [f64::NAN, f64::INFINITY] {
        // Neuron 1 of two, entry (0, 1).
        let p = Tensor::new(
            &[[[2.0f64, 0.0], [0.0, 2.0]], [[2.0, bad], [0.0, 2.0]]],
            &Device::Cpu,
        )
        .unwrap();
        for parameterization in Parameterization::ALL {
            for width_floor in [None, Some(0.1)] {
                if width_floor.is_some()
                    && matches!(parameterization, Parameterization::LowRank { .. })
                {
                    continue;
                }
                let cfg = config(parameterization, width_floor);
                match Precision::from_precision_matrix(&p, &cfg) {
                    Err(GaussError::Numerical { reason, .. }) => assert!(
                        reason.contains("neuron 1") && reason.contains("(0, 1)"),
                        "{parameterization} {bad}: {reason}"
                    ),
                    other => panic!(
                        "{parameterization} floor {width_floor:?} {bad}: expected a Numerical error naming neuron 1, got {other:?}"
                    ),
                }
            }
        }
    }
}

/// expm's Gershgorin check sums each row in f32 for half dtypes: equal entries whose exact
/// row sum is above the dtype's bound `½ ln M` must be refused. Summed in half arithmetic the
/// row stalls where an entry falls below half the sum's spacing, below the bound, and was
/// accepted. f16: d = 3000 entries of 0.0019 (held as 0.001899719…), exact row sum 5.699
/// against the bound 5.5449 (stalls at 4); bf16: d = 1000 entries of 0.05 (held as
/// 0.050048828125), exact row sum 50.05 against 44.36 (stalls at 16; bf16 has f32's range).
#[test]
fn expm_spectrum_check_sums_half_rows_in_f32() {
    let cfg = config(Parameterization::Expm, None);
    for (dtype, d, entry) in [(DType::F16, 3000, 0.0019), (DType::BF16, 1000, 0.05)] {
        let raw = (Tensor::ones((1, d, d), dtype, &Device::Cpu).unwrap() * entry).unwrap();
        match Precision::from_raw(raw, d, &cfg) {
            Err(GaussError::Numerical { reason, .. }) => {
                assert!(reason.contains("absolute sum"), "{dtype:?}: {reason}")
            }
            other => panic!(
                "{dtype:?}: expected the row sum to be refused, got {:?}",
                other.map(|_| "accepted")
            ),
        }
    }
}

/// A lowrank rank of `usize::MAX` (which `validate` leaves to the layer's size checks) with a
/// raw tensor of the wrong shape: the error message stated the expected `rank + 1` columns in
/// `usize` arithmetic and panicked on the overflow instead of returning the shape error.
#[test]
fn lowrank_shape_error_with_maximal_rank_does_not_overflow() {
    let cfg = config(Parameterization::LowRank { rank: usize::MAX }, None);
    let raw = Tensor::zeros((3, 1), DType::F32, &Device::Cpu).unwrap();
    match Precision::from_raw(raw, 1, &cfg) {
        Err(GaussError::Shape { expected, got, .. }) => {
            assert!(expected.contains("18446744073709551616"), "{expected}");
            assert_eq!(got, [3, 1]);
        }
        other => panic!(
            "expected a Shape error, got {:?}",
            other.map(|_| "accepted")
        ),
    }
}

/// A lowrank rank above d given with a precision matrix is a config error naming the rank, as
/// `gauss_layer` makes it: at `usize::MAX` the raw block's `d * (rank + 1)` overflowed (a
/// panic; a rank just below would have asked for more memory than exists, an abort).
#[test]
fn lowrank_rank_above_d_from_a_matrix_is_a_config_error() {
    let p = Tensor::eye(2, DType::F32, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    for rank in [3, usize::MAX] {
        let cfg = config(Parameterization::LowRank { rank }, None);
        match Precision::from_precision_matrix(&p, &cfg) {
            Err(GaussError::InvalidConfig { field, reason }) => {
                assert_eq!(field, "precision.parameterization");
                assert!(reason.contains(&format!("got rank {rank}")), "{reason}");
            }
            other => panic!(
                "rank {rank}: expected a config error, got {:?}",
                other.map(|_| "a precision")
            ),
        }
    }
    // Rank d still converts.
    let cfg = config(Parameterization::LowRank { rank: 2 }, None);
    assert!(Precision::from_precision_matrix(&p, &cfg).is_ok());
}

/// `to_dtype` to a wider dtype keeps the values and needs no check (every range widens);
/// to a narrower one it is checked as `from_raw`: a diag log-precision of 10 is within f32's
/// bound (½ ln M ≈ 44) but past f16's (≈ 5.5449), so narrowing it to f16 is refused.
#[test]
fn to_dtype_checks_only_narrowing_conversions() {
    let config = config(Parameterization::Diag, None);
    let dev = Device::Cpu;
    let half = Tensor::new(&[[0.5f32, -2.0], [1.0, 3.0]], &dev)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let precision = Precision::from_raw(half, 2, &config).unwrap();
    // f64: one of the two wider dtypes a conversion is checked into.
    for wider in [DType::F32, DType::F64] {
        let widened = precision.to_dtype(wider).unwrap();
        assert_eq!(widened.raw().dtype(), wider);
        assert_eq!(
            widened
                .raw()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            [[0.5f32, -2.0], [1.0, 3.0]]
        );
    }
    let wide = Tensor::new(&[[10.0f32, 0.0]], &dev).unwrap();
    let precision = Precision::from_raw(wide, 2, &config).unwrap();
    let err = precision.to_dtype(DType::F16).unwrap_err();
    assert!(matches!(err, GaussError::Numerical { .. }), "{err}");
    assert!(matches!(
        precision.to_dtype(DType::U8),
        Err(GaussError::DType { .. })
    ));
}
