//! Conformance of kind `lambda`: the λ-loss family against the reference values and their
//! gradients with respect to the precision factors `L` (`P_z = L_z L_zᵀ`), twice:
//! - through the functional core [`LambdaLoss::per_neuron_from_factor`], fed `L` directly;
//! - through a cholesky [`Precision`] with the default raw map (`L_ii = softplus(r_ii) +
//!   floor`), its raw gradient chained back to `L` (off-diagonal equal, diagonal divided by
//!   the map's derivative).
//!
//! The per-neuron terms are also checked against the stored covariance eigenvalues (the trace
//! is their sum, the log-determinant the sum of their logs).

use candle_core::{DType, Device, Var};
use gauss_layer::{GaussLayerConfig, Precision, PrecisionConfig};
use gauss_losses::LambdaLoss;

use super::common::{chain_raw_gradient_to_factor, cholesky_raw_from_factor, Case};

/// Checks one `lambda` reference file.
pub fn check(case: &mut Case) -> anyhow::Result<()> {
    let factor = case.tensor("tril")?;
    let d = factor.dim(1)?;

    // Functional core, fed L directly.
    let tril = Var::from_tensor(&factor)?;
    for variant in LambdaLoss::ALL {
        let value = variant
            .per_neuron_from_factor(tril.as_tensor())?
            .mean_all()?;
        let value_name = format!("lambda_{}", variant.name());
        case.compare(&value_name, &value.reshape(1)?, &value_name)?;
        let grads = value.backward()?;
        let grad_name = format!("grad_tril_{}", variant.name());
        match grads.get(tril.as_tensor()) {
            Some(grad) => case.compare(&grad_name, grad, &grad_name)?,
            None => case.fail(&grad_name, "no gradient reached tril".into()),
        }
    }

    // Through a cholesky Precision with the default raw map.
    let config = GaussLayerConfig {
        precision: PrecisionConfig {
            portable: case.portable,
            ..Default::default()
        },
        ..Default::default()
    };
    let raw = cholesky_raw_from_factor(
        &case.file.tensor("tril", DType::F64, &Device::Cpu)?,
        &config,
    )?
    .to_dtype(case.dtype)?
    .to_device(case.device)?;
    let raw = Var::from_tensor(&raw)?;
    let precision = Precision::from_raw(raw.as_tensor().clone(), d, &config)?;
    for variant in LambdaLoss::ALL {
        let value = variant.per_neuron(&precision)?.mean_all()?;
        let value_name = format!("lambda_{}", variant.name());
        let label = format!("{value_name} (cholesky precision)");
        case.compare(&label, &value.reshape(1)?, &value_name)?;
        let grads = value.backward()?;
        let grad_name = format!("grad_tril_{}", variant.name());
        let label = format!("{grad_name} (cholesky precision, chained)");
        match grads.get(raw.as_tensor()) {
            Some(grad_raw) => {
                let grad = chain_raw_gradient_to_factor(grad_raw, raw.as_tensor(), &config)?;
                case.compare(&label, &grad, &grad_name)?;
            }
            None => case.fail(&label, "no gradient reached the raw factor".into()),
        }
    }

    // Per neuron against the covariance eigenvalues.
    let eigenvalues = case.tensor("covariance_eigenvalues")?;
    case.compare_to(
        "mean of covariance_eigenvalues per neuron",
        &LambdaLoss::TraceCovariance.per_neuron(&precision)?,
        &eigenvalues.mean(1)?,
    );
    case.compare_to(
        "sum of log covariance_eigenvalues per neuron",
        &LambdaLoss::LogdetCovariance.per_neuron(&precision)?,
        &eigenvalues.log()?.sum(1)?,
    );
    Ok(())
}
