//! Conformance of kind `layer`: the real `GaussLayer` (default kernel path) against the
//! reference m2, g, outputs and gradients of `sum(output * upstream)`.
//!
//! The layer stores an unconstrained raw precision; it is built from the reference
//! parameter by the inverse map, and its raw gradient is chained back to the reference
//! parameter: cholesky `L_ii = softplus(r_ii) + floor` (off-diagonal equal, diagonal divided
//! by softplus' = sigmoid), diag/sphere `p = e^θ` (d/dp = d/dθ / p); direct and expm store
//! the reference tensor itself.

use candle_core::{DType, Device, Tensor, Var};
use gauss_layer::linalg;
use gauss_layer::precision::{positive_map_derivative, positive_map_inverse};
use gauss_layer::{GaussLayer, GaussLayerConfig, Parameterization, Precision};

use super::common::{ReferenceFile, Report};

/// The reference parameter → the layer's raw tensor, computed in f64 on the host.
fn raw_from_reference(
    parameterization: Parameterization,
    param: &Tensor,
    config: &GaussLayerConfig,
) -> anyhow::Result<Tensor> {
    Ok(match parameterization {
        Parameterization::Cholesky => {
            let (z, d, _) = param.dims3()?;
            let mut values = param.flatten_all()?.to_vec1::<f64>()?;
            for n in 0..z {
                for i in 0..d {
                    let k = n * d * d + i * d + i;
                    values[k] = positive_map_inverse(
                        config.positive_map,
                        values[k] - config.factor_diag_floor,
                    );
                }
            }
            Tensor::from_vec(values, (z, d, d), &Device::Cpu)?
        }
        Parameterization::Direct | Parameterization::Expm => param.clone(),
        Parameterization::Diag | Parameterization::Sphere => param.log()?,
    })
}

/// The gradient with respect to the raw tensor → the gradient with respect to the
/// reference parameter (on the device, in the working dtype).
fn chain_to_reference(
    parameterization: Parameterization,
    grad_raw: &Tensor,
    raw: &Tensor,
    param: &Tensor,
    config: &GaussLayerConfig,
) -> anyhow::Result<Tensor> {
    Ok(match parameterization {
        Parameterization::Cholesky => {
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
            (linalg::strict_tril(grad_raw)? + linalg::diag_embed(&diag)?)?
        }
        Parameterization::Direct | Parameterization::Expm => grad_raw.clone(),
        Parameterization::Diag | Parameterization::Sphere => (grad_raw / param)?,
    })
}

/// Checks one `layer` reference file in `dtype` on `device`.
pub fn check(
    file: &ReferenceFile,
    dtype: DType,
    device: &Device,
    report: &mut Report,
) -> anyhow::Result<()> {
    let parameterization: Parameterization = file.meta("param")?.parse()?;
    let param_tensor = file.meta("param_tensor")?;
    let t = |name: &str| file.tensor(name, dtype, device);
    let config = GaussLayerConfig {
        parameterization,
        ..Default::default()
    };

    let param = t(param_tensor)?;
    let raw = raw_from_reference(
        parameterization,
        &file.tensor(param_tensor, DType::F64, &Device::Cpu)?,
        &config,
    )?
    .to_dtype(dtype)?
    .to_device(device)?;
    let (x, center, weight, bias) = (
        Var::from_tensor(&t("x")?)?,
        Var::from_tensor(&t("center")?)?,
        Var::from_tensor(&t("weight")?)?,
        Var::from_tensor(&t("bias")?)?,
    );
    let raw = Var::from_tensor(&raw)?;
    let d = center.dims()[1];
    let build = |config: GaussLayerConfig| -> anyhow::Result<GaussLayer> {
        let precision = Precision::from_raw(raw.as_tensor().clone(), d, &config)?;
        Ok(GaussLayer::new(
            Some(weight.as_tensor().clone()),
            Some(bias.as_tensor().clone()),
            center.as_tensor().clone(),
            precision,
            config,
        )?)
    };
    let layer = build(config.clone())?;
    let name = &file.name;

    report.compare(
        name,
        "precision_matrix",
        &layer.precision().precision_matrix()?,
        &t("precision_matrix")?,
    );
    report.compare(
        name,
        "mahalanobis_sq",
        &layer.mahalanobis_sq(x.as_tensor())?,
        &t("mahalanobis_sq")?,
    );
    let (output, gaussian) = layer.forward_with_gaussian(x.as_tensor(), None)?;
    report.compare(name, "gaussian", &gaussian, &t("gaussian")?);
    report.compare(name, "output", &output, &t("output")?);

    let tanh_layer = build(GaussLayerConfig {
        tanh: true,
        ..config.clone()
    })?;
    let (output_tanh, _) = tanh_layer.forward_with_gaussian(x.as_tensor(), None)?;
    report.compare(name, "output_tanh", &output_tanh, &t("output_tanh")?);

    let (output_gated, _) = layer.forward_with_gaussian(x.as_tensor(), Some(&t("prev_g")?))?;
    report.compare(name, "output_gated", &output_gated, &t("output_gated")?);

    let loss = (&output * t("upstream")?)?.sum_all()?;
    let grads = loss.backward()?;
    let grad = |var: &Var, what: &str| -> anyhow::Result<Tensor> {
        grads
            .get(var.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no gradient reached {what}"))
    };
    for (var, tensor) in [
        (&x, "x"),
        (&center, "center"),
        (&weight, "weight"),
        (&bias, "bias"),
    ] {
        let expected_name = format!("grad_{tensor}");
        report.compare(
            name,
            &expected_name,
            &grad(var, tensor)?,
            &t(&expected_name)?,
        );
    }
    let grad_param = chain_to_reference(
        parameterization,
        &grad(&raw, param_tensor)?,
        raw.as_tensor(),
        &param,
        &config,
    )?;
    let expected_name = format!("grad_{param_tensor}");
    report.compare(name, &expected_name, &grad_param, &t(&expected_name)?);
    Ok(())
}
