//! The density API and Gaussian mixtures: `log_prob` against SciPy (recorded), sampling
//! statistics, the one-step constructors and their errors, mixture fits against
//! scikit-learn (recorded).

#[path = "density/common.rs"]
mod common;
#[path = "density/constructors.rs"]
mod constructors;
#[path = "density/distribution.rs"]
mod distribution;
#[path = "density/log_prob.rs"]
mod log_prob;
#[path = "density/low_rank.rs"]
mod low_rank;
#[path = "density/mixture.rs"]
mod mixture;
#[path = "density/mixture_methods.rs"]
mod mixture_methods;
#[path = "density/mixture_tied.rs"]
mod mixture_tied;
#[path = "density/sample.rs"]
mod sample;
