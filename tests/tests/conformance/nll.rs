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
use gauss_layer::{linalg, GaussLayer, GaussLayerConfig, Parameterization, Precision};
use gauss_losses::{layer_nll, nll_covariance_factor, nll_precision_factor, Reduction};

use super::common::{ReferenceFile, Report};
use super::lambda::{chain_raw_gradient_to_factor, cholesky_raw_from_factor};

fn gradient(
    grads: &candle_core::backprop::GradStore,
    var: &Var,
    what: &str,
) -> anyhow::Result<Tensor> {
    grads
        .get(var.as_tensor())
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no gradient reached {what}"))
}

fn check_precision_factor(
    file: &ReferenceFile,
    dtype: DType,
    device: &Device,
    report: &mut Report,
) -> anyhow::Result<()> {
    let t = |name: &str| file.tensor(name, dtype, device);
    let name = &file.name;
    let x = t("x")?;
    let mean = Var::from_tensor(&t("mean")?)?;
    let tril = Var::from_tensor(&t("tril")?)?;
    let nll = |reduction| nll_precision_factor(&x, mean.as_tensor(), tril.as_tensor(), reduction);
    report.compare(name, "nll", &nll(Reduction::None)?, &t("nll")?);
    report.compare(
        name,
        "nll_sum",
        &nll(Reduction::Sum)?.reshape(1)?,
        &t("nll_sum")?,
    );
    let nll_mean = nll(Reduction::Mean)?;
    report.compare(name, "nll_mean", &nll_mean.reshape(1)?, &t("nll_mean")?);
    let grads = nll_mean.backward()?;
    report.compare(
        name,
        "grad_mean",
        &gradient(&grads, &mean, "mean")?,
        &t("grad_mean")?,
    );
    report.compare(
        name,
        "grad_tril",
        &gradient(&grads, &tril, "tril")?,
        &t("grad_tril")?,
    );
    Ok(())
}

fn check_covariance_factor(
    file: &ReferenceFile,
    dtype: DType,
    device: &Device,
    report: &mut Report,
) -> anyhow::Result<()> {
    let t = |name: &str| file.tensor(name, dtype, device);
    let name = &file.name;
    let x = t("x")?;
    let mean = Var::from_tensor(&t("mean")?)?;
    let scale_tril = Var::from_tensor(&t("scale_tril")?)?;
    let nll =
        |reduction| nll_covariance_factor(&x, mean.as_tensor(), scale_tril.as_tensor(), reduction);
    report.compare(
        name,
        "nll (covariance factor)",
        &nll(Reduction::None)?,
        &t("nll")?,
    );
    report.compare(
        name,
        "nll_mean (covariance factor)",
        &nll(Reduction::Mean)?.reshape(1)?,
        &t("nll_mean")?,
    );
    let nll_sum = nll(Reduction::Sum)?;
    report.compare(
        name,
        "nll_sum (covariance factor)",
        &nll_sum.reshape(1)?,
        &t("nll_sum")?,
    );
    let grads = nll_sum.backward()?;
    report.compare(
        name,
        "grad_mean_sum",
        &gradient(&grads, &mean, "mean")?,
        &t("grad_mean_sum")?,
    );
    report.compare(
        name,
        "grad_scale_tril_sum",
        &gradient(&grads, &scale_tril, "scale_tril")?,
        &t("grad_scale_tril_sum")?,
    );
    Ok(())
}

fn check_layer(
    file: &ReferenceFile,
    dtype: DType,
    device: &Device,
    report: &mut Report,
) -> anyhow::Result<()> {
    let t = |name: &str| file.tensor(name, dtype, device);
    let name = &file.name;
    let x = t("x")?;
    let factor = t("tril")?.unsqueeze(0)?;
    let d = factor.dim(1)?;
    let center = Var::from_tensor(&t("mean")?.unsqueeze(0)?)?;
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
        gaussian_only: true,
        ..Default::default()
    };
    let raw = cholesky_raw_from_factor(
        &file
            .tensor("tril", DType::F64, &Device::Cpu)?
            .unsqueeze(0)?,
        &cholesky,
    )?
    .to_dtype(dtype)?
    .to_device(device)?;
    let raw = Var::from_tensor(&raw)?;
    let precision = Precision::from_raw(raw.as_tensor().clone(), d, &cholesky)?;
    let cholesky_layer = layer(precision, cholesky.clone())?;
    let per_sample = layer_nll(&cholesky_layer, &x, Reduction::None)?.squeeze(1)?;
    report.compare(name, "nll (cholesky layer)", &per_sample, &t("nll")?);
    let nll_mean = layer_nll(&cholesky_layer, &x, Reduction::Mean)?;
    report.compare(
        name,
        "nll_mean (cholesky layer)",
        &nll_mean,
        &t("nll_mean")?,
    );
    let grads = nll_mean.sum_all()?.backward()?;
    report.compare(
        name,
        "grad_mean (cholesky layer)",
        &gradient(&grads, &center, "center")?.squeeze(0)?,
        &t("grad_mean")?,
    );
    let grad_raw = gradient(&grads, &raw, "raw factor")?;
    let grad_tril = chain_raw_gradient_to_factor(&grad_raw, raw.as_tensor(), &cholesky)?;
    report.compare(
        name,
        "grad_tril (cholesky layer, chained)",
        &grad_tril.squeeze(0)?,
        &t("grad_tril")?,
    );

    let direct = GaussLayerConfig {
        parameterization: Parameterization::Direct,
        ..cholesky
    };
    let matrix = linalg::matmul(&factor, &linalg::transpose(&factor)?)?;
    let direct_layer = layer(Precision::from_raw(matrix, d, &direct)?, direct)?;
    let per_sample = layer_nll(&direct_layer, &x, Reduction::None)?.squeeze(1)?;
    report.compare(name, "nll (direct layer)", &per_sample, &t("nll")?);
    Ok(())
}

fn check_maximum_likelihood(
    file: &ReferenceFile,
    dtype: DType,
    device: &Device,
    report: &mut Report,
) -> anyhow::Result<()> {
    let t = |name: &str| file.tensor(name, dtype, device);
    let name = &file.name;
    let x = t("x")?;
    let n = x.dim(0)? as f64;
    let sample_mean = x.mean(0)?;
    report.compare(name, "mle_mean", &sample_mean, &t("mle_mean")?);
    let centered = x.broadcast_sub(&sample_mean)?;
    let covariance = (centered.t()?.matmul(&centered)? / n)?;
    report.compare(name, "mle_covariance", &covariance, &t("mle_covariance")?);
    let factor = t("mle_precision_tril")?;
    let precision = factor.matmul(&factor.t()?)?;
    let d = factor.dim(0)?;
    report.compare(
        name,
        "mle_precision_tril · its transpose · mle_covariance (identity)",
        &precision.matmul(&t("mle_covariance")?)?,
        &Tensor::eye(d, dtype, device)?,
    );
    Ok(())
}

/// Checks one `nll` reference file.
pub fn check(
    file: &ReferenceFile,
    dtype: DType,
    device: &Device,
    report: &mut Report,
) -> anyhow::Result<()> {
    check_precision_factor(file, dtype, device, report)?;
    check_covariance_factor(file, dtype, device, report)?;
    check_layer(file, dtype, device, report)?;
    check_maximum_likelihood(file, dtype, device, report)
}
