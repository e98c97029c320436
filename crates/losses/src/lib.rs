//! Losses for Gaussian neurons.
#![warn(missing_docs)]
