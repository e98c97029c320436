//! Training loops: a classical MLP (candle_nn `Linear` + ReLU, cross-entropy) and an FGN
//! network (`GaussNet`, the FGN objective: cross-entropy + λ_l2·mean(w²) + λ_sig·λ-loss).
//! Both use `gauss_layer::FusedAdamW` (candle-nn's AdamW, updated in place) and return
//! the wall time of their epochs alone (shuffling and batching included, set-up and
//! evaluation not), reported as `fit_seconds`.

use std::time::Instant;

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use gauss_layer::FusedAdamW;
use gauss_layer::{repair, GaussNet, GaussNetConfig, Parameterization};
use gauss_losses::{fgn_objective, FgnObjectiveConfig};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::data::Split;
use crate::evaluate::Classifier;

/// A classical multi-layer perceptron: `Linear` layers with ReLU between them.
pub struct Mlp {
    pub layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(sizes: &[usize], vb: VarBuilder) -> Result<Self> {
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| candle_nn::linear(w[0], w[1], vb.pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

impl Classifier for Mlp {
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// Settings shared by both training loops.
pub struct Schedule {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// The FGN precision tensors learn at `learning_rate · precision_lr_scale` (see
    /// [`precision_lr_scale`]); the classical network ignores it.
    pub precision_lr_scale: f64,
}

/// The default learning-rate factor of the precision tensors for `features` inputs:
/// `min(1, (64/d)^1.5)` for the full forms (cholesky, direct, expm), 1 for the others.
///
/// Adam moves every coordinate by about the learning rate whatever its scale. A full factor
/// has d(d−1)/2 off-diagonal entries whose steps add up coherently in `Lᵀ(x − c)`: at d = 784
/// one step at 1e-2 changes it by O(0.01·d·|δ|) against an initial O(|δ|/√d), the Gaussians
/// collapse and training diverges (PyTorch too). Scaling by (64/d)^1.5 keeps the digits'
/// tuned rate at d = 64 and gives 2.3e-4 at d = 784.
pub fn precision_lr_scale(parameterization: Parameterization, features: usize) -> f64 {
    match parameterization {
        Parameterization::Cholesky | Parameterization::Direct | Parameterization::Expm => {
            (64.0 / features.max(1) as f64).powf(1.5).min(1.0)
        }
        _ => 1.0,
    }
}

/// The FGN network's optimizer: AdamW over the precision tensors at their own learning rate
/// and over everything else at the schedule's.
pub struct FgnOptimizer {
    rest: FusedAdamW,
    precision: Option<FusedAdamW>,
}

/// The variables of `net` (created in `varmap`) split into its layers' precision tensors
/// (`layers.{i}.<precision tensor>`) and everything else.
pub fn precision_and_rest(varmap: &VarMap, net: &GaussNet) -> Result<(Vec<Var>, Vec<Var>)> {
    let names: std::collections::HashSet<String> = net
        .layers()
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let name = gauss_layer::Precision::tensor_name(layer.precision().parameterization());
            format!("layers.{i}.{name}")
        })
        .collect();
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow!("VarMap lock poisoned"))?;
    let (p, r): (Vec<_>, Vec<_>) = data.iter().partition(|(name, _)| names.contains(*name));
    Ok((
        p.into_iter().map(|(_, v)| v.clone()).collect(),
        r.into_iter().map(|(_, v)| v.clone()).collect(),
    ))
}

impl FgnOptimizer {
    pub fn new(varmap: &VarMap, net: &GaussNet, schedule: &Schedule) -> Result<Self> {
        let (precision, rest) = precision_and_rest(varmap, net)?;
        let adam = |vars: Vec<Var>, lr: f64| {
            FusedAdamW::new(
                vars,
                ParamsAdamW {
                    lr,
                    weight_decay: 0.0,
                    ..Default::default()
                },
            )
        };
        let precision_lr = schedule.learning_rate * schedule.precision_lr_scale;
        Ok(Self {
            rest: adam(rest, schedule.learning_rate)?,
            precision: if precision.is_empty() {
                None
            } else {
                Some(adam(precision, precision_lr)?)
            },
        })
    }

    /// One backward pass, then both updates.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.rest.step(&grads)?;
        if let Some(precision) = &mut self.precision {
            precision.step(&grads)?;
        }
        Ok(())
    }
}

fn progress(label: &str, steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{elapsed_precise}] {bar:30} {pos}/{len} epochs {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar
}

/// Mini-batches of a shuffled epoch, copied to `device`.
fn batches(
    split: &Split,
    batch_size: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Result<Vec<(Tensor, Tensor)>> {
    let mut order: Vec<u32> = (0..split.len() as u32).collect();
    order.shuffle(rng);
    let mut out = Vec::new();
    for chunk in order.chunks(batch_size) {
        let index = Tensor::new(chunk, &Device::Cpu)?;
        let x = split.images.index_select(&index, 0)?.to_device(device)?;
        let y = split.labels.index_select(&index, 0)?.to_device(device)?;
        out.push((x, y));
    }
    Ok(out)
}

pub fn optimizer(varmap: &VarMap, learning_rate: f64) -> Result<FusedAdamW> {
    Ok(FusedAdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?)
}

/// Smallest eigenvalue a `direct` precision is repaired to after a step.
const DIRECT_MIN_EIGENVALUE: f64 = 1e-3;

/// The sum of an epoch's per-step losses, kept on the device: adding a step's loss queues one
/// more kernel and reads nothing, so a GPU never waits for the host inside an epoch. The
/// mean is read once, at the end of the epoch, in the loss's own dtype (Metal has no f64).
#[derive(Default)]
pub struct RunningLoss {
    sum: Option<Tensor>,
    steps: usize,
}

impl RunningLoss {
    /// Adds one step's scalar loss (detached: the sum keeps no graph alive).
    pub fn add(&mut self, loss: &Tensor) -> Result<()> {
        let loss = loss.detach();
        self.sum = Some(match self.sum.take() {
            Some(sum) => (sum + loss)?,
            None => loss,
        });
        self.steps += 1;
        Ok(())
    }

    /// The mean loss of the epoch (one device read); an error when it is not finite, since
    /// training has then diverged and every later step would be wasted.
    pub fn mean(&self, what: &str, learning_rate: f64) -> Result<f64> {
        let Some(sum) = &self.sum else {
            return Ok(0.0);
        };
        let sum = match sum.dtype() {
            DType::F64 => sum.to_scalar::<f64>()?,
            _ => sum.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64,
        };
        let mean = sum / self.steps as f64;
        if !mean.is_finite() {
            return Err(anyhow!(
                "training diverged: the epoch's mean {what} is {mean}; nothing was saved (try a smaller --lr than {learning_rate:e})"
            ));
        }
        Ok(mean)
    }
}

/// One optimizer step of the FGN objective on a batch: forward, loss, backward and update,
/// then the `direct` precisions are brought back into the positive-definite cone where a
/// step left them (a factorization test per layer; the host repair only when it fails).
/// Returns the loss terms (not read: see [`RunningLoss`]).
pub fn fgn_step(
    net: &GaussNet,
    opt: &mut FgnOptimizer,
    direct: &[Var],
    x: &Tensor,
    y: &Tensor,
    objective: &FgnObjectiveConfig,
) -> Result<gauss_losses::FgnLoss> {
    let logits = net.forward(x, true)?;
    let loss = fgn_objective(&logits, y, net.layers(), objective)?;
    opt.backward_step(&loss.total)?;
    for precision in direct {
        repair::repair_var_if_needed(precision, DIRECT_MIN_EIGENVALUE)?;
    }
    Ok(loss)
}

/// Trains a classical MLP with cross-entropy; returns it with its variables and the seconds
/// its epochs took.
pub fn train_mlp(
    sizes: &[usize],
    train: &Split,
    schedule: &Schedule,
    rng: &mut StdRng,
    device: &Device,
) -> Result<(Mlp, VarMap, f64)> {
    let mut varmap = VarMap::new();
    let mlp = Mlp::new(sizes, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    crate::init::seeded_mlp(&mut varmap, sizes, rng)?;
    let mut opt = optimizer(&varmap, schedule.learning_rate)?;
    let bar = progress("classical", schedule.epochs as u64);
    let fit = Instant::now();
    for _ in 0..schedule.epochs {
        let mut running = RunningLoss::default();
        for (x, y) in batches(train, schedule.batch_size, rng, device)? {
            let loss = candle_nn::loss::cross_entropy(&mlp.logits(&x)?, &y)?;
            opt.backward_step(&loss)?;
            running.add(&loss)?;
        }
        let mean = running.mean("classical cross-entropy", schedule.learning_rate)?;
        bar.set_message(format!("loss {mean:.4}"));
        bar.inc(1);
    }
    let fit_seconds = fit.elapsed().as_secs_f64();
    bar.finish();
    Ok((mlp, varmap, fit_seconds))
}

/// Trains an FGN network with the FGN objective; returns it with its variables and the
/// seconds its epochs took.
pub fn train_fgn(
    config: GaussNetConfig,
    objective: &FgnObjectiveConfig,
    train: &Split,
    schedule: &Schedule,
    rng: &mut StdRng,
    device: &Device,
) -> Result<(GaussNet, VarMap, f64)> {
    let mut varmap = VarMap::new();
    let net = GaussNet::new(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    crate::init::centers_on_training_images(&mut varmap, &net, train, rng)?;
    let mut opt = FgnOptimizer::new(&varmap, &net, schedule)?;
    let direct = repair::direct_vars(&varmap, net.layers())?;
    let bar = progress("fgn", schedule.epochs as u64);
    let fit = Instant::now();
    for _ in 0..schedule.epochs {
        let mut running = RunningLoss::default();
        for (x, y) in batches(train, schedule.batch_size, rng, device)? {
            let loss = fgn_step(&net, &mut opt, &direct, &x, &y, objective)?;
            running.add(&loss.cross_entropy)?;
        }
        let mean = running.mean("FGN cross-entropy", schedule.learning_rate)?;
        bar.set_message(format!("cross-entropy {mean:.4}"));
        bar.inc(1);
    }
    let fit_seconds = fit.elapsed().as_secs_f64();
    bar.finish();
    Ok((net, varmap, fit_seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_loss_is_the_mean_and_refuses_nan() {
        let mut running = RunningLoss::default();
        for v in [1.0f32, 2.0, 4.5] {
            running.add(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
        }
        assert_eq!(running.mean("loss", 1e-2).unwrap(), 2.5);
        running
            .add(&Tensor::new(f32::NAN, &Device::Cpu).unwrap())
            .unwrap();
        let err = running.mean("loss", 1e-2).unwrap_err().to_string();
        assert!(err.contains("diverged") && err.contains("1e-2"), "{err}");
        assert_eq!(RunningLoss::default().mean("loss", 1e-2).unwrap(), 0.0);
    }

    #[test]
    fn precision_learning_rate_scales_for_wide_full_forms_only() {
        // (64/d)^1.5: 1 at the digits' 64 inputs, (64/784)^1.5 = 0.02332 on MNIST.
        assert_eq!(precision_lr_scale(Parameterization::Cholesky, 64), 1.0);
        assert_eq!(precision_lr_scale(Parameterization::Cholesky, 16), 1.0);
        let mnist = precision_lr_scale(Parameterization::Direct, 784);
        assert!((mnist - (64.0f64 / 784.0).powf(1.5)).abs() < 1e-15 && mnist < 0.0234);
        assert_eq!(precision_lr_scale(Parameterization::Diag, 784), 1.0);
        assert_eq!(
            precision_lr_scale(Parameterization::LowRank { rank: 4 }, 784),
            1.0
        );
    }
}
