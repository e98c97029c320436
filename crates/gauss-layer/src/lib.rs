//! Gaussian neurons for Candle: layers whose output neurons each own a center `c` and a
//! learnable precision (inverse covariance) matrix `P`.
//!
//! The layer is the Finite Gaussian Neuron (F. Grezes, arXiv 2306.07796): a classical neuron
//! times a Gaussian, `y = (Wx + b) · g` with `g = exp(-m2/2)` and
//! `m2 = (x − c)ᵀ P (x − c)`, so a network of them answers "I don't know" far from its
//! training data. The same `P` defines the normal N(c, P⁻¹), fitted by NLL with the
//! `gauss-losses` crate.
//!
//! - [`GaussLayer`] / [`gauss_layer`]: the layer, built from tensors or through a `VarBuilder`;
//!   a [`candle_nn::Module`].
//! - [`Precision`]: the six parameterizations of `P` ([`Parameterization`]): cholesky
//!   (default), direct (with [`repair`]), expm, diag, sphere, lowrank.
//! - Densities: [`GaussLayer::log_prob`], [`GaussLayer::sample`], one neuron as a
//!   [`MultivariateNormal`], a whole layer as a [`MultivariateNormalBatch`], and
//!   [`GaussianMixture`] fitted like scikit-learn's (full, diag, spherical, tied).
//! - [`ops`]: the functional core (distances through the kernel resolver, the Gaussian, the
//!   gate, and the batched triangular helpers the losses build on, differentiable on every
//!   device); [`HostReadLog`] records the library's reads of device data.
//! - [`GaussNet`]: a stack of layers; [`checkpoint`]: self-describing safetensors files;
//!   [`import`]: PyTorch FGN state dicts; [`convert`]: classical `Linear` → Gaussian neurons.
//!
//! The design notes the code refers to (the math, the kernels and where each runs, the
//! promises) are in `docs/design.md` of the repository.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Module, VarBuilder, VarMap};
//! use gauss_layer::{gauss_layer, GaussLayerConfig};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let layer = gauss_layer(2, 3, GaussLayerConfig::default(), vb)?;
//! // Far from every center the Gaussians vanish and so does the output.
//! let far = Tensor::new(&[[1e3f32, -1e3]], &Device::Cpu)?;
//! let y = layer.forward(&far)?;
//! assert!(y.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```
#![warn(missing_docs)]

/// The README's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// The crate README's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct CrateReadmeDoctests;

pub mod checkpoint;
mod config;
pub mod convert;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod density;
mod distribution;
mod error;
pub mod files;
pub mod gpu;
pub mod import;
mod init;
mod kernels;
mod layer;
mod linalg;
pub mod memory;
mod mixture;
mod net;
pub mod ops;
mod optim;
mod precision;
pub mod repair;
mod route;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use config::{
    DistanceKernel, GaussLayerConfig, InitConfig, Parameterization, PositiveMap, PrecisionConfig,
};
pub use distribution::{MultivariateNormal, MultivariateNormalBatch};
pub use error::{check_device, check_dtype, check_float_dtype, GaussError, Result};
pub use init::layer_seed;
pub use kernels::ResolvedKernel;
pub use layer::{gauss_layer, GaussLayer};
pub use linalg::{HostRead, HostReadLog};
pub use mixture::{
    gaussian_mixture, GaussianMixture, MixtureFit, MixtureFitOptions, MIXTURE_LOGITS_NAME,
};
pub use net::{GaussNet, GaussNetConfig};
pub use optim::FusedAdamW;
pub use precision::{seed_trace_probes, Precision};
