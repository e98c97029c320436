//! The gradient-descent fit: one Gaussian neuron (a Gaussian-only layer, wrapped in a
//! one-layer `GaussNet` so it saves as a self-describing checkpoint) trained with AdamW on the
//! mean NLL from a cold start.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use gauss_layer::{
    repair, GaussLayerConfig, InitConfig, Parameterization, Precision, PrecisionConfig,
};
use gauss_layer::{GaussNet, GaussNetConfig};
use gauss_losses::{layer_nll, Reduction};
use indicatif::{ProgressBar, ProgressStyle};

/// How often (in steps) the progress bar and the convergence test look at the loss.
const CHECK_EVERY: usize = 10;

/// Settings of one fit.
pub struct FitOptions {
    /// Parameterization of the precision.
    pub parameterization: Parameterization,
    /// Most optimizer steps.
    pub steps: usize,
    /// Peak learning rate (cosine decay to `lr / 1000` over `steps`).
    pub lr: f64,
    /// Stop once every gradient entry is below this in magnitude.
    pub grad_tol: f64,
    /// Smallest eigenvalue a repaired `direct` precision keeps.
    pub min_eigenvalue: f64,
    /// Seed of the initialization (`InitConfig::seed`: the same start on every run and device).
    pub seed: u64,
}

/// The trained model and how training went.
pub struct Fitted {
    /// The one-layer network holding the fitted neuron.
    pub net: GaussNet,
    /// Steps taken.
    pub steps: usize,
    /// Whether the gradient test stopped training before `steps`.
    pub converged: bool,
    /// Final mean NLL.
    pub nll: f64,
}

fn learning_rate(options: &FitOptions, step: usize) -> f64 {
    let floor = options.lr * 1e-3;
    let progress = step as f64 / options.steps.max(1) as f64;
    floor + 0.5 * (options.lr - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
}

fn max_abs_gradient(vars: &[Var], grads: &candle_core::backprop::GradStore) -> Result<f64> {
    let mut largest = 0.0f64;
    for var in vars {
        if let Some(grad) = grads.get(var) {
            largest = largest.max(grad.abs()?.max_all()?.to_scalar::<f64>()?);
        }
    }
    Ok(largest)
}

fn progress_bar(steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    let style = ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Fits N(c, P⁻¹) to `x` by AdamW on the mean NLL.
///
/// # Shapes
/// `x`: (N, d), f64
pub fn fit(x: &Tensor, device: &Device, options: &FitOptions) -> Result<Fitted> {
    let d = x.dim(1)?;
    let varmap = VarMap::new();
    // f64: fit-gaussian runs on the CPU (`main` fixes the device), in f64 like the closed-form MLE.
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, device);
    let config = GaussNetConfig {
        in_features: d,
        out_features: 1,
        layer: GaussLayerConfig {
            precision: PrecisionConfig::with_parameterization(options.parameterization),
            gaussian_only: true,
            init: InitConfig {
                seed: Some(options.seed),
                ..Default::default()
            },
            ..Default::default()
        },
        gate: false,
        ..Default::default()
    };
    let net = GaussNet::new(config, vb)?;
    let layer = net
        .layers()
        .first()
        .context("the network has its one layer")?;
    let vars = varmap.all_vars();
    let direct_var = if options.parameterization == Parameterization::Direct {
        let name = Precision::tensor_name(Parameterization::Direct);
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
        let found = data
            .iter()
            .find(|(key, _)| key.ends_with(name))
            .map(|(_, var)| var.clone());
        Some(found.with_context(|| format!("direct layer has no `{name}` variable"))?)
    } else {
        None
    };
    let params = ParamsAdamW {
        lr: options.lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut optimizer = AdamW::new(vars.clone(), params)?;

    let bar = progress_bar(options.steps);
    let mut steps = 0;
    let mut converged = false;
    while steps < options.steps {
        optimizer.set_learning_rate(learning_rate(options, steps));
        let loss = layer_nll(layer, x, Reduction::Mean)?.sum_all()?;
        let grads = loss.backward()?;
        if steps % CHECK_EVERY == 0 {
            let largest = max_abs_gradient(&vars, &grads)?;
            bar.set_position(steps as u64);
            bar.set_message(format!(
                "nll {:.6}  max|grad| {largest:.1e}",
                loss.to_scalar::<f64>()?
            ));
            if largest < options.grad_tol {
                converged = true;
                break;
            }
        }
        optimizer.step(&grads)?;
        if let Some(var) = &direct_var {
            repair::repair_var_in_place(var, options.min_eigenvalue)?;
        }
        steps += 1;
    }
    bar.finish_and_clear();
    let nll = layer_nll(layer, x, Reduction::Mean)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(Fitted {
        net,
        steps,
        converged,
        nll,
    })
}
