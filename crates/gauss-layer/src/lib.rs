//! Gaussian neurons for Candle.
#![warn(missing_docs)]

pub mod activation;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod distance;
pub mod error;
pub mod import;
pub mod kernels;
pub mod layer;
pub mod linalg;
pub mod net;
pub mod precision;
pub mod repair;
pub mod testing;

pub use config::{DistanceKernel, GaussLayerConfig, InitConfig, Parameterization, PositiveMap};
pub use error::{GaussError, Result};
pub use layer::{gauss_layer, GaussLayer};
pub use precision::Precision;
pub use net::{GaussNet, GaussNetConfig};
