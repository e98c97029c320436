//! Fast-path kernels against a broadcast (B, Z, d) oracle built from Candle ops, forward and
//! backward (the oracle's gradients come from Candle's autograd), the resolver, and the fused
//! layer op; one file per subject.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::conditioning::Conditioning;
use super::distance_op::{self, FusedPlan};
use super::expanded::Source;
use super::factors::FactorMap;
use super::{expanded, layer_op, linear_op, Operand};
use crate::config::{DistanceKernel, PositiveMap};
use crate::cpu::Sizes;
use crate::error::GaussError;
use crate::precision::Precision;

mod diagonal_tests;
mod edge_tests;
mod expanded_tests;
mod input_gradient_tests;
mod layer_op_tests;
mod projected_tests;
mod resolver_tests;

pub(super) type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

pub(super) fn normal(rng: &mut StdRng, shape: &[usize], std: f64) -> Tensor {
    let count: usize = shape.iter().product();
    let data: Vec<f64> = (0..count)
        .map(|_| std * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("test tensor")
}

/// Inputs for B × Z × d: centers spread with norm up to about `center_norm`, inputs half near
/// a center (about one width away, where cancellation shows) and half anywhere, and
/// lower-triangular factors with a positive diagonal and unit-scale widths.
pub(super) struct Case {
    pub x: Tensor,
    pub center: Tensor,
    pub factor: Tensor,
}

pub(super) fn case(seed: u64, batch: usize, dim: usize, neurons: usize, center_norm: f64) -> Case {
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
pub(super) fn oracle_projected(
    x: &Tensor,
    center: &Tensor,
    factor: &Tensor,
) -> candle_core::Result<Tensor> {
    let diff = x.unsqueeze(1)?.broadcast_sub(&center.unsqueeze(0)?)?; // (B, Z, d)
    let u = diff.unsqueeze(2)?.broadcast_matmul(&factor.unsqueeze(0)?)?; // (B, Z, 1, d)
    u.sqr()?.sum((2, 3))
}

pub(super) fn oracle_diagonal(
    x: &Tensor,
    center: &Tensor,
    diag: &Tensor,
) -> candle_core::Result<Tensor> {
    let diff = x.unsqueeze(1)?.broadcast_sub(&center.unsqueeze(0)?)?;
    diff.sqr()?
        .broadcast_mul(&diag.unsqueeze(0)?)?
        .sum(D::Minus1)
}

/// Largest `|a - b| / max(|b|, floor)` over all elements (both compared in f64).
// f64: tests of the fused CPU kernels run on the CPU only
pub(super) fn max_relative_error(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    let a = a.to_dtype(DType::F64).and_then(|t| t.flatten_all());
    // f64: tests of the fused CPU kernels run on the CPU only
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
pub(super) fn gradient_error(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(max_relative_error(a, b, scale))
}

/// Gradients of `Σ G ∘ m2` for a fixed random `G`, from the fused op and from autograd
/// through `oracle`.
pub(super) fn gradients(
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

/// Gradients of `op` on the f32 values of a case against autograd through the f64 projected
/// oracle on those very values, for an upstream gradient drawn from `upstream_seed`.
pub(super) fn check_f32_gradients(
    op: impl Fn(&Tensor, &Tensor, &Tensor) -> crate::Result<Tensor>,
    c: &Case,
    upstream_seed: u64,
) -> TestResult {
    let (batch, neurons) = (c.x.dim(0)?, c.center.dim(0)?);
    let mut rng = StdRng::seed_from_u64(upstream_seed);
    let upstream = normal(&mut rng, &[batch, neurons], 1.0).to_dtype(DType::F32)?;
    let inputs32 = [&c.x, &c.center, &c.factor].map(|t| t.to_dtype(DType::F32).expect("f32"));
    let fused = gradients(op, [&inputs32[0], &inputs32[1], &inputs32[2]], &upstream)?;
    // f64: tests of the fused CPU kernels run on the CPU only
    let inputs64 = inputs32
        .clone()
        .map(|t| t.to_dtype(DType::F64).expect("f64"));
    // f64: tests of the fused CPU kernels run on the CPU only
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

/// `P = F Fᵀ` of a case.
pub(super) fn precision_of(c: &Case) -> candle_core::Result<Tensor> {
    c.factor.matmul(&c.factor.transpose(1, 2)?)
}

/// `L = tril(raw, -1) + diag(map(diag raw) + floor)` as tensor ops.
pub(super) fn cholesky_factor_oracle(
    raw: &Tensor,
    exp_map: bool,
    floor: f64,
) -> candle_core::Result<Tensor> {
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

/// Centered `|c_z - c̄|² · ‖P_z‖_∞`, the scale of the terms the expanded form cancels.
pub(super) fn expanded_scale(center: &Tensor, precision: &Tensor) -> candle_core::Result<f64> {
    let spread = center
        .broadcast_sub(&center.mean_keepdim(0)?)?
        .sqr()?
        .sum(D::Minus1)?;
    let norm = precision.abs()?.sum(2)?.max(1)?;
    spread.mul(&norm)?.max(0)?.to_scalar::<f64>()
}

/// The fused projected op on a factor.
pub(super) fn projected_fused(x: &Tensor, c: &Tensor, f: &Tensor) -> crate::Result<Tensor> {
    distance_op::apply(
        sizes(x, c)?,
        x,
        c,
        f,
        FusedPlan::Projected(FactorMap::Identity),
    )
}

/// The fused projected op on a raw Cholesky parameter (the map inside the op).
pub(super) fn cholesky_fused(
    x: &Tensor,
    c: &Tensor,
    raw: &Tensor,
    positive_map: PositiveMap,
    floor: f64,
) -> crate::Result<Tensor> {
    let map = FactorMap::Cholesky {
        positive_map,
        floor,
    };
    distance_op::apply(sizes(x, c)?, x, c, raw, FusedPlan::Projected(map))
}

/// The fused expanded op on a precision matrix.
pub(super) fn expanded_fused(x: &Tensor, c: &Tensor, p: &Tensor) -> crate::Result<Tensor> {
    let plan = FusedPlan::Expanded {
        source: Source::Matrix,
        projected_forward: false,
    };
    distance_op::apply(sizes(x, c)?, x, c, p, plan)
}

/// The fused expanded op on a factor.
pub(super) fn expanded_fused_factor(x: &Tensor, c: &Tensor, f: &Tensor) -> crate::Result<Tensor> {
    let plan = FusedPlan::Expanded {
        source: Source::Factor(FactorMap::Identity),
        projected_forward: false,
    };
    distance_op::apply(sizes(x, c)?, x, c, f, plan)
}

/// The portable expanded form.
pub(super) fn expanded_portable(x: &Tensor, c: &Tensor, p: &Tensor) -> crate::Result<Tensor> {
    expanded::portable(x, c, p)
}

/// The fused diagonal op.
pub(super) fn diagonal_fused(x: &Tensor, c: &Tensor, p: &Tensor) -> crate::Result<Tensor> {
    distance_op::apply(sizes(x, c)?, x, c, p, FusedPlan::Diagonal)
}

/// The resolver's distances (fused where it applies).
pub(super) fn mahalanobis_sq(
    x: &Tensor,
    c: &Tensor,
    precision: &Precision,
    kernel: DistanceKernel,
    portable: bool,
) -> crate::Result<Tensor> {
    super::mahalanobis_sq(sizes(x, c)?, x, c, precision, kernel, portable)
}

/// The sizes of a call on rows `x` (B, d) and centers `c` (Z, d).
pub(super) fn sizes(x: &Tensor, c: &Tensor) -> crate::Result<Sizes> {
    let ((batch, dim), (neurons, _)) = (x.dims2()?, c.dims2()?);
    Ok(Sizes {
        batch,
        dim,
        neurons,
    })
}
/// The kernel the resolver picks on the default (fused) path.
pub(super) fn resolve_kernel(
    x: &Tensor,
    c: &Tensor,
    precision: &Precision,
    kernel: DistanceKernel,
) -> crate::Result<super::ResolvedKernel> {
    Ok(super::resolve(sizes(x, c)?, x, c, precision, kernel, false)?.kernel)
}

/// The fused layer op where the resolver plans a fused distance, else `None`.
pub(super) fn layer_fused(
    x: &Tensor,
    center: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    precision: &Precision,
    kernel: DistanceKernel,
) -> crate::Result<Option<(Tensor, Tensor)>> {
    let resolved = super::resolve(sizes(x, center)?, x, center, precision, kernel, false)?;
    match resolved.operand {
        Operand::Fused(input, plan) => Ok(Some(layer_op::forward(
            resolved.sizes,
            x,
            center,
            weight,
            bias,
            &input,
            plan,
            false,
        )?)),
        _ => Ok(None),
    }
}

/// The conditioning check on a center and a precision matrix (f32 or f64, CPU).
pub(super) fn expanded_is_accurate(center: &Tensor, precision: &Tensor) -> crate::Result<bool> {
    let (neurons, dim) = center.dims2()?;
    let s = Sizes {
        batch: 0,
        dim,
        neurons,
    };
    let dtype = center.dtype();
    // f64: tests of the fused CPU kernels run on the CPU only
    let c = center
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    // f64: tests of the fused CPU kernels run on the CPU only
    let p = precision
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(Conditioning::measure(&c, &p, Source::Matrix, s).expanded_is_accurate(dtype))
}
