//! The sizes of a call and the checks every fused op's public entry makes.

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::{check_dtype, GaussError, Result};

/// Sizes of one call: B inputs, d dims, Z neurons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sizes {
    pub batch: usize,
    pub dim: usize,
    pub neurons: usize,
}

/// The shape a distance op expects for its precision operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OperandShape {
    /// (Z, d): a diagonal precision.
    Diagonal,
    /// (Z, d, d): a factor, a raw parameter or a matrix.
    Square,
}

impl Sizes {
    /// Checks x (B, d), center (Z, d) and the precision operand, naming the one at fault.
    pub(crate) fn of(
        x: &[usize],
        center: &[usize],
        operand: &[usize],
        operand_shape: OperandShape,
        operand_what: &str,
    ) -> Result<Self> {
        let &[batch, dim] = x else {
            return Err(GaussError::shape("input x", "(batch, d)", x));
        };
        let &[neurons, center_dim] = center else {
            return Err(GaussError::shape("center", format!("(Z, {dim})"), center));
        };
        if center_dim != dim {
            return Err(GaussError::shape(
                "center",
                format!("({neurons}, {dim}) (d from the input x)"),
                center,
            ));
        }
        let (ok, expected) = match operand_shape {
            OperandShape::Diagonal => (operand == [neurons, dim], format!("({neurons}, {dim})")),
            OperandShape::Square => (
                operand == [neurons, dim, dim],
                format!("({neurons}, {dim}, {dim})"),
            ),
        };
        if !ok {
            return Err(GaussError::shape(operand_what, expected, operand));
        }
        Ok(Sizes {
            batch,
            dim,
            neurons,
        })
    }

    /// Shapes of the gradients to x (B, d), the centers (Z, d) and the operand.
    pub(crate) fn gradient_shapes(self, operand_shape: OperandShape) -> [Shape; 3] {
        [
            (self.batch, self.dim).into(),
            (self.neurons, self.dim).into(),
            match operand_shape {
                OperandShape::Diagonal => (self.neurons, self.dim).into(),
                OperandShape::Square => (self.neurons, self.dim, self.dim).into(),
            },
        ]
    }
}

/// The checks of a fused op's public entry: shapes, one dtype (f32 or f64) for all inputs,
/// and the CPU. Returns the sizes.
pub(crate) fn check_fused_inputs(
    op: &str,
    [x, center, operand]: [&Tensor; 3],
    operand_shape: OperandShape,
    operand_what: &str,
) -> Result<Sizes> {
    let sizes = Sizes::of(
        x.dims(),
        center.dims(),
        operand.dims(),
        operand_shape,
        operand_what,
    )?;
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        return Err(GaussError::dtype(
            format!("{op}: input x"),
            "F32 or F64 (the fused CPU kernels' dtypes)",
            x.dtype(),
        ));
    }
    check_dtype("center", center, x.dtype(), "the input x")?;
    check_dtype(operand_what, operand, x.dtype(), "the input x")?;
    for (what, tensor) in [("input x", x), ("center", center), (operand_what, operand)] {
        if !tensor.device().is_cpu() {
            return Err(GaussError::device(
                format!("{op}: {what}"),
                &Device::Cpu,
                "a fused CPU kernel; the layer runs the portable form on other devices",
                tensor.device(),
            ));
        }
    }
    Ok(sizes)
}
