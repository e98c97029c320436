//! The guard for the `direct` parameterization, whose `P = (A + Aᵀ)/2` can leave the
//! positive-definite cone after an optimizer step.
//!
//! Documented choice: the losses **return an error** ([`gauss_layer::GaussError::NotPositiveDefinite`],
//! naming the neuron and its smallest eigenvalue) rather than silently repairing, because a
//! loss must be a function of the parameters the optimizer holds. Repair the parameters
//! after each optimizer step with [`gauss_layer::repair`] and the error never fires. Every
//! other parameterization is positive definite by construction and is not checked.
//!
//! The check is [`gauss_layer::repair::check_positive_definite`]: Z eigendecompositions on
//! the host, so a `direct` loss costs one (Z, d, d) device-to-host copy per call.

use gauss_layer::{repair, Parameterization, Precision};

use crate::error::Result;

/// Errors if `precision` is `direct` and one of its matrices is not positive definite.
pub fn ensure_positive_definite(precision: &Precision) -> Result<()> {
    if precision.parameterization() != Parameterization::Direct {
        return Ok(());
    }
    repair::check_positive_definite(precision)?.into_result()?;
    Ok(())
}
