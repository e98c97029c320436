//! The fused CPU distance op: one Candle `CustomOp3` over (x, center, precision operand)
//! whose forward and backward run the diagonal, projected or expanded algorithm the
//! resolver planned, on host slices.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::expanded::{self, Source};
use super::factors::FactorMap;
use super::{diagonal, projected};
use crate::cpu::{
    dispatch_backward3, dispatch_float3, needs_input_gradient, poison_non_finite_rows,
    with_row_major, Gradients3, OperandShape, Real, Sizes,
};
use crate::error::Result;

/// Which algorithm runs each direction of the fused distance op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum FusedPlan {
    /// Diagonal precisions (diag, sphere, lowrank's diagonal part): the operand is the (Z, d)
    /// diagonal, forward and backward exact in B·Z·d ([`diagonal`]).
    Diagonal,
    /// Projected forward and backward (needs a factor).
    Projected(FactorMap),
    /// Expanded backward; the forward is expanded too unless `projected_forward` (which
    /// needs a factor), chosen where the expanded forward's row tiles would be too short for
    /// its scratch budget (large d).
    Expanded {
        source: Source,
        projected_forward: bool,
    },
}

impl FusedPlan {
    /// The shape of the plan's operand: (Z, d) for [`FusedPlan::Diagonal`], else (Z, d, d).
    pub(crate) fn operand_shape(self) -> OperandShape {
        match self {
            FusedPlan::Diagonal => OperandShape::Diagonal,
            _ => OperandShape::Square,
        }
    }

    /// `m2` (B, Z) into `out`.
    pub(super) fn forward_into<T: Real>(
        self,
        out: &mut [T],
        x: &[T],
        center: &[T],
        input: &[T],
        s: Sizes,
    ) {
        match self {
            FusedPlan::Diagonal => diagonal::forward_into(out, x, center, input, s),
            FusedPlan::Projected(map)
            | FusedPlan::Expanded {
                source: Source::Factor(map),
                projected_forward: true,
            } => projected::forward_into(out, x, center, input, map, s),
            FusedPlan::Expanded { source, .. } => {
                expanded::forward_into(out, x, center, input, source, s)
            }
        }
        poison_non_finite_rows(out, x, s.dim, s.neurons);
    }

    /// Gradients `(∂x, ∂c, ∂input)` of `Σ G ∘ m2`; `∂x` only `if input_gradient`.
    pub(super) fn backward<T: Real>(
        self,
        x: &[T],
        center: &[T],
        input: &[T],
        grad: &[T],
        s: Sizes,
        input_gradient: bool,
    ) -> Gradients3<T> {
        match self {
            FusedPlan::Diagonal => diagonal::backward(x, center, input, grad, s, input_gradient),
            FusedPlan::Projected(map) => {
                projected::backward(x, center, input, grad, map, s, input_gradient)
            }
            FusedPlan::Expanded { source, .. } => {
                expanded::backward(x, center, input, grad, source, s, input_gradient)
            }
        }
    }
}

/// The Candle op: inputs (x, center, precision operand), output m2 (B, Z).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FusedDistance {
    pub(crate) plan: FusedPlan,
    /// The sizes the public boundary checked; the op's inputs were built to them.
    pub(crate) sizes: Sizes,
}

impl FusedDistance {
    fn forward<T: Real>(&self, x: &[T], center: &[T], input: &[T], s: Sizes) -> Vec<T> {
        let mut out = vec![T::zero(); s.batch * s.neurons];
        self.plan.forward_into(&mut out, x, center, input, s);
        out
    }
}

impl CustomOp3 for FusedDistance {
    fn name(&self) -> &'static str {
        "fused-mahalanobis-sq"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = self.sizes.check_distance_inputs(
            self.name(),
            [l1.dims(), l2.dims(), l3.dims()],
            self.plan.operand_shape(),
        )?;
        let out = dispatch_float3(
            self.name(),
            "x, center and precision",
            [(s1, l1), (s2, l2), (s3, l3)],
            |x, c, p| CpuStorage::F32(self.forward(x, c, p, s)),
            |x, c, p| CpuStorage::F64(self.forward(x, c, p, s)),
        )?;
        Ok((out, Shape::from((s.batch, s.neurons))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        center: &Tensor,
        input: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.sizes.check_distance_inputs(
            self.name(),
            [x.dims(), center.dims(), input.dims()],
            self.plan.operand_shape(),
        )?;
        let plan = self.plan;
        let input_gradient = needs_input_gradient(x);
        // The clamp of a negative m2 (a matrix that is not positive definite) passes no
        // gradient; factors' m2 is never negative.
        let clamps = matches!(
            plan,
            FusedPlan::Expanded {
                source: Source::Matrix,
                ..
            }
        );
        let masked;
        let grad = match x.dtype() {
            DType::F32 if clamps => {
                masked = without_clamped::<f32>([x, center, input, res, grad], s)?;
                &masked
            }
            DType::F64 if clamps => {
                masked = without_clamped::<f64>([x, center, input, res, grad], s)?;
                &masked
            }
            _ => grad,
        };
        dispatch_backward3(
            self.name(),
            [x, center, input, grad],
            s.gradient_shapes(plan.operand_shape()),
            |x, c, p, g| plan.backward(x, c, p, g, s, input_gradient),
            |x, c, p, g| plan.backward(x, c, p, g, s, input_gradient),
        )
    }
}

/// The upstream gradient `grad` (B, Z) as `T`, zero where the expanded forward clamped a
/// negative `m2` to its output `res` (see [`expanded::zero_clamped_gradients`]).
fn without_clamped<T: Real>(
    [x, center, matrix, res, grad]: [&Tensor; 5],
    s: Sizes,
) -> candle_core::Result<Tensor> {
    let grad = grad.to_dtype(T::DTYPE)?;
    let mut values = with_row_major::<T, _>(&grad, |g| Ok(g.to_vec()))?;
    with_row_major::<T, _>(res, |res| {
        with_row_major::<T, _>(x, |x| {
            with_row_major::<T, _>(center, |c| {
                with_row_major::<T, _>(matrix, |a| {
                    expanded::zero_clamped_gradients(&mut values, res, T::zero(), x, c, a, s);
                    Ok(())
                })
            })
        })
    })?;
    Tensor::from_vec(values, grad.shape(), grad.device())
}

/// Runs the fused distance op with `plan` on inputs of the checked `sizes` (f32 or f64, one
/// dtype, on the CPU: what the resolver planned it for).
///
/// # Shapes
/// `x`: (B, d), `center`: (Z, d), `input`: (Z, d, d), (Z, d) for [`FusedPlan::Diagonal`]
/// → (B, Z)
pub(crate) fn apply(
    sizes: Sizes,
    x: &Tensor,
    center: &Tensor,
    input: &Tensor,
    plan: FusedPlan,
) -> Result<Tensor> {
    Ok(x.apply_op3(center, input, FusedDistance { plan, sizes })?)
}
