//! Conformance of kind `layer`: the real `GaussLayer` (default kernel path) against the
//! reference m2, g, outputs and gradients of `sum(output * upstream)`.
//!
//! The layer stores an unconstrained raw precision; it is built from the reference
//! parameter by the inverse map, and its raw gradient is chained back to the reference
//! parameter: cholesky `L_ii = softplus(r_ii) + floor` (off-diagonal equal, diagonal divided
//! by softplus' = sigmoid), diag/sphere `p = e^θ` (d/dp = d/dθ / p); direct and expm store
//! the reference tensor itself.

use candle_core::{DType, Device, Tensor, Var};
use gauss_layer::{GaussLayer, GaussLayerConfig, Parameterization, Precision, PrecisionConfig};

use super::common::{chain_raw_gradient_to_factor, cholesky_raw_from_factor, gradient, Case};

/// The reference parameter → the layer's raw tensor, computed in f64 on the host.
fn raw_from_reference(
    parameterization: Parameterization,
    param: &Tensor,
    config: &GaussLayerConfig,
) -> anyhow::Result<Tensor> {
    Ok(match parameterization {
        Parameterization::Cholesky => cholesky_raw_from_factor(param, config)?,
        Parameterization::Direct | Parameterization::Expm => param.clone(),
        Parameterization::Diag | Parameterization::Sphere => param.log()?,
        // lowrank is checked against `direct` holding the same P (tests/layer/low_rank.rs).
        Parameterization::LowRank { .. } => anyhow::bail!("no lowrank reference format"),
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
        Parameterization::Cholesky => chain_raw_gradient_to_factor(grad_raw, raw, config)?,
        Parameterization::Direct | Parameterization::Expm => grad_raw.clone(),
        Parameterization::Diag | Parameterization::Sphere => (grad_raw / param)?,
        Parameterization::LowRank { .. } => anyhow::bail!("no lowrank reference format"),
    })
}

/// Checks one `layer` reference file.
pub fn check(case: &mut Case) -> anyhow::Result<()> {
    let parameterization: Parameterization = case.file.meta("param")?.parse()?;
    let param_tensor = case.file.meta("param_tensor")?;
    let config = GaussLayerConfig {
        precision: PrecisionConfig {
            parameterization,
            portable: case.portable,
            ..Default::default()
        },
        ..Default::default()
    };

    let param = case.tensor(param_tensor)?;
    let raw = raw_from_reference(
        parameterization,
        &case.file.tensor(param_tensor, DType::F64, &Device::Cpu)?,
        &config,
    )?
    .to_dtype(case.dtype)?
    .to_device(case.device)?;
    let var = |name: &str| -> anyhow::Result<Var> { Ok(Var::from_tensor(&case.tensor(name)?)?) };
    let (x, center, weight, bias) = (var("x")?, var("center")?, var("weight")?, var("bias")?);
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
    // The path under test is the one that ran: tensor ops only when portable. (The default
    // path takes a fused op on the CPU except where the resolver sends a badly conditioned
    // direct precision to the naive form.)
    let kernel = layer.resolved_kernel(x.as_tensor())?.name();
    anyhow::ensure!(
        !(case.portable && kernel.ends_with("_fused")),
        "{parameterization}: resolved kernel {kernel} on the portable path"
    );

    let precision_matrix = layer.precision().precision_matrix()?;
    case.compare("precision_matrix", &precision_matrix, "precision_matrix")?;
    let mahalanobis_sq = layer.mahalanobis_sq(x.as_tensor())?;
    case.compare("mahalanobis_sq", &mahalanobis_sq, "mahalanobis_sq")?;
    let (output, gaussian) = layer.forward_with_gaussian(x.as_tensor(), None)?;
    case.compare("gaussian", &gaussian, "gaussian")?;
    case.compare("output", &output, "output")?;

    let tanh_layer = build(GaussLayerConfig {
        tanh: true,
        ..config.clone()
    })?;
    let (output_tanh, _) = tanh_layer.forward_with_gaussian(x.as_tensor(), None)?;
    case.compare("output_tanh", &output_tanh, "output_tanh")?;

    let prev_g = case.tensor("prev_g")?;
    let (output_gated, _) = layer.forward_with_gaussian(x.as_tensor(), Some(&prev_g))?;
    case.compare("output_gated", &output_gated, "output_gated")?;

    let loss = (&output * case.tensor("upstream")?)?.sum_all()?;
    let grads = loss.backward()?;
    for (var, tensor) in [
        (&x, "x"),
        (&center, "center"),
        (&weight, "weight"),
        (&bias, "bias"),
    ] {
        let expected_name = format!("grad_{tensor}");
        case.compare(
            &expected_name,
            &gradient(&grads, var, tensor)?,
            &expected_name,
        )?;
    }
    let grad_param = chain_to_reference(
        parameterization,
        &gradient(&grads, &raw, param_tensor)?,
        raw.as_tensor(),
        &param,
        &config,
    )?;
    let expected_name = format!("grad_{param_tensor}");
    case.compare(&expected_name, &grad_param, &expected_name)
}
