//! Fast-path kernels against a broadcast (B, Z, d) oracle built from Candle ops, forward and
//! backward (the oracle's gradients come from Candle's autograd).

use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::diagonal::mahalanobis_sq_diagonal_fused;
use super::expanded::{expanded_is_accurate, mahalanobis_sq_expanded};
use super::expanded_fused::{mahalanobis_sq_expanded_fused, mahalanobis_sq_expanded_fused_factor};
use super::projected::mahalanobis_sq_projected_fused;
use crate::error::GaussError;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn normal(rng: &mut StdRng, shape: &[usize], std: f64) -> Tensor {
    let count: usize = shape.iter().product();
    let data: Vec<f64> = (0..count)
        .map(|_| std * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("test tensor")
}

/// Inputs for B × Z × d: centers spread with norm up to about `center_norm`, inputs half near
/// a center (about one width away, where cancellation shows) and half anywhere, and
/// lower-triangular factors with a positive diagonal and unit-scale widths.
struct Case {
    x: Tensor,
    center: Tensor,
    factor: Tensor,
}

fn case(seed: u64, batch: usize, dim: usize, neurons: usize, center_norm: f64) -> Case {
    // Near inputs sit about one unit width per coordinate from their center.
    let near = 1.0;
    let mut rng = StdRng::seed_from_u64(seed);
    let per_dim = center_norm / (dim as f64).sqrt();
    let center = normal(&mut rng, &[neurons, dim], per_dim);
    let center_rows = center.to_vec2::<f64>().expect("centers");
    let far = normal(&mut rng, &[batch, dim], per_dim)
        .to_vec2::<f64>()
        .expect("x");
    let mut x = Vec::with_capacity(batch * dim);
    for (b, row) in far.iter().enumerate() {
        if b % 2 == 0 {
            let c = &center_rows[rng.random_range(0..neurons)];
            x.extend(
                c.iter()
                    .map(|v| v + near * rng.sample::<f64, _>(StandardNormal)),
            );
        } else {
            x.extend(row);
        }
    }
    let x = Tensor::from_vec(x, (batch, dim), &Device::Cpu).expect("x");
    let mut factor = vec![0f64; neurons * dim * dim];
    for z in 0..neurons {
        for i in 0..dim {
            for j in 0..=i {
                let v = if i == j {
                    0.5 + rng.random::<f64>()
                } else {
                    0.3 * rng.sample::<f64, _>(StandardNormal)
                };
                factor[z * dim * dim + i * dim + j] = v;
            }
        }
    }
    let factor = Tensor::from_vec(factor, (neurons, dim, dim), &Device::Cpu).expect("factor");
    Case { x, center, factor }
}

/// `|F_zᵀ (x_b - c_z)|²` over an explicit (B, Z, d) difference.
fn oracle_projected(x: &Tensor, center: &Tensor, factor: &Tensor) -> candle_core::Result<Tensor> {
    let diff = x.unsqueeze(1)?.broadcast_sub(&center.unsqueeze(0)?)?; // (B, Z, d)
    let u = diff.unsqueeze(2)?.broadcast_matmul(&factor.unsqueeze(0)?)?; // (B, Z, 1, d)
    u.sqr()?.sum((2, 3))
}

fn oracle_diagonal(x: &Tensor, center: &Tensor, diag: &Tensor) -> candle_core::Result<Tensor> {
    let diff = x.unsqueeze(1)?.broadcast_sub(&center.unsqueeze(0)?)?;
    diff.sqr()?
        .broadcast_mul(&diag.unsqueeze(0)?)?
        .sum(D::Minus1)
}

/// Largest `|a - b| / max(|b|, floor)` over all elements (both compared in f64).
fn max_relative_error(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    let a = a.to_dtype(DType::F64).and_then(|t| t.flatten_all());
    let b = b.to_dtype(DType::F64).and_then(|t| t.flatten_all());
    let a = a.and_then(|t| t.to_vec1::<f64>()).expect("a");
    let b = b.and_then(|t| t.to_vec1::<f64>()).expect("b");
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f64::max)
}

/// [`max_relative_error`] with the floor at `max |b|`: the error of a gradient relative to
/// its largest entry.
fn gradient_error(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(max_relative_error(a, b, scale))
}

#[test]
fn projected_fused_matches_oracle_in_f64() -> TestResult {
    // Sizes off every tile and lane multiple; 200 rows span several row tiles and chunks.
    for (seed, batch, dim, neurons) in [(1, 37, 7, 11), (2, 200, 20, 40), (3, 5, 1, 3)] {
        let c = case(seed, batch, dim, neurons, 100.0);
        let fused = mahalanobis_sq_projected_fused(&c.x, &c.center, &c.factor)?;
        let expected = oracle_projected(&c.x, &c.center, &c.factor)?;
        assert_eq!(fused.dims(), [batch, neurons]);
        let err = max_relative_error(&fused, &expected, 1e-3);
        assert!(
            err < 1e-9,
            "B={batch} d={dim} Z={neurons}: relative error {err:e}"
        );
    }
    Ok(())
}

#[test]
fn projected_fused_f32_agrees_with_f64_reference() -> TestResult {
    // The f64 oracle on the very f32 values: the fused f32 result must stay within 1e-5
    // relative (floor 1: where g = exp(-m2/2) is not yet negligible, absolute error matters).
    let c = case(4, 129, 33, 21, 100.0);
    let (x, center, factor) = (
        c.x.to_dtype(DType::F32)?,
        c.center.to_dtype(DType::F32)?,
        c.factor.to_dtype(DType::F32)?,
    );
    let fused = mahalanobis_sq_projected_fused(&x, &center, &factor)?;
    assert_eq!(fused.dtype(), DType::F32);
    let expected = oracle_projected(
        &x.to_dtype(DType::F64)?,
        &center.to_dtype(DType::F64)?,
        &factor.to_dtype(DType::F64)?,
    )?;
    let err = max_relative_error(&fused, &expected, 1.0);
    // The same projected form as plain f32 tensor ops (one GEMM against the stacked factors).
    let (neurons, dim) = center.dims2()?;
    let stacked = factor.transpose(0, 1)?.reshape((dim, neurons * dim))?;
    let projected_centers = center
        .unsqueeze(1)?
        .matmul(&factor)?
        .reshape((1, neurons * dim))?;
    let tensor_ops = x
        .matmul(&stacked)?
        .broadcast_sub(&projected_centers)?
        .sqr()?
        .reshape((129, neurons, dim))?
        .sum(2)?;
    let reference_err = max_relative_error(&tensor_ops, &expected, 1.0);
    assert!(err < 1e-5, "relative error {err:e}");
    // Shifting by the mean center must not make the fused form worse than the plain one.
    assert!(
        err <= 2.0 * reference_err + 1e-6,
        "{err:e} vs {reference_err:e}"
    );
    Ok(())
}

/// Gradients of `Σ G ∘ m2` for a fixed random `G`, from the fused op and from autograd
/// through `oracle`.
fn gradients(
    op: impl Fn(&Tensor, &Tensor, &Tensor) -> crate::Result<Tensor>,
    inputs: [&Tensor; 3],
    upstream: &Tensor,
) -> std::result::Result<Vec<Tensor>, Box<dyn std::error::Error>> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(t))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let m2 = op(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let grads = m2.mul(upstream)?.sum_all()?.backward()?;
    Ok(vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).cloned().ok_or("missing gradient"))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

#[test]
fn projected_fused_gradients_match_autograd() -> TestResult {
    for (seed, batch, dim, neurons) in [(5, 70, 9, 30), (6, 3, 40, 2)] {
        let c = case(seed, batch, dim, neurons, 20.0);
        let mut rng = StdRng::seed_from_u64(seed + 100);
        let upstream = normal(&mut rng, &[batch, neurons], 1.0);
        let inputs = [&c.x, &c.center, &c.factor];
        let fused = gradients(mahalanobis_sq_projected_fused, inputs, &upstream)?;
        let oracle = gradients(|x, c, f| Ok(oracle_projected(x, c, f)?), inputs, &upstream)?;
        for (name, (a, b)) in ["x", "center", "factor"]
            .iter()
            .zip(fused.iter().zip(&oracle))
        {
            assert_eq!(a.dims(), b.dims(), "{name}");
            let err = gradient_error(a, b)?;
            assert!(err < 1e-10, "∂{name}: relative error {err:e}");
        }
    }
    Ok(())
}

/// Gradients of `op` on the f32 values of a case against autograd through the f64 projected
/// oracle on those very values, for an upstream gradient drawn from `upstream_seed`.
fn check_f32_gradients(
    op: impl Fn(&Tensor, &Tensor, &Tensor) -> crate::Result<Tensor>,
    c: &Case,
    upstream_seed: u64,
) -> TestResult {
    let (batch, neurons) = (c.x.dim(0)?, c.center.dim(0)?);
    let mut rng = StdRng::seed_from_u64(upstream_seed);
    let upstream = normal(&mut rng, &[batch, neurons], 1.0).to_dtype(DType::F32)?;
    let inputs32 = [&c.x, &c.center, &c.factor].map(|t| t.to_dtype(DType::F32).expect("f32"));
    let fused = gradients(op, [&inputs32[0], &inputs32[1], &inputs32[2]], &upstream)?;
    let inputs64 = inputs32
        .clone()
        .map(|t| t.to_dtype(DType::F64).expect("f64"));
    let oracle = gradients(
        |x, c, f| Ok(oracle_projected(x, c, f)?),
        [&inputs64[0], &inputs64[1], &inputs64[2]],
        &upstream.to_dtype(DType::F64)?,
    )?;
    for (a, b) in fused.iter().zip(&oracle) {
        let err = gradient_error(a, b)?;
        assert!(err < 1e-5, "relative error {err:e}");
    }
    Ok(())
}

#[test]
fn projected_fused_f32_gradients_match_autograd() -> TestResult {
    check_f32_gradients(
        mahalanobis_sq_projected_fused,
        &case(7, 65, 16, 17, 10.0),
        107,
    )
}

#[test]
fn projected_fused_reads_strided_and_offset_layouts() -> TestResult {
    let c = case(8, 12, 6, 5, 10.0);
    let expected = oracle_projected(&c.x, &c.center, &c.factor)?;
    // x as the transpose of its transpose (non-contiguous), centers as a narrow view with an
    // offset, factors transposed twice over the last two axes.
    let x = c.x.t()?.contiguous()?.t()?;
    assert!(!x.is_contiguous());
    let padded = Tensor::cat(&[&c.center, &c.center], 0)?;
    let center = padded.narrow(0, 5, 5)?;
    let factor = c.factor.transpose(1, 2)?.contiguous()?.transpose(1, 2)?;
    let fused = mahalanobis_sq_projected_fused(&x, &center, &factor)?;
    assert!(max_relative_error(&fused, &expected, 1e-3) < 1e-10);
    Ok(())
}

#[test]
fn fused_kernels_reject_bad_dtypes_and_shapes() -> TestResult {
    let c = case(9, 4, 3, 2, 1.0);
    let half = c.x.to_dtype(DType::F16)?;
    let err = mahalanobis_sq_projected_fused(
        &half,
        &c.center.to_dtype(DType::F16)?,
        &c.factor.to_dtype(DType::F16)?,
    );
    assert!(err.is_err_and(|e| e.to_string().contains("f32 and f64")));
    let mixed = mahalanobis_sq_projected_fused(&c.x, &c.center.to_dtype(DType::F32)?, &c.factor);
    assert!(matches!(mixed, Err(GaussError::DType { .. })));
    let wrong = mahalanobis_sq_projected_fused(&c.x, &c.center, &c.factor.narrow(1, 0, 2)?);
    assert!(matches!(wrong, Err(GaussError::Shape { .. })));
    let wrong = mahalanobis_sq_diagonal_fused(&c.x, &c.center, &c.x);
    assert!(matches!(wrong, Err(GaussError::Shape { .. })));
    Ok(())
}

#[test]
fn diagonal_fused_matches_oracle_forward_and_backward() -> TestResult {
    let c = case(10, 41, 11, 13, 100.0);
    let mut rng = StdRng::seed_from_u64(110);
    let diagonal = normal(&mut rng, &[13, 11], 1.0).exp()?;
    let fused = mahalanobis_sq_diagonal_fused(&c.x, &c.center, &diagonal)?;
    let expected = oracle_diagonal(&c.x, &c.center, &diagonal)?;
    assert!(max_relative_error(&fused, &expected, 1e-3) < 1e-12);

    let fused32 = mahalanobis_sq_diagonal_fused(
        &c.x.to_dtype(DType::F32)?,
        &c.center.to_dtype(DType::F32)?,
        &diagonal.to_dtype(DType::F32)?,
    )?;
    assert!(max_relative_error(&fused32, &expected, 1.0) < 1e-5);

    let upstream = normal(&mut rng, &[41, 13], 1.0);
    let inputs = [&c.x, &c.center, &diagonal];
    let fused = gradients(mahalanobis_sq_diagonal_fused, inputs, &upstream)?;
    let oracle = gradients(|x, c, p| Ok(oracle_diagonal(x, c, p)?), inputs, &upstream)?;
    for (a, b) in fused.iter().zip(&oracle) {
        assert!(gradient_error(a, b)? < 1e-11);
    }
    Ok(())
}

/// `P = F Fᵀ` of a case.
fn precision_of(c: &Case) -> candle_core::Result<Tensor> {
    c.factor.matmul(&c.factor.transpose(1, 2)?)
}

#[test]
fn expanded_matches_oracle_forward_and_backward_in_f64() -> TestResult {
    let c = case(11, 33, 8, 9, 100.0);
    let precision = precision_of(&c)?;
    let expanded = mahalanobis_sq_expanded(&c.x, &c.center, &precision)?;
    let expected = oracle_projected(&c.x, &c.center, &c.factor)?;
    // Centers of norm 100 cost the expanded form digits even in f64 (floor 1 as above).
    assert!(max_relative_error(&expanded, &expected, 1.0) < 1e-8);

    let mut rng = StdRng::seed_from_u64(111);
    let upstream = normal(&mut rng, &[33, 9], 1.0);
    let small = case(12, 33, 8, 9, 2.0);
    let precision = precision_of(&small)?;
    let inputs = [&small.x, &small.center, &precision];
    let fast = gradients(mahalanobis_sq_expanded, inputs, &upstream)?;
    let naive = |x: &Tensor, c: &Tensor, p: &Tensor| -> crate::Result<Tensor> {
        let diff = x.unsqueeze(1)?.broadcast_sub(&c.unsqueeze(0)?)?;
        let pd = diff
            .unsqueeze(2)?
            .broadcast_matmul(&p.unsqueeze(0)?)?
            .squeeze(2)?;
        Ok(pd.mul(&diff)?.sum(D::Minus1)?)
    };
    let oracle = gradients(naive, inputs, &upstream)?;
    for (name, (a, b)) in ["x", "center"].iter().zip(fast.iter().zip(&oracle)) {
        let err = gradient_error(a, b)?;
        assert!(err < 1e-10, "∂{name}: relative error {err:e}");
    }
    // ∂P: the expanded form sees only the symmetric part of P, so compare symmetrized.
    let sym = |t: &Tensor| t.add(&t.transpose(1, 2)?)?.affine(0.5, 0.0);
    let (a, b) = (sym(&fast[2])?, sym(&oracle[2])?);
    assert!(gradient_error(&a, &b)? < 1e-10);
    Ok(())
}

#[test]
fn expanded_conditioning_check_flags_far_centers_in_f32() -> TestResult {
    let near = case(13, 4, 8, 6, 1.0);
    let far = case(14, 4, 8, 6, 100.0);
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    assert!(expanded_is_accurate(
        &f32_of(&near.center)?,
        &f32_of(&precision_of(&near)?)?
    )?);
    assert!(!expanded_is_accurate(
        &f32_of(&far.center)?,
        &f32_of(&precision_of(&far)?)?
    )?);
    // f64 has about 9 more digits: the far case is fine there.
    assert!(expanded_is_accurate(&far.center, &precision_of(&far)?)?);
    // And where the check passes in f32, the f32 result is within 1e-5 (floor 1).
    let expanded = mahalanobis_sq_expanded(
        &f32_of(&near.x)?,
        &f32_of(&near.center)?,
        &f32_of(&precision_of(&near)?)?,
    )?;
    let expected = oracle_projected(&near.x, &near.center, &near.factor)?;
    let err = max_relative_error(&expanded, &expected, 1.0);
    assert!(err < 1e-5, "relative error {err:e}");
    Ok(())
}

#[test]
fn empty_batch_gives_empty_output() -> TestResult {
    let c = case(15, 1, 4, 3, 1.0);
    let x = c.x.narrow(0, 0, 0)?;
    let m2 = mahalanobis_sq_projected_fused(&x, &c.center, &c.factor)?;
    assert_eq!(m2.dims(), [0, 3]);
    Ok(())
}

/// `L = tril(raw, -1) + diag(map(diag raw) + floor)` as tensor ops.
fn cholesky_factor_oracle(raw: &Tensor, exp_map: bool, floor: f64) -> candle_core::Result<Tensor> {
    let dim = raw.dim(1)?;
    let eye = Tensor::eye(dim, DType::F64, &Device::Cpu)?;
    let strictly_lower = Tensor::tril2(dim, DType::F64, &Device::Cpu)?.sub(&eye)?;
    let diag = raw.broadcast_mul(&eye)?.sum(D::Minus1)?;
    let mapped = if exp_map {
        diag.exp()?
    } else {
        (diag.exp()? + 1.0)?.log()?
    };
    let mapped = (mapped + floor)?;
    raw.broadcast_mul(&strictly_lower)?
        .add(&mapped.unsqueeze(2)?.broadcast_mul(&eye)?)
}

#[test]
fn cholesky_fused_matches_tensor_op_factor_forward_and_backward() -> TestResult {
    use super::projected::mahalanobis_sq_cholesky_fused;
    use crate::config::PositiveMap;
    for (exp_map, map) in [(false, PositiveMap::Softplus), (true, PositiveMap::Exp)] {
        let c = case(16, 45, 10, 14, 30.0);
        let mut rng = StdRng::seed_from_u64(116);
        // Raw values everywhere, also above the diagonal (which L ignores).
        let raw = normal(&mut rng, &[14, 10, 10], 0.7);
        let floor = 1e-3;
        let fused =
            |x: &Tensor, c: &Tensor, r: &Tensor| mahalanobis_sq_cholesky_fused(x, c, r, map, floor);
        let oracle = |x: &Tensor, c: &Tensor, r: &Tensor| -> crate::Result<Tensor> {
            Ok(oracle_projected(
                x,
                c,
                &cholesky_factor_oracle(r, exp_map, floor)?,
            )?)
        };
        let m2 = fused(&c.x, &c.center, &raw)?;
        let expected = oracle(&c.x, &c.center, &raw)?;
        assert!(max_relative_error(&m2, &expected, 1e-3) < 1e-10);
        let upstream = normal(&mut rng, &[45, 14], 1.0);
        let inputs = [&c.x, &c.center, &raw];
        let a = gradients(fused, inputs, &upstream)?;
        let b = gradients(oracle, inputs, &upstream)?;
        for (name, (a, b)) in ["x", "center", "raw"].iter().zip(a.iter().zip(&b)) {
            let err = gradient_error(a, b)?;
            assert!(
                err < 1e-10,
                "∂{name} (exp map {exp_map}): relative error {err:e}"
            );
        }
    }
    Ok(())
}

/// The dispatcher through every parameterization (with and without a width floor) against
/// the naive kernel: values and gradients to x, centers and the raw precision parameter.
#[test]
fn dispatcher_agrees_with_naive_for_every_parameterization() -> TestResult {
    use super::{mahalanobis_sq, resolve_kernel, ResolvedKernel};
    use crate::config::{DistanceKernel, GaussLayerConfig, Parameterization};
    use crate::precision::Precision;
    let (batch, dim, neurons) = (23, 5, 7);
    for parameterization in Parameterization::ALL {
        for width_floor in [None, Some(0.5)] {
            let config = GaussLayerConfig {
                parameterization,
                width_floor,
                ..Default::default()
            };
            let c = case(17, batch, dim, neurons, 3.0);
            let mut rng = StdRng::seed_from_u64(117);
            let raw_shape = Precision::raw_shape(parameterization, neurons, dim);
            let mut raw = normal(&mut rng, &raw_shape, 0.3);
            if parameterization == Parameterization::Direct {
                // A clearly positive definite P for the direct form.
                raw = precision_of(&c)?;
            }
            let upstream = normal(&mut rng, &[batch, neurons], 1.0);
            let run = |kernel: DistanceKernel| {
                gradients(
                    |x, center, raw| {
                        let precision = Precision::from_raw(raw.clone(), dim, &config)?;
                        mahalanobis_sq(x, center, &precision, kernel)
                    },
                    [&c.x, &c.center, &raw],
                    &upstream,
                )
            };
            let precision = Precision::from_raw(raw.clone(), dim, &config)?;
            let resolved = resolve_kernel(&c.x, &c.center, &precision, DistanceKernel::Auto)?;
            // Centers of norm 3 with these widths pass the conditioning check: the factor
            // and matrix forms take the fused expanded op (its forward at full tiles for d = 5).
            let expected_kernel = match parameterization {
                Parameterization::Cholesky | Parameterization::Expm | Parameterization::Direct => {
                    ResolvedKernel::ExpandedFused
                }
                _ => ResolvedKernel::DiagonalFused,
            };
            assert_eq!(
                resolved, expected_kernel,
                "{parameterization} {width_floor:?}"
            );
            for forced in [DistanceKernel::Projected, DistanceKernel::Expanded] {
                let Ok(kernel) = resolve_kernel(&c.x, &c.center, &precision, forced) else {
                    continue;
                };
                let is_expanded = matches!(
                    kernel,
                    ResolvedKernel::ExpandedFused | ResolvedKernel::Expanded
                );
                if !matches!(kernel, ResolvedKernel::DiagonalFused) {
                    assert_eq!(
                        is_expanded,
                        forced == DistanceKernel::Expanded,
                        "{kernel:?}"
                    );
                }
            }
            let auto = mahalanobis_sq(&c.x, &c.center, &precision, DistanceKernel::Auto)?;
            let naive = mahalanobis_sq(&c.x, &c.center, &precision, DistanceKernel::Naive)?;
            let err = max_relative_error(&auto, &naive, 1.0);
            assert!(
                err < 1e-9,
                "{parameterization} {width_floor:?}: m2 error {err:e}"
            );
            let fast = run(DistanceKernel::Auto)?;
            let slow = run(DistanceKernel::Naive)?;
            for (name, (a, b)) in ["x", "center", "raw"].iter().zip(fast.iter().zip(&slow)) {
                let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
                let err = max_relative_error(a, b, scale);
                assert!(
                    err < 1e-8,
                    "{parameterization} {width_floor:?}: ∂{name} error {err:e}"
                );
            }
        }
    }
    Ok(())
}

/// The fused layer op against the layer composed from tensor ops (naive distances), for
/// cholesky (raw fed to the op), cholesky with a width floor and expm (factor fed to the op),
/// with and without a bias: outputs and gradients to every input.
#[test]
fn fused_layer_matches_composed_layer() -> TestResult {
    use super::fused_layer::gauss_layer_forward_fused;
    use super::mahalanobis_sq;
    use crate::config::{DistanceKernel, GaussLayerConfig, Parameterization};
    use crate::precision::Precision;
    let (batch, dim, neurons) = (19, 6, 9);
    // Auto takes the expanded form here (centers of norm 2); the forced kernels cover the
    // projected form and the expanded form from the raw Cholesky parameter.
    let cases = [
        (Parameterization::Cholesky, None, true, DistanceKernel::Auto),
        (
            Parameterization::Cholesky,
            None,
            false,
            DistanceKernel::Auto,
        ),
        (
            Parameterization::Cholesky,
            None,
            true,
            DistanceKernel::Projected,
        ),
        (
            Parameterization::Cholesky,
            None,
            true,
            DistanceKernel::Expanded,
        ),
        (
            Parameterization::Cholesky,
            Some(0.7),
            true,
            DistanceKernel::Auto,
        ),
        (
            Parameterization::Cholesky,
            Some(0.7),
            true,
            DistanceKernel::Projected,
        ),
        (Parameterization::Expm, None, true, DistanceKernel::Auto),
        (Parameterization::Direct, None, true, DistanceKernel::Auto),
    ];
    for (parameterization, width_floor, with_bias, kernel) in cases {
        let config = GaussLayerConfig {
            parameterization,
            width_floor,
            ..Default::default()
        };
        let c = case(18, batch, dim, neurons, 2.0);
        let mut rng = StdRng::seed_from_u64(118);
        let mut raw = normal(&mut rng, &[neurons, dim, dim], 0.3);
        if parameterization == Parameterization::Direct {
            raw = precision_of(&c)?;
        }
        let weight = normal(&mut rng, &[neurons, dim], 1.0);
        let bias = normal(&mut rng, &[neurons], 1.0);
        let up_y = normal(&mut rng, &[batch, neurons], 1.0);
        let up_g = normal(&mut rng, &[batch, neurons], 1.0);
        let tensors = [&c.x, &c.center, &raw, &weight, &bias];
        let run = |fused: bool| -> std::result::Result<Vec<Tensor>, Box<dyn std::error::Error>> {
            let vars = tensors
                .iter()
                .map(|t| Var::from_tensor(t))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let [x, center, raw, weight, bias] = [0, 1, 2, 3, 4].map(|i| vars[i].as_tensor());
            let precision = Precision::from_raw(raw.clone(), dim, &config)?;
            let bias = with_bias.then_some(bias);
            let (y, g) = if fused {
                gauss_layer_forward_fused(x, center, weight, bias, &precision, kernel)?
                    .ok_or("fused path expected")?
            } else {
                let m2 = mahalanobis_sq(x, center, &precision, DistanceKernel::Naive)?;
                let g = (m2 * -0.5)?.exp()?;
                let mut linear = x.matmul(&weight.t()?)?;
                if let Some(bias) = bias {
                    linear = linear.broadcast_add(&bias.unsqueeze(0)?)?;
                }
                ((linear * &g)?, g)
            };
            let loss = (y.mul(&up_y)?.sum_all()? + g.mul(&up_g)?.sum_all()?)?;
            let grads = loss.backward()?;
            let mut out = vec![y, g];
            for (i, v) in vars.iter().enumerate() {
                if i == 4 && !with_bias {
                    continue;
                }
                out.push(
                    grads
                        .get(v.as_tensor())
                        .cloned()
                        .ok_or("missing gradient")?,
                );
            }
            Ok(out)
        };
        let fused = run(true)?;
        let composed = run(false)?;
        let names = ["y", "g", "∂x", "∂center", "∂raw", "∂weight", "∂bias"];
        for (name, (a, b)) in names.iter().zip(fused.iter().zip(&composed)) {
            let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
            let err = max_relative_error(a, b, scale);
            assert!(
                err < 1e-9,
                "{parameterization} floor {width_floor:?} bias {with_bias} {kernel:?}: {name} error {err:e}"
            );
        }
    }
    Ok(())
}

/// Centered `|c_z - c̄|² · ‖P_z‖_∞`, the scale of the terms the expanded form cancels.
fn expanded_scale(center: &Tensor, precision: &Tensor) -> candle_core::Result<f64> {
    let spread = center
        .broadcast_sub(&center.mean_keepdim(0)?)?
        .sqr()?
        .sum(D::Minus1)?;
    let norm = precision.abs()?.sum(2)?.max(1)?;
    spread.mul(&norm)?.max(0)?.to_scalar::<f64>()
}

#[test]
fn expanded_fused_matches_oracle_in_f64() -> TestResult {
    // Sizes off every tile multiple; d = 40 makes the forward's row tiles shorter than 64, 70
    // neurons span two neuron blocks, 300 rows several chunks.
    for (seed, batch, dim, neurons) in [(21, 37, 7, 11), (22, 300, 40, 70), (23, 5, 1, 3)] {
        let c = case(seed, batch, dim, neurons, 2.0);
        let expected = oracle_projected(&c.x, &c.center, &c.factor)?;
        let from_matrix = mahalanobis_sq_expanded_fused(&c.x, &c.center, &precision_of(&c)?)?;
        let from_factor = mahalanobis_sq_expanded_fused_factor(&c.x, &c.center, &c.factor)?;
        for m2 in [from_matrix, from_factor] {
            assert_eq!(m2.dims(), [batch, neurons]);
            let err = max_relative_error(&m2, &expected, 1.0);
            assert!(
                err < 1e-10,
                "B={batch} d={dim} Z={neurons}: relative error {err:e}"
            );
        }
    }
    Ok(())
}

#[test]
fn expanded_fused_f32_within_1e5_where_the_check_passes() -> TestResult {
    for (seed, batch, dim, neurons, norm) in [
        (31, 90, 8, 20, 1.0),
        (32, 70, 16, 33, 2.0),
        (33, 50, 32, 9, 1.0),
    ] {
        let c = case(seed, batch, dim, neurons, norm);
        let [x, center, factor] =
            [&c.x, &c.center, &c.factor].map(|t| t.to_dtype(DType::F32).expect("f32"));
        let precision = factor.matmul(&factor.transpose(1, 2)?)?;
        assert!(expanded_is_accurate(&center, &precision)?, "seed {seed}");
        let m2 = mahalanobis_sq_expanded_fused_factor(&x, &center, &factor)?;
        // The f64 oracle on the very f32 values (floor 1: the unit width scale of g).
        let as64 = |t: &Tensor| t.to_dtype(DType::F64);
        let expected = oracle_projected(&as64(&x)?, &as64(&center)?, &as64(&factor)?)?;
        let err = max_relative_error(&m2, &expected, 1.0);
        assert!(err < 1e-5, "seed {seed}: relative error {err:e}");
    }
    Ok(())
}

/// Centers of norm 100 (spread far beyond the unit widths): the check sends `Auto` to the
/// projected form in f32; forced, the expanded form holds only the documented bound
/// (absolute error a few `eps·|c - c̄|²·‖P‖_∞`), not 1e-5; in f64 it stays within 1e-9.
#[test]
fn expanded_fused_far_centers_fall_back_and_keep_the_documented_bound() -> TestResult {
    use super::{resolve_kernel, ResolvedKernel};
    use crate::config::{DistanceKernel, GaussLayerConfig};
    use crate::precision::Precision;
    let far = case(41, 60, 12, 10, 100.0);
    let near = case(42, 60, 12, 10, 1.0);
    let config = GaussLayerConfig::default();
    for (c, expected) in [
        (&far, ResolvedKernel::CholeskyFused),
        (&near, ResolvedKernel::ExpandedFused),
    ] {
        let [x, center, factor] =
            [&c.x, &c.center, &c.factor].map(|t| t.to_dtype(DType::F32).expect("f32"));
        let precision = Precision::from_raw(factor, 12, &config)?;
        let kernel = resolve_kernel(&x, &center, &precision, DistanceKernel::Auto)?;
        assert_eq!(kernel, expected);
    }
    let [x, center, factor] =
        [&far.x, &far.center, &far.factor].map(|t| t.to_dtype(DType::F32).expect("f32"));
    let m2 = mahalanobis_sq_expanded_fused_factor(&x, &center, &factor)?;
    let as64 = |t: &Tensor| t.to_dtype(DType::F64);
    let expected = oracle_projected(&as64(&x)?, &as64(&center)?, &as64(&factor)?)?;
    let scale = expanded_scale(&as64(&center)?, &precision_of(&far)?)?;
    let abs_err = (m2.to_dtype(DType::F64)? - &expected)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert!(
        abs_err <= 16.0 * f32::EPSILON as f64 * scale,
        "abs error {abs_err:e} vs scale {scale:e}"
    );
    let m2 = mahalanobis_sq_expanded_fused_factor(&far.x, &far.center, &far.factor)?;
    let expected = oracle_projected(&far.x, &far.center, &far.factor)?;
    let err = max_relative_error(&m2, &expected, 1.0);
    assert!(err < 1e-9, "f64 relative error {err:e}");
    Ok(())
}

#[test]
fn expanded_fused_gradients_match_autograd() -> TestResult {
    use super::expanded_fused::{FusedMahalanobisSq, Plan, Source};
    use super::projected::FactorMap;
    use crate::config::PositiveMap;
    let naive = |x: &Tensor, c: &Tensor, p: &Tensor| -> crate::Result<Tensor> {
        let diff = x.unsqueeze(1)?.broadcast_sub(&c.unsqueeze(0)?)?;
        let pd = diff
            .unsqueeze(2)?
            .broadcast_matmul(&p.unsqueeze(0)?)?
            .squeeze(2)?;
        Ok(pd.mul(&diff)?.sum(D::Minus1)?)
    };
    let check = |fast: &[Tensor], slow: &[Tensor], what: &str| {
        for (name, (a, b)) in ["x", "center", "precision"]
            .iter()
            .zip(fast.iter().zip(slow))
        {
            let err = gradient_error(a, b)?;
            assert!(err < 1e-10, "{what} ∂{name}: relative error {err:e}");
        }
        Ok::<(), candle_core::Error>(())
    };
    for (seed, batch, dim, neurons) in [(51, 70, 9, 30), (52, 300, 5, 3), (53, 3, 30, 2)] {
        let c = case(seed, batch, dim, neurons, 2.0);
        let mut rng = StdRng::seed_from_u64(seed + 100);
        let upstream = normal(&mut rng, &[batch, neurons], 1.0);
        // Matrix input: the op uses its symmetric part, so compare symmetrized ∂P.
        let p = precision_of(&c)?;
        let inputs = [&c.x, &c.center, &p];
        let mut fast = gradients(mahalanobis_sq_expanded_fused, inputs, &upstream)?;
        let mut slow = gradients(naive, inputs, &upstream)?;
        let sym = |t: &Tensor| t.add(&t.transpose(1, 2)?)?.affine(0.5, 0.0);
        fast[2] = sym(&fast[2])?;
        slow[2] = sym(&slow[2])?;
        check(&fast, &slow, "matrix")?;
        let inputs = [&c.x, &c.center, &c.factor];
        let fast = gradients(mahalanobis_sq_expanded_fused_factor, inputs, &upstream)?;
        let slow = gradients(|x, c, f| Ok(oracle_projected(x, c, f)?), inputs, &upstream)?;
        check(&fast, &slow, "factor")?;
        // Raw Cholesky parameter (map inside the op), expanded and projected forward.
        let raw = normal(&mut rng, &[neurons, dim, dim], 0.4);
        let map = FactorMap::Cholesky {
            positive_map: PositiveMap::Softplus,
            floor: 1e-3,
        };
        let slow = gradients(
            |x, c, r| {
                Ok(oracle_projected(
                    x,
                    c,
                    &cholesky_factor_oracle(r, false, 1e-3)?,
                )?)
            },
            [&c.x, &c.center, &raw],
            &upstream,
        )?;
        for projected_forward in [false, true] {
            let plan = Plan::Expanded {
                source: Source::Factor(map),
                projected_forward,
            };
            let fast = gradients(
                |x, c, r| Ok(x.apply_op3(c, r, FusedMahalanobisSq { plan })?),
                [&c.x, &c.center, &raw],
                &upstream,
            )?;
            check(&fast, &slow, "raw cholesky")?;
        }
    }
    Ok(())
}

#[test]
fn expanded_fused_f32_gradients_match_autograd() -> TestResult {
    check_f32_gradients(
        mahalanobis_sq_expanded_fused_factor,
        &case(61, 65, 16, 17, 1.0),
        161,
    )
}

/// Training must be reproducible: the fused backward sums per-thread partials, and the same
/// inputs must give bit-identical gradients on every call (a static work schedule).
#[test]
fn fused_layer_gradients_are_bit_reproducible() -> TestResult {
    use crate::{gauss_layer, GaussLayerConfig, InitConfig};
    use candle_nn::{VarBuilder, VarMap};
    for (dim, neurons) in [(16, 64), (48, 24)] {
        let varmap = VarMap::new();
        let config = GaussLayerConfig {
            init: InitConfig {
                seed: Some(7),
                ..Default::default()
            },
            ..Default::default()
        };
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let layer = gauss_layer(dim, neurons, config, vb)?;
        let x = normal(&mut StdRng::seed_from_u64(3), &[512, dim], 0.3).to_dtype(DType::F32)?;
        let gradients = || -> std::result::Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
            let (y, _) = layer.forward_with_gaussian(&x, None)?;
            let grads = y.sqr()?.sum_all()?.backward()?;
            let mut all = Vec::new();
            for var in varmap.all_vars() {
                let grad = grads.get(&var).ok_or("a parameter got no gradient")?;
                all.push(grad.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(all)
        };
        let first = gradients()?;
        for _ in 0..3 {
            assert_eq!(gradients()?, first, "d = {dim}, Z = {neurons}");
        }
    }
    Ok(())
}
