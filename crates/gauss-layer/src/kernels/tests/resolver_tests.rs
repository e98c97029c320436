use super::*;
use crate::config::PrecisionConfig;

/// The resolver through every parameterization (with and without a width floor), on the
/// default and the portable path, against the naive kernel: values and gradients to x,
/// centers and the raw precision parameter.
#[test]
fn dispatcher_agrees_with_naive_for_every_parameterization() -> TestResult {
    use crate::config::{GaussLayerConfig, Parameterization};
    use crate::kernels::ResolvedKernel;
    use crate::precision::Precision;
    let (batch, dim, neurons) = (23, 5, 7);
    for parameterization in Parameterization::ALL {
        for width_floor in [None, Some(0.5)] {
            if width_floor.is_some() && matches!(parameterization, Parameterization::LowRank { .. })
            {
                continue; // a config error for lowrank
            }
            for portable in [false, true] {
                let config = GaussLayerConfig {
                    precision: PrecisionConfig {
                        parameterization,
                        width_floor,
                        portable,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let what = format!("{parameterization} {width_floor:?} portable {portable}");
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
                            mahalanobis_sq(x, center, &precision, kernel, portable)
                        },
                        [&c.x, &c.center, &raw],
                        &upstream,
                    )
                };
                let precision = Precision::from_raw(raw.clone(), dim, &config)?;
                let resolved = super::super::resolve(
                    super::sizes(&c.x, &c.center)?,
                    &c.x,
                    &c.center,
                    &precision,
                    DistanceKernel::Auto,
                    portable,
                )?
                .kernel;
                // Centers of norm 3 with these widths pass the conditioning check on the
                // default path: the factor and matrix forms take the fused expanded op (its
                // forward at full tiles for d = 5). The portable path reads no data to decide.
                let expected_kernel = match (parameterization, portable) {
                    (Parameterization::Diag | Parameterization::Sphere, false) => {
                        ResolvedKernel::DiagonalFused
                    }
                    (Parameterization::Diag | Parameterization::Sphere, true) => {
                        ResolvedKernel::DiagonalTensorOps
                    }
                    (Parameterization::LowRank { .. }, false) => ResolvedKernel::LowRankFused,
                    (Parameterization::LowRank { .. }, true) => ResolvedKernel::LowRankTensorOps,
                    (_, false) => ResolvedKernel::ExpandedFused,
                    (Parameterization::Direct, true) => ResolvedKernel::Naive,
                    (_, true) => ResolvedKernel::ProjectedTensorOps,
                };
                assert_eq!(resolved, expected_kernel, "{what}");
                for forced in [DistanceKernel::Projected, DistanceKernel::Expanded] {
                    let Ok(kernel) = resolve_kernel(&c.x, &c.center, &precision, forced) else {
                        continue;
                    };
                    let is_expanded = matches!(
                        kernel,
                        ResolvedKernel::ExpandedFused | ResolvedKernel::ExpandedTensorOps
                    );
                    if !matches!(
                        kernel,
                        ResolvedKernel::DiagonalFused | ResolvedKernel::DiagonalTensorOps
                    ) {
                        assert_eq!(
                            is_expanded,
                            forced == DistanceKernel::Expanded,
                            "{kernel:?}"
                        );
                    }
                }
                let auto =
                    mahalanobis_sq(&c.x, &c.center, &precision, DistanceKernel::Auto, portable)?;
                let naive =
                    mahalanobis_sq(&c.x, &c.center, &precision, DistanceKernel::Naive, portable)?;
                let err = max_relative_error(&auto, &naive, 1.0);
                assert!(err < 1e-9, "{what}: m2 error {err:e}");
                let fast = run(DistanceKernel::Auto)?;
                let slow = run(DistanceKernel::Naive)?;
                for (name, (a, b)) in ["x", "center", "raw"].iter().zip(fast.iter().zip(&slow)) {
                    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
                    let err = max_relative_error(a, b, scale);
                    assert!(err < 1e-8, "{what}: ∂{name} error {err:e}");
                }
            }
        }
    }
    Ok(())
}

/// A batch of Z precision factors `L` (lower, from an f64 Cholesky) whose `P = L Lᵀ` has
/// condition number `kappa`: random orthogonal eigenvectors, eigenvalues log-spaced in
/// [1/κ, 1]; and B points per neuron one Mahalanobis unit from its center (`x = c + L⁻ᵀ u`),
/// where the Gaussian has its mass and a relative error in `m2` matters.
fn ill_conditioned(
    seed: u64,
    neurons: usize,
    dim: usize,
    batch: usize,
    kappa: f64,
) -> crate::Result<(Tensor, Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut p = vec![0f64; neurons * dim * dim];
    for z in 0..neurons {
        let mut q: Vec<Vec<f64>> = Vec::new();
        while q.len() < dim {
            let mut v: Vec<f64> = (0..dim)
                .map(|_| rng.sample::<f64, _>(StandardNormal))
                .collect();
            for u in &q {
                let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(vi, ui)| *vi -= dot * ui);
            }
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            v.iter_mut().for_each(|vi| *vi /= norm);
            q.push(v);
        }
        for i in 0..dim {
            for j in 0..dim {
                p[z * dim * dim + i * dim + j] = (0..dim)
                    .map(|k| {
                        let t = k as f64 / (dim - 1).max(1) as f64;
                        q[k][i] * kappa.powf(-t) * q[k][j]
                    })
                    .sum();
            }
        }
    }
    let p = Tensor::from_vec(p, (neurons, dim, dim), &Device::Cpu)?;
    let lower = crate::linalg::cholesky(&p)?;
    let center = normal(&mut rng, &[neurons, dim], 0.3);
    let u = normal(&mut rng, &[neurons, batch, dim], 1.0);
    let delta = u.matmul(&crate::linalg::tril_inverse(&lower)?)?;
    let x = delta
        .broadcast_add(&center.unsqueeze(1)?)?
        .reshape((neurons * batch, dim))?;
    Ok((x, center, lower))
}

/// The issue this check exists for: in f32 the expanded form's relative error grows like
/// `eps · κ(P)` near a neuron (1e-3 and worse at κ = 1e6), the projected form's like `eps ·
/// √κ`. `Auto` must send an ill-conditioned cholesky layer to the projected form and keep
/// the f32 error near 1e-5, and keep the expanded form for a well-conditioned one.
#[test]
fn auto_avoids_the_expanded_form_for_ill_conditioned_precisions() -> TestResult {
    use crate::config::{GaussLayerConfig, PositiveMap};
    use crate::kernels::ResolvedKernel;
    for dim in [2, 16] {
        for (kappa, expected) in [
            (1.0, ResolvedKernel::ExpandedFused),
            (1e6, ResolvedKernel::ProjectedFused),
        ] {
            let (x, center, lower) = ill_conditioned(dim as u64, 3, dim, 64, kappa)?;
            // The cholesky parameterization holding exactly these f32 factors (exp map, no
            // floor, so raw = tril(L, -1) + diag(log L_ii)).
            let config = GaussLayerConfig {
                precision: PrecisionConfig {
                    positive_map: PositiveMap::Exp,
                    factor_diag_floor: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            };
            let lower32 = lower.to_dtype(DType::F32)?;
            let eye = Tensor::eye(dim, DType::F32, &Device::Cpu)?;
            let diagonal = lower32.broadcast_mul(&eye)?;
            let log_diagonal = diagonal.sum(2)?.log()?.unsqueeze(2)?.broadcast_mul(&eye)?;
            let raw = ((&lower32 - &diagonal)? + log_diagonal)?;
            let precision = Precision::from_raw(raw, dim, &config)?;
            let [x32, c32] = [&x, &center].map(|t| t.to_dtype(DType::F32).expect("f32"));
            // Reference: f64 on the very f32 values (factor rebuilt as the layer builds it).
            let factor64 = precision.factor()?.ok_or("cholesky has a factor")?;
            // f64: tests of the fused CPU kernels run on the CPU only
            let factor64 = factor64.to_dtype(DType::F64)?;
            let p64 = factor64.matmul(&factor64.transpose(1, 2)?)?;
            // f64: tests of the fused CPU kernels run on the CPU only
            let as64 = |t: &Tensor| t.to_dtype(DType::F64).expect("f64");
            let expected_m2 = crate::ops::mahalanobis_sq_naive(&as64(&x32), &as64(&c32), &p64)?;
            let auto = resolve_kernel(&x32, &c32, &precision, DistanceKernel::Auto)?;
            assert_eq!(auto, expected, "d = {dim}, κ = {kappa:e}");
            let error = |kernel| -> crate::Result<f64> {
                let m2 = mahalanobis_sq(&x32, &c32, &precision, kernel, false)?;
                Ok(max_relative_error(&m2, &expected_m2, 1.0))
            };
            let auto_error = error(DistanceKernel::Auto)?;
            assert!(
                auto_error < 1e-4,
                "d = {dim}, κ = {kappa:e}: Auto error {auto_error:e}"
            );
            if kappa > 1e3 {
                // What the check avoids: the forced expanded form loses three more digits.
                let forced = error(DistanceKernel::Expanded)?;
                assert!(
                    forced > 1e-3,
                    "d = {dim}: forced expanded error only {forced:e}"
                );
            }
        }
    }
    Ok(())
}

/// Where the batch is at most twice the width the projected backward is the faster one
/// (`projected_backward_is_faster`): `Auto` takes the projected op for a well-conditioned
/// cholesky layer that the check would pass, and the expanded op from one row more.
#[test]
fn auto_takes_the_projected_form_for_batches_up_to_twice_the_width() -> TestResult {
    use crate::config::GaussLayerConfig;
    use crate::kernels::ResolvedKernel;
    let dim = 12;
    for (batch, expected) in [
        (2 * dim, ResolvedKernel::ProjectedFused),
        (2 * dim + 1, ResolvedKernel::ExpandedFused),
    ] {
        let c = case(43, batch, dim, 10, 1.0);
        let precision = Precision::from_raw(c.factor.clone(), dim, &GaussLayerConfig::default())?;
        let kernel = resolve_kernel(&c.x, &c.center, &precision, DistanceKernel::Auto)?;
        assert_eq!(kernel, expected, "batch {batch}");
    }
    Ok(())
}
