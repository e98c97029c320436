//! Conformance of kind `nll`: one Gaussian N(mean, (L Lᵀ)⁻¹) = N(mean, Λ Λᵀ) and its data.
//! - The precision-factor NLL ([`nll_precision_factor`]): `nll`, `nll_mean`, `nll_sum`, and
//!   the gradients of `nll_mean` w.r.t. the mean and `L` (`grad_mean`, `grad_tril`).
//! - The covariance-factor NLL ([`nll_covariance_factor`], Rennie's parameterization):
//!   `nll`, `nll_sum`, and the gradients of `nll_sum` w.r.t. the mean and `Λ`
//!   (`grad_mean_sum`, `grad_scale_tril_sum`).
//! - The same Gaussian as a one-neuron [`GaussLayer`] ([`layer_nll`]): cholesky with the
//!   default raw map (values and gradients, chained back to `L`) and direct (`P = L Lᵀ`,
//!   values).
//! - The file's own maximum-likelihood fields: `mle_mean` is the sample mean,
//!   `mle_covariance` the biased sample covariance, `mle_precision_tril` a factor of its
//!   inverse.

use candle_core::{DType, Device, Tensor, Var};
use gauss_layer::testing::linalg;
use gauss_layer::{GaussLayer, GaussLayerConfig, Parameterization, Precision, PrecisionConfig};
use gauss_losses::{layer_nll, nll_covariance_factor, nll_precision_factor, Reduction};

use super::common::{chain_raw_gradient_to_factor, cholesky_raw_from_factor, gradient, Case};

fn check_precision_factor(case: &mut Case) -> anyhow::Result<()> {
    let x = case.tensor("x")?;
    let mean = Var::from_tensor(&case.tensor("mean")?)?;
    let tril = Var::from_tensor(&case.tensor("tril")?)?;
    let nll = |reduction| nll_precision_factor(&x, mean.as_tensor(), tril.as_tensor(), reduction);
    case.compare("nll", &nll(Reduction::None)?, "nll")?;
    case.compare("nll_sum", &nll(Reduction::Sum)?.reshape(1)?, "nll_sum")?;
    let nll_mean = nll(Reduction::Mean)?;
    case.compare("nll_mean", &nll_mean.reshape(1)?, "nll_mean")?;
    let grads = nll_mean.backward()?;
    case.compare("grad_mean", &gradient(&grads, &mean, "mean")?, "grad_mean")?;
    case.compare("grad_tril", &gradient(&grads, &tril, "tril")?, "grad_tril")
}

fn check_covariance_factor(case: &mut Case) -> anyhow::Result<()> {
    let x = case.tensor("x")?;
    let mean = Var::from_tensor(&case.tensor("mean")?)?;
    let scale_tril = Var::from_tensor(&case.tensor("scale_tril")?)?;
    let nll =
        |reduction| nll_covariance_factor(&x, mean.as_tensor(), scale_tril.as_tensor(), reduction);
    case.compare("nll (covariance factor)", &nll(Reduction::None)?, "nll")?;
    let nll_mean = nll(Reduction::Mean)?.reshape(1)?;
    case.compare("nll_mean (covariance factor)", &nll_mean, "nll_mean")?;
    let nll_sum = nll(Reduction::Sum)?;
    case.compare(
        "nll_sum (covariance factor)",
        &nll_sum.reshape(1)?,
        "nll_sum",
    )?;
    let grads = nll_sum.backward()?;
    let grad_mean = gradient(&grads, &mean, "mean")?;
    case.compare("grad_mean_sum", &grad_mean, "grad_mean_sum")?;
    let grad_scale_tril = gradient(&grads, &scale_tril, "scale_tril")?;
    case.compare(
        "grad_scale_tril_sum",
        &grad_scale_tril,
        "grad_scale_tril_sum",
    )
}

fn check_layer(case: &mut Case) -> anyhow::Result<()> {
    let x = case.tensor("x")?;
    let factor = case.tensor("tril")?.unsqueeze(0)?;
    let d = factor.dim(1)?;
    let center = Var::from_tensor(&case.tensor("mean")?.unsqueeze(0)?)?;
    let layer = |precision: Precision, config: GaussLayerConfig| -> anyhow::Result<GaussLayer> {
        Ok(GaussLayer::new(
            None,
            None,
            center.as_tensor().clone(),
            precision,
            config,
        )?)
    };

    let cholesky = GaussLayerConfig {
        precision: PrecisionConfig {
            portable: case.portable,
            ..Default::default()
        },
        gaussian_only: true,
        ..Default::default()
    };
    let raw = cholesky_raw_from_factor(
        &case
            .file
            .tensor("tril", DType::F64, &Device::Cpu)?
            .unsqueeze(0)?,
        &cholesky,
    )?
    .to_dtype(case.dtype)?
    .to_device(case.device)?;
    let raw = Var::from_tensor(&raw)?;
    let precision = Precision::from_raw(raw.as_tensor().clone(), d, &cholesky)?;
    let cholesky_layer = layer(precision, cholesky.clone())?;
    let per_sample = layer_nll(&cholesky_layer, &x, Reduction::None)?.squeeze(1)?;
    case.compare("nll (cholesky layer)", &per_sample, "nll")?;
    let nll_mean = layer_nll(&cholesky_layer, &x, Reduction::Mean)?;
    case.compare("nll_mean (cholesky layer)", &nll_mean, "nll_mean")?;
    let grads = nll_mean.sum_all()?.backward()?;
    let grad_mean = gradient(&grads, &center, "center")?.squeeze(0)?;
    case.compare("grad_mean (cholesky layer)", &grad_mean, "grad_mean")?;
    let grad_raw = gradient(&grads, &raw, "raw factor")?;
    let grad_tril = chain_raw_gradient_to_factor(&grad_raw, raw.as_tensor(), &cholesky)?;
    case.compare(
        "grad_tril (cholesky layer, chained)",
        &grad_tril.squeeze(0)?,
        "grad_tril",
    )?;

    let direct = GaussLayerConfig {
        precision: PrecisionConfig {
            parameterization: Parameterization::Direct,
            ..cholesky.precision
        },
        ..cholesky
    };
    let matrix = linalg::matmul(&factor, &linalg::transpose(&factor)?)?;
    let direct_layer = layer(Precision::from_raw(matrix, d, &direct)?, direct)?;
    let per_sample = layer_nll(&direct_layer, &x, Reduction::None)?.squeeze(1)?;
    case.compare("nll (direct layer)", &per_sample, "nll")
}

fn check_maximum_likelihood(case: &mut Case) -> anyhow::Result<()> {
    let x = case.tensor("x")?;
    let n = x.dim(0)? as f64;
    let sample_mean = x.mean(0)?;
    case.compare("mle_mean", &sample_mean, "mle_mean")?;
    let centered = x.broadcast_sub(&sample_mean)?;
    let covariance = (centered.t()?.matmul(&centered)? / n)?;
    case.compare("mle_covariance", &covariance, "mle_covariance")?;
    let factor = case.tensor("mle_precision_tril")?;
    let precision = factor.matmul(&factor.t()?)?;
    let d = factor.dim(0)?;
    let identity = precision.matmul(&case.tensor("mle_covariance")?)?;
    case.compare_to(
        "mle_precision_tril · its transpose · mle_covariance (identity)",
        &identity,
        &Tensor::eye(d, case.dtype, case.device)?,
    );
    Ok(())
}

/// Checks one `nll` reference file.
pub fn check(case: &mut Case) -> anyhow::Result<()> {
    check_precision_factor(case)?;
    check_covariance_factor(case)?;
    check_layer(case)?;
    check_maximum_likelihood(case)
}
