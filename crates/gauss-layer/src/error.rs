//! The error type of `gauss-layer` and `gauss-losses` (one type for both, as candle has one
//! for its crates).
//!
//! Every fallible function returns [`Result`]. Errors name what was expected and what came
//! (a shape, a tensor name, a config field), so a user can fix the call without reading code.

use candle_core::{DType, Device, DeviceLocation, Tensor};

/// Errors returned by `gauss-layer` and `gauss-losses`.
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

    /// A tensor had a dtype that does not fit: another tensor's, or one the operation does
    /// not support.
    #[error("{what}: expected dtype {expected}, got {got:?}")]
    DType {
        /// Which tensor was at fault.
        what: String,
        /// The dtype(s) that would work, in words, e.g. `"F32 (the dtype of center)"` or
        /// `"one of F16, BF16, F32 or F64"`.
        expected: String,
        /// The dtype that came.
        got: DType,
    },

    /// A tensor on another device than the one it must share (the layer's, another
    /// argument's), or one an operation does not run on (a fused CPU kernel given a GPU
    /// tensor).
    #[error("{what}: expected device {expected:?} ({whose}), got {got:?}")]
    DeviceMismatch {
        /// Which tensor was at fault, e.g. `"input x"`.
        what: String,
        /// The device it must be on.
        expected: DeviceLocation,
        /// Whose device that is, or why, e.g. `"the device of center"`.
        whose: String,
        /// The device it is on.
        got: DeviceLocation,
    },

    /// A batch with no samples where at least one is needed (its mean is undefined).
    #[error("{what}: expected at least one sample, got an empty batch of shape {got:?}")]
    EmptyBatch {
        /// Which tensor was empty.
        what: String,
        /// Its shape.
        got: Vec<usize>,
    },

    /// A loss over the layers of a network was asked for with no layers at all.
    #[error("{what}: expected at least one Gaussian layer, got none")]
    NoLayers {
        /// Which loss was asked for.
        what: &'static str,
    },

    /// A configuration that cannot work (zero features, non-positive floors, ...).
    #[error("invalid config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it cannot work, naming the value that came.
        reason: String,
    },

    /// An index (of a neuron, a component, ...) at or past the end of what it indexes. Not a
    /// config error: it is an argument.
    #[error("{what}: index {index} is out of range for {len}")]
    IndexOutOfRange {
        /// What was indexed, e.g. `"neuron of the layer"`.
        what: String,
        /// The index that came.
        index: usize,
        /// How many there are (valid indices are below it).
        len: usize,
    },

    /// A precision matrix that should be positive definite is not.
    #[error("precision of neuron {neuron} is not positive definite (smallest eigenvalue {min_eigenvalue:e})")]
    NotPositiveDefinite {
        /// Index of the first offending neuron.
        neuron: usize,
        /// Its smallest eigenvalue (for checks that only see a Cholesky pivot: the pivot, an
        /// upper bound of the smallest eigenvalue's sign).
        min_eigenvalue: f64,
    },

    /// A numerical result that cannot be represented in the working dtype (an overflowing
    /// matrix exponential, ...).
    #[error("{what}: {reason}")]
    Numerical {
        /// Which computation failed.
        what: String,
        /// Why, naming the value at fault.
        reason: String,
    },

    /// A checkpoint file could not be read, parsed or validated.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong, naming the tensor or metadata field at fault.
        reason: String,
    },

    /// Data whose content cannot be used: a data file (samples, images, labels, a state
    /// dict's values) with a missing tensor, a wrong shape or dtype, a value that is not finite
    /// or does not fit the dtype it must be used in, a path that is not a regular file; or the
    /// values of a tensor argument (an input holding NaN where it is checked, samples with too
    /// few distinct points, a diagonal that must be positive). Not a config error: no setting
    /// fixes it.
    #[error("{origin}: {reason}")]
    Data {
        /// The file (or other source) at fault.
        origin: String,
        /// What is wrong, naming the tensor and element at fault.
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

    /// Shorthand for a [`GaussError::Data`] error.
    pub fn data(origin: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Data {
            origin: origin.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for a [`GaussError::DeviceMismatch`] error.
    pub fn device(
        what: impl Into<String>,
        expected: &Device,
        whose: impl Into<String>,
        got: &Device,
    ) -> Self {
        Self::DeviceMismatch {
            what: what.into(),
            expected: expected.location(),
            whose: whose.into(),
            got: got.location(),
        }
    }

    /// Shorthand for a [`GaussError::DType`] error.
    pub fn dtype(what: impl Into<String>, expected: impl Into<String>, got: DType) -> Self {
        Self::DType {
            what: what.into(),
            expected: expected.into(),
            got,
        }
    }
}

/// Checks that `tensor` has dtype `expected`, naming `what` and, in the message, `whose` (the
/// tensor whose dtype it must share, e.g. `"center"`): the one dtype check of this crate and
/// `gauss-losses`.
///
/// # Errors
/// [`GaussError::DType`] when the dtypes differ.
pub fn check_dtype(what: &str, tensor: &Tensor, expected: DType, whose: &str) -> Result<()> {
    if tensor.dtype() != expected {
        return Err(GaussError::dtype(
            what,
            format!("{expected:?} (the dtype of {whose})"),
            tensor.dtype(),
        ));
    }
    Ok(())
}

/// Checks that `tensor` is on `expected`, the device of `whose` (named in the message, e.g.
/// `"center"`), naming `what` when it is not (public for the losses, as [`check_dtype`]).
///
/// # Errors
/// [`GaussError::DeviceMismatch`].
pub fn check_device(what: &str, tensor: &Tensor, expected: &Device, whose: &str) -> Result<()> {
    if !tensor.device().same_device(expected) {
        return Err(GaussError::device(
            what,
            expected,
            format!("the device of {whose}"),
            tensor.device(),
        ));
    }
    Ok(())
}

/// Checks that `dtype` is a float dtype the layer supports (F16, BF16, F32, F64), naming
/// `what` when it is not (public for the losses, as [`check_dtype`]: Candle has no integer
/// kernels for the logarithms and exponentials, and panics on them).
///
/// # Errors
/// [`GaussError::DType`] for any other dtype.
pub fn check_float_dtype(what: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 => Ok(()),
        other => Err(GaussError::dtype(what, FLOAT_DTYPES, other)),
    }
}

/// What [`check_float_dtype`] accepts, in the words of its error: "expected dtype {this}".
pub(crate) const FLOAT_DTYPES: &str = "one of F16, BF16, F32 or F64";

/// Lets errors flow through Candle's `Result` (e.g. in `Module::forward`).
impl From<GaussError> for candle_core::Error {
    fn from(err: GaussError) -> Self {
        match err {
            GaussError::Candle(inner) => inner,
            other => candle_core::Error::wrap(other),
        }
    }
}
