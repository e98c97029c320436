//! The error type of the crate.
//!
//! Every fallible function returns [`Result`]. Errors name what was expected and what came
//! (a shape, a tensor name, a config field), so a user can fix the call without reading code.

/// Errors returned by `gauss-layer`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GaussError {
    /// An error from Candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A tensor argument had the wrong shape (rank, width, batch size).
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        /// Which tensor or argument was at fault, e.g. `"input x"`.
        what: String,
        /// The expected shape in words, e.g. `"(batch, 64)"`.
        expected: String,
        /// The shape that came.
        got: Vec<usize>,
    },

    /// A tensor had the wrong dtype.
    #[error("{what}: expected dtype {expected:?}, got {got:?}")]
    DType {
        /// Which tensor was at fault.
        what: String,
        /// The expected dtype.
        expected: candle_core::DType,
        /// The dtype that came.
        got: candle_core::DType,
    },

    /// A configuration that cannot work (zero features, non-positive floors, ...).
    #[error("invalid config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it cannot work, naming the value that came.
        reason: String,
    },

    /// A precision matrix that should be positive definite is not.
    #[error("precision of neuron {neuron} is not positive definite (smallest eigenvalue {min_eigenvalue:e})")]
    NotPositiveDefinite {
        /// Index of the first offending neuron.
        neuron: usize,
        /// Its smallest eigenvalue.
        min_eigenvalue: f64,
    },

    /// A checkpoint file could not be read, parsed or validated.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong, naming the tensor or metadata field at fault.
        reason: String,
    },

    /// An I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// `Result` with [`GaussError`].
pub type Result<T> = std::result::Result<T, GaussError>;

impl GaussError {
    /// Shorthand for a [`GaussError::Shape`] error.
    pub fn shape(what: impl Into<String>, expected: impl Into<String>, got: &[usize]) -> Self {
        Self::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }

    /// Shorthand for a [`GaussError::InvalidConfig`] error.
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

/// Lets `gauss-layer` errors flow through Candle's `Result` (e.g. in `Module::forward`).
impl From<GaussError> for candle_core::Error {
    fn from(err: GaussError) -> Self {
        match err {
            GaussError::Candle(inner) => inner,
            other => candle_core::Error::wrap(other),
        }
    }
}
