//! The error type of the crate.
//!
//! Every fallible function returns [`Result`]. Errors name what was expected and what came,
//! so a caller can fix the call without reading the code.

use candle_core::DType;

/// Errors returned by `gauss-losses`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LossError {
    /// An error from the `gauss-layer` crate (layer, precision, linear algebra).
    #[error(transparent)]
    Gauss(#[from] gauss_layer::GaussError),

    /// An error from Candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A tensor argument had the wrong shape (rank or width).
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        /// Which tensor was at fault, e.g. `"samples x"`.
        what: String,
        /// The expected shape in words, e.g. `"(batch, 3)"`.
        expected: String,
        /// The shape that came.
        got: Vec<usize>,
    },

    /// A batch with no samples: its mean is undefined.
    #[error("{what}: expected at least one sample, got an empty batch of shape {got:?}")]
    EmptyBatch {
        /// Which tensor was empty.
        what: String,
        /// Its shape.
        got: Vec<usize>,
    },

    /// Two tensors that must share a dtype do not.
    #[error("{what}: expected dtype {expected:?}, got {got:?}")]
    DType {
        /// Which tensor was at fault.
        what: String,
        /// The expected dtype.
        expected: DType,
        /// The dtype that came.
        got: DType,
    },

    /// A loss over the layers of a network was asked for with no layers at all.
    #[error("{what}: expected at least one Gaussian layer, got none")]
    NoLayers {
        /// Which loss was asked for.
        what: &'static str,
    },

    /// A hyper-parameter that cannot work (negative or non-finite weight of a loss term).
    #[error("invalid config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it cannot work, naming the value that came.
        reason: String,
    },
}

/// `Result` with [`LossError`].
pub type Result<T> = std::result::Result<T, LossError>;

impl LossError {
    /// Shorthand for a [`LossError::Shape`] error.
    pub fn shape(what: impl Into<String>, expected: impl Into<String>, got: &[usize]) -> Self {
        Self::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }
}

/// Lets loss errors flow through Candle's `Result` (e.g. inside a training closure).
impl From<LossError> for candle_core::Error {
    fn from(err: LossError) -> Self {
        match err {
            LossError::Candle(inner) => inner,
            LossError::Gauss(inner) => inner.into(),
            other => candle_core::Error::wrap(other),
        }
    }
}
