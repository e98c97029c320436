//! Losses for Gaussian neurons ([`gauss_layer`]): the Gaussian negative log-likelihood
//! (by the precision's Cholesky factor, by the covariance factor, per neuron of a layer, and
//! as a mixture over a layer's neurons), the λ-loss family on covariance eigenvalues, the
//! weight L2, a checked classification cross-entropy (Candle's), and the FGN training
//! objective. Errors are `gauss_layer`'s [`GaussError`] (one type for both crates).
//!
//! One convention everywhere: neuron `z` is the normal N(c_z, P_z⁻¹) and
//! `nll(x) = m2(x)/2 − log|P|/2 + d/2 · log 2π`, `m2 = (x − c)ᵀ P (x − c)`.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use gauss_losses::{nll_precision_factor, Reduction};
//! let x = Tensor::randn(0.0f64, 1.0, (16, 3), &Device::Cpu)?;
//! let mean = Tensor::zeros(3, DType::F64, &Device::Cpu)?;
//! let tril = Tensor::eye(3, DType::F64, &Device::Cpu)?;
//! let loss = nll_precision_factor(&x, &mean, &tril, Reduction::Mean)?;
//! assert!(loss.to_scalar::<f64>()?.is_finite());
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```
#![warn(missing_docs)]

/// The crate README's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod check;
mod classification;
mod covariance_factor;
mod gaussian;
mod lambda;
mod layer_nll;
mod mixture;
mod objective;
mod precision_factor;
mod reduction;
mod weight_l2;

pub use classification::checked_cross_entropy;
pub use covariance_factor::nll_covariance_factor;
pub use gauss_layer::{GaussError, Result};
pub use gaussian::{log_det_from_triangular, log_normalizer, nll_from_mahalanobis};
pub use lambda::{LambdaLoss, TraceEstimator};
pub use layer_nll::layer_nll;
pub use mixture::{mixture_logits, mixture_nll, mixture_nll_from_components};
pub use objective::{fgn_objective, FgnLoss, FgnLossValues, FgnObjectiveConfig};
pub use precision_factor::nll_precision_factor;
pub use reduction::Reduction;
pub use weight_l2::{weight_l2, weight_l2_of_layers};
