//! Precision parameterizations: raw learnable tensors → per-neuron precision `P`, covariance
//! `S = P⁻¹`, `log det P`, `tr S`, `tr P`.
//!
//! SKELETON: signatures are the contract other modules build on; bodies are being filled in.

use candle_core::Tensor;

use crate::config::{GaussLayerConfig, Parameterization, PositiveMap};
use crate::error::Result;

/// The precision matrices of a layer's Z neurons over d inputs, in one parameterization.
#[derive(Clone, Debug)]
pub struct Precision {
    parameterization: Parameterization,
    raw: Tensor,
    positive_map: PositiveMap,
    factor_diag_floor: f64,
    dim: usize,
}

impl Precision {
    /// Wraps a raw parameter tensor (the one stored under [`Precision::tensor_name`]).
    ///
    /// # Shapes
    /// `raw`: cholesky, direct, expm (Z, d, d); diag (Z, d); sphere (Z).
    /// `dim` is d (needed for sphere, checked for the others).
    pub fn from_raw(raw: Tensor, dim: usize, config: &GaussLayerConfig) -> Result<Self> {
        let _ = (raw, dim, config);
        todo!()
    }

    /// Builds the raw tensor that represents the given precision matrices exactly (inverse
    /// of the parameterization's map): used by importers, conversions and tests.
    /// Errors if `P` is not representable (not PD; not diagonal for diag; not a multiple of
    /// the identity for sphere).
    ///
    /// # Shapes
    /// `precision`: (Z, d, d)
    pub fn from_precision_matrix(precision: &Tensor, config: &GaussLayerConfig) -> Result<Self> {
        let _ = (precision, config);
        todo!()
    }

    /// The VarBuilder / checkpoint name of the raw tensor for a parameterization:
    /// `precision_factor` (cholesky), `precision` (direct), `precision_log` (expm),
    /// `precision_log_diag` (diag), `precision_log_scale` (sphere).
    pub fn tensor_name(parameterization: Parameterization) -> &'static str {
        match parameterization {
            Parameterization::Cholesky => "precision_factor",
            Parameterization::Direct => "precision",
            Parameterization::Expm => "precision_log",
            Parameterization::Diag => "precision_log_diag",
            Parameterization::Sphere => "precision_log_scale",
        }
    }

    /// The parameterization.
    pub fn parameterization(&self) -> Parameterization {
        self.parameterization
    }

    /// The raw learnable tensor.
    pub fn raw(&self) -> &Tensor {
        &self.raw
    }

    /// Input dimension d.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// A factor `F` with `P = F Fᵀ` where one is cheap: cholesky (`L`, lower triangular),
    /// expm (`expm(A/2)`), diag/sphere (diagonal); `None` for direct.
    ///
    /// # Shapes
    /// → (Z, d, d)
    pub fn factor(&self) -> Result<Option<Tensor>> {
        let _ = (self.positive_map, self.factor_diag_floor);
        todo!()
    }

    /// The diagonal of `P` for diag and sphere (sphere broadcast to d), `None` otherwise.
    ///
    /// # Shapes
    /// → (Z, d)
    pub fn diagonal_precision(&self) -> Result<Option<Tensor>> {
        todo!()
    }

    /// The precision matrices `P`.
    ///
    /// # Shapes
    /// → (Z, d, d)
    pub fn precision_matrix(&self) -> Result<Tensor> {
        todo!()
    }

    /// The covariance matrices `S = P⁻¹`.
    ///
    /// # Shapes
    /// → (Z, d, d)
    pub fn covariance_matrix(&self) -> Result<Tensor> {
        todo!()
    }

    /// `log det P` per neuron.
    ///
    /// # Shapes
    /// → (Z)
    pub fn log_det_precision(&self) -> Result<Tensor> {
        todo!()
    }

    /// `tr S` (sum of covariance eigenvalues) per neuron.
    ///
    /// # Shapes
    /// → (Z)
    pub fn trace_covariance(&self) -> Result<Tensor> {
        todo!()
    }

    /// `tr P` per neuron.
    ///
    /// # Shapes
    /// → (Z)
    pub fn trace_precision(&self) -> Result<Tensor> {
        todo!()
    }
}
