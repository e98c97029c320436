//! Conformance of kind `lambda`: the λ-loss family against the reference values and their
//! gradients with respect to the precision factors `L` (`P_z = L_z L_zᵀ`), twice:
//! - through the functional core [`LambdaLoss::of_factor`], fed `L` directly;
//! - through a cholesky [`Precision`] with the default raw map (`L_ii = softplus(r_ii) +
//!   floor`), its raw gradient chained back to `L` (off-diagonal equal, diagonal divided by
//!   the map's derivative).
//!
//! The per-neuron terms are also checked against the stored covariance eigenvalues (the trace
//! is their sum, the log-determinant the sum of their logs).

use candle_core::{DType, Device, Tensor, Var};
use gauss_layer::linalg;
use gauss_layer::precision::{positive_map_derivative, positive_map_inverse};
use gauss_layer::{GaussLayerConfig, Precision};
use gauss_losses::LambdaLoss;

use super::common::{ReferenceFile, Report};

/// The raw tensor of a cholesky precision (with `config`'s positive map and floor) whose
/// factor is `factor`, computed in f64 on the host. Needs `L_ii > floor`.
///
/// # Shapes
/// `factor`: (Z, d, d) → (Z, d, d), f64 on the CPU
pub(super) fn cholesky_raw_from_factor(
    factor: &Tensor,
    config: &GaussLayerConfig,
) -> anyhow::Result<Tensor> {
    let (z, d, _) = factor.dims3()?;
    let mut values = factor
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    for n in 0..z {
        for i in 0..d {
            let k = n * d * d + i * d + i;
            anyhow::ensure!(
                values[k] > config.factor_diag_floor,
                "factor diagonal {} of neuron {n} is not above the floor {}",
                values[k],
                config.factor_diag_floor
            );
            values[k] =
                positive_map_inverse(config.positive_map, values[k] - config.factor_diag_floor);
        }
    }
    Ok(Tensor::from_vec(values, (z, d, d), &Device::Cpu)?)
}

/// The gradient with respect to a cholesky raw tensor → the gradient with respect to its
/// factor `L`: the diagonal is divided by the positive map's derivative at the raw value.
///
/// # Shapes
/// `grad_raw`, `raw`: (Z, d, d) → (Z, d, d)
pub(super) fn chain_raw_gradient_to_factor(
    grad_raw: &Tensor,
    raw: &Tensor,
    config: &GaussLayerConfig,
) -> anyhow::Result<Tensor> {
    let raw_diag = linalg::diagonal(raw)?.to_dtype(DType::F64)?;
    let derivative: Vec<f64> = raw_diag
        .flatten_all()?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|r| positive_map_derivative(config.positive_map, r))
        .collect();
    let derivative = Tensor::from_vec(derivative, raw_diag.dims(), &Device::Cpu)?
        .to_dtype(grad_raw.dtype())?
        .to_device(grad_raw.device())?;
    let diag = (linalg::diagonal(grad_raw)? / derivative)?;
    Ok((linalg::strict_tril(grad_raw)? + linalg::diag_embed(&diag)?)?)
}

/// Checks one `lambda` reference file.
pub fn check(
    file: &ReferenceFile,
    dtype: DType,
    device: &Device,
    report: &mut Report,
) -> anyhow::Result<()> {
    let t = |name: &str| file.tensor(name, dtype, device);
    let name = &file.name;
    let factor = t("tril")?;
    let d = factor.dim(1)?;

    // Functional core, fed L directly.
    let tril = Var::from_tensor(&factor)?;
    for variant in LambdaLoss::ALL {
        let value = variant.of_factor(tril.as_tensor())?;
        let value_name = format!("lambda_{}", variant.name());
        report.compare(name, &value_name, &value.reshape(1)?, &t(&value_name)?);
        let grads = value.backward()?;
        let grad_name = format!("grad_tril_{}", variant.name());
        match grads.get(tril.as_tensor()) {
            Some(grad) => report.compare(name, &grad_name, grad, &t(&grad_name)?),
            None => report.fail(name, &grad_name, "no gradient reached tril".into()),
        }
    }

    // Through a cholesky Precision with the default raw map.
    let config = GaussLayerConfig::default();
    let raw = cholesky_raw_from_factor(&file.tensor("tril", DType::F64, &Device::Cpu)?, &config)?
        .to_dtype(dtype)?
        .to_device(device)?;
    let raw = Var::from_tensor(&raw)?;
    let precision = Precision::from_raw(raw.as_tensor().clone(), d, &config)?;
    for variant in LambdaLoss::ALL {
        let value = variant.of_precision(&precision)?;
        let value_name = format!("lambda_{}", variant.name());
        report.compare(
            name,
            &format!("{value_name} (cholesky precision)"),
            &value.reshape(1)?,
            &t(&value_name)?,
        );
        let grads = value.backward()?;
        let grad_name = format!("grad_tril_{}", variant.name());
        let label = format!("{grad_name} (cholesky precision, chained)");
        match grads.get(raw.as_tensor()) {
            Some(grad_raw) => {
                let grad = chain_raw_gradient_to_factor(grad_raw, raw.as_tensor(), &config)?;
                report.compare(name, &label, &grad, &t(&grad_name)?);
            }
            None => report.fail(name, &label, "no gradient reached the raw factor".into()),
        }
    }

    // Per neuron against the covariance eigenvalues.
    let eigenvalues = t("covariance_eigenvalues")?;
    report.compare(
        name,
        "mean of covariance_eigenvalues per neuron",
        &LambdaLoss::TraceCovariance.per_neuron(&precision)?,
        &eigenvalues.mean(1)?,
    );
    report.compare(
        name,
        "sum of log covariance_eigenvalues per neuron",
        &LambdaLoss::LogdetCovariance.per_neuron(&precision)?,
        &eigenvalues.log()?.sum(1)?,
    );
    Ok(())
}
