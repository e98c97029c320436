//! The sizes of a call, checked once at the public boundary and passed inward, and the
//! fused ops' guard that Candle hands them the inputs they were built for.

use candle_core::Shape;

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
    /// The fused distance ops' guard (see [`check_built_for`]) on x (B, d), the centers
    /// (Z, d) and an operand of `operand_shape`; returns the sizes.
    pub(crate) fn check_distance_inputs(
        self,
        op: &str,
        dims: [&[usize]; 3],
        operand_shape: OperandShape,
    ) -> candle_core::Result<Self> {
        check_built_for(op, dims, &self.gradient_shapes(operand_shape))?;
        Ok(self)
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

/// A fused op's guard on what Candle hands it: the inputs must have the shapes the op was
/// built for (from sizes its caller checked at the public boundary). Internal: a mismatch is
/// a bug in this crate, reported as an error rather than a slice panic.
pub(crate) fn check_built_for(
    op: &str,
    dims: [&[usize]; 3],
    expected: &[Shape; 3],
) -> candle_core::Result<()> {
    if dims.iter().zip(expected).any(|(d, e)| *d != e.dims()) {
        candle_core::bail!("{op}: inputs {dims:?}, built for {expected:?}");
    }
    Ok(())
}
