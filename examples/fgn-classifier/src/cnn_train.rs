//! Training loops of the convolutional networks, end to end (trunk and head together):
//! the classical CNN with cross-entropy, the CNN FGN with the FGN objective. Adam
//! (`gauss_layer::FusedAdamW`) with a cosine learning-rate decay to 0 over the run; the loss
//! is summed on the device and read once per epoch (no per-step host sync).

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use gauss_layer::{FusedAdamW, GaussNet, GaussNetConfig, Parameterization};
use gauss_losses::{fgn_objective, FgnObjectiveConfig};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::augment::{self, Augment};
use crate::cnn::{CnnClassical, CnnFgn, Trunk, TrunkConfig};
use crate::data::Split;
use crate::train::{Mlp, Schedule};

/// Shuffled mini-batch indices of one epoch. A last batch of one sample (of a batch size
/// above one) joins the batch before it: batch norm (the trunk's, and the Gaussian layers' `--feature-batch-norm`, on by
/// default) needs two samples for a batch variance, and `GaussNet` refuses one in training.
fn epoch_batches(n: usize, batch_size: usize, rng: &mut StdRng) -> Vec<Vec<u32>> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(rng);
    let mut batches: Vec<Vec<u32>> = order.chunks(batch_size).map(<[u32]>::to_vec).collect();
    if batch_size >= 2 && batches.len() >= 2 && batches.last().is_some_and(|l| l.len() == 1) {
        if let Some(lone) = batches.pop() {
            if let Some(previous) = batches.last_mut() {
                previous.extend(lone);
            }
        }
    }
    batches
}

/// Steps in one epoch of `n` samples: the number of [`epoch_batches`].
fn steps_per_epoch(n: usize, batch_size: usize) -> usize {
    let steps = n.div_ceil(batch_size.max(1));
    if batch_size >= 2 && steps >= 2 && n % batch_size == 1 {
        steps - 1
    } else {
        steps
    }
}

fn batch(split: &Split, index: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
    let index = Tensor::new(index, &Device::Cpu)?;
    Ok((
        split.images.index_select(&index, 0)?.to_device(device)?,
        split.labels.index_select(&index, 0)?.to_device(device)?,
    ))
}

/// [`batch`] with each image transformed by `augment` (on the host, before the move).
fn augmented_batch(
    split: &Split,
    index: &[u32],
    (augment, height, width): (Augment, usize, usize),
    rng: &mut StdRng,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if augment == Augment::None {
        return batch(split, index, device);
    }
    let (x, y) = batch(split, index, &Device::Cpu)?;
    let shape = x.shape().clone();
    let mut pixels = x.flatten_all()?.to_vec1::<f32>()?;
    augment::apply(&mut pixels, height, width, augment, rng);
    Ok((
        Tensor::from_vec(pixels, shape, &Device::Cpu)?.to_device(device)?,
        y.to_device(device)?,
    ))
}

/// Runs `schedule.epochs` epochs of `step` (which returns the batch loss) with a cosine
/// decay of every optimizer's learning rate (each from its own starting rate); returns the
/// seconds the epochs took.
#[allow(clippy::too_many_arguments)]
fn fit(
    label: &str,
    train: &Split,
    schedule: &Schedule,
    augment: (Augment, usize, usize),
    rng: &mut StdRng,
    device: &Device,
    opts: &mut [(FusedAdamW, f64)],
    mut step: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<f64> {
    let steps_per_epoch = steps_per_epoch(train.len(), schedule.batch_size);
    let total = (steps_per_epoch * schedule.epochs).max(1);
    let started = Instant::now();
    let mut t = 0usize;
    for epoch in 0..schedule.epochs {
        let mut sum = Tensor::zeros((), DType::F32, device)?;
        let batches = epoch_batches(train.len(), schedule.batch_size, rng);
        let count = batches.len();
        for index in batches {
            let progress = t as f64 / total as f64;
            let decay = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
            let (x, y) = augmented_batch(train, &index, augment, rng, device)?;
            let loss = step(&x, &y)?;
            let grads = loss.backward()?;
            for (opt, lr) in opts.iter_mut() {
                opt.set_learning_rate(*lr * decay);
                opt.step(&grads)?;
            }
            sum = (sum + loss.detach().to_dtype(DType::F32)?)?;
            t += 1;
        }
        let mean = sum.to_scalar::<f32>()? as f64 / count.max(1) as f64;
        if !mean.is_finite() {
            bail!(
                "{label}: the loss is {mean} after epoch {}; lower --lr",
                epoch + 1
            );
        }
        eprintln!(
            "{label}: epoch {}/{} loss {mean:.4} ({:.0}s)",
            epoch + 1,
            schedule.epochs,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(started.elapsed().as_secs_f64())
}

fn adam(vars: Vec<candle_core::Var>, lr: f64) -> Result<FusedAdamW> {
    Ok(FusedAdamW::new(
        vars,
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?)
}

/// Trains the trunk with a linear head (`hidden` ReLU layers between) by cross-entropy.
#[allow(clippy::too_many_arguments)]
pub fn train_classical(
    trunk_config: TrunkConfig,
    hidden: &[usize],
    classes: usize,
    train: &Split,
    schedule: &Schedule,
    augment: Augment,
    rng: &mut StdRng,
    device: &Device,
) -> Result<(CnnClassical, f64)> {
    let augment = (augment, trunk_config.height, trunk_config.width);
    let trunk_vars = Trunk::seeded_varmap(&trunk_config, rng, DType::F32, device)?;
    let mut sizes = vec![trunk_config.features];
    sizes.extend(hidden);
    sizes.push(classes);
    let trunk = Trunk::new(trunk_config, &trunk_vars, DType::F32, device)?;
    let mut head_vars = VarMap::new();
    let head = Mlp::new(
        &sizes,
        VarBuilder::from_varmap(&head_vars, DType::F32, device),
    )?;
    crate::init::seeded_mlp(&mut head_vars, &sizes, rng)?;
    let model = CnnClassical { trunk, head };
    let mut vars = trunk_vars.all_vars();
    vars.extend(head_vars.all_vars());
    let mut opts = [(adam(vars, schedule.learning_rate)?, schedule.learning_rate)];
    let seconds = fit(
        "classical cnn",
        train,
        schedule,
        augment,
        rng,
        device,
        &mut opts,
        |x, y| {
            let features = model.trunk.forward_t(x, true)?;
            let logits = crate::evaluate::Classifier::logits(&model.head, &features)?;
            Ok(candle_nn::loss::cross_entropy(&logits, y)?)
        },
    )?;
    Ok((model, seconds))
}

/// Trains the trunk under a `GaussNet` (`config.in_features` = the trunk's features) with
/// the FGN objective. The first Gaussian layer's centers start on the (initial) trunk
/// features of random training images, where the data is. The Gaussian layers learn at
/// `head_lr` (their precisions and centers move with the step size, as in the MLP; the
/// precision tensors at `head_lr · schedule.precision_lr_scale`), the trunk at
/// `schedule.learning_rate`.
#[allow(clippy::too_many_arguments)]
pub fn train_fgn(
    trunk_config: TrunkConfig,
    config: GaussNetConfig,
    objective: &FgnObjectiveConfig,
    train: &Split,
    schedule: &Schedule,
    augment: Augment,
    head_lr: f64,
    rng: &mut StdRng,
    device: &Device,
) -> Result<(CnnFgn, f64)> {
    let augment = (augment, trunk_config.height, trunk_config.width);
    if config
        .layer_specs()
        .iter()
        .any(|(_, _, l)| l.precision.parameterization == Parameterization::Direct)
    {
        bail!("--arch cnn does not support --param direct (its precisions need a repair step per update); use diag, cholesky or lowrank");
    }
    let trunk_vars = Trunk::seeded_varmap(&trunk_config, rng, DType::F32, device)?;
    let trunk = Trunk::new(trunk_config, &trunk_vars, DType::F32, device)?;
    let mut net_vars = VarMap::new();
    let net = GaussNet::new(
        config,
        VarBuilder::from_varmap(&net_vars, DType::F32, device),
    )?;
    if let Some(first) = net.layers().first() {
        let picks: Vec<u32> = (0..first.out_features())
            .map(|_| rng.random_range(0..train.len() as u32))
            .collect();
        let (x, _) = batch(train, &picks, device)?;
        let mut centers = trunk.forward(&x)?.detach();
        if net.input_norm().is_some() {
            // The Gaussians read batch-normed features: start them on standardized ones.
            let mean = centers.mean_keepdim(0)?;
            let centered = centers.broadcast_sub(&mean)?;
            let std = (centered.sqr()?.mean_keepdim(0)? + 1e-5)?.sqrt()?;
            centers = centered.broadcast_div(&std)?;
        }
        net_vars.set_one("layers.0.center", centers)?;
    }
    // The precision tensors learn at `head_lr · precision_lr_scale`, as the MLP's learn at
    // `lr · precision_lr_scale` (`--precision-lr-scale`; 1 for diag, sphere, lowrank and for
    // the full forms on at most 64 features).
    let (precision, rest) = crate::train::precision_and_rest(&net_vars, &net)?;
    let model = CnnFgn { trunk, net };
    let precision_lr = head_lr * schedule.precision_lr_scale;
    let mut opts = vec![
        (
            adam(trunk_vars.all_vars(), schedule.learning_rate)?,
            schedule.learning_rate,
        ),
        (adam(rest, head_lr)?, head_lr),
    ];
    if !precision.is_empty() {
        opts.push((adam(precision, precision_lr)?, precision_lr));
    }
    let seconds = fit(
        "fgn cnn",
        train,
        schedule,
        augment,
        rng,
        device,
        &mut opts,
        |x, y| {
            let features = model.trunk.forward_t(x, true)?;
            let logits = model.net.forward(&features, true)?;
            Ok(fgn_objective(&logits, y, model.net.layers(), objective)?.total)
        },
    )?;
    Ok((model, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Every sample once an epoch; no batch of one sample unless the set has one; the step
    /// count the progress bar and the learning-rate schedule use is the batches' count.
    #[test]
    fn epoch_batches_cover_every_sample_and_never_leave_one_alone() {
        let mut rng = StdRng::seed_from_u64(0);
        for (n, batch_size) in [(1, 4), (5, 4), (9, 4), (8, 4), (3, 1), (129, 128), (2, 128)] {
            let batches = epoch_batches(n, batch_size, &mut rng);
            let mut seen: Vec<u32> = batches.concat();
            seen.sort_unstable();
            assert_eq!(
                seen,
                (0..n as u32).collect::<Vec<_>>(),
                "n {n}, batch {batch_size}"
            );
            assert_eq!(batches.len(), steps_per_epoch(n, batch_size), "n {n}");
            if n >= 2 && batch_size >= 2 {
                assert!(batches.iter().all(|b| b.len() >= 2), "n {n}: {batches:?}");
            }
        }
        // 9 = 4 + 4 + 1: the lone sample joins the second batch.
        let sizes: Vec<usize> = epoch_batches(9, 4, &mut rng).iter().map(Vec::len).collect();
        assert_eq!(sizes, [4, 5]);
    }
    /// `--precision-lr-scale` reaches the CNN FGN's precision tensors: at a scale of 1e-30
    /// their steps (head_lr · 1e-30) vanish in f32, so the precision factors keep their
    /// (seeded) initial values while the weights and centers train at head_lr.
    #[test]
    fn the_cnn_precisions_learn_at_the_scaled_head_rate() -> Result<()> {
        use crate::cnn::Activation;
        use gauss_layer::{GaussLayerConfig, InitConfig, PrecisionConfig};
        let cpu = Device::Cpu;
        let (n, height, width) = (12usize, 8usize, 6usize);
        let pixels: Vec<f32> = (0..n * height * width)
            .map(|v| ((v * 37) % 101) as f32 / 100.0)
            .collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
        let train = Split {
            images: Tensor::from_vec(pixels, (n, height * width), &cpu)?,
            labels: Tensor::from_vec(labels, n, &cpu)?,
        };
        let trunk = TrunkConfig {
            height,
            width,
            channels: vec![2],
            features: 4,
            activation: Activation::None,
            batch_norm: false,
        };
        let layer = GaussLayerConfig {
            precision: PrecisionConfig::with_parameterization(Parameterization::Cholesky),
            init: InitConfig {
                seed: Some(5),
                ..Default::default()
            },
            ..Default::default()
        };
        let config = GaussNetConfig {
            in_features: 4,
            hidden: vec![],
            out_features: 3,
            layer: layer.clone(),
            output_layer: Some(layer),
            ..Default::default()
        };
        // The initial values: the same seeded config, untrained.
        let fresh = GaussNet::new(
            config.clone(),
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu),
        )?;
        let initial = |net: &GaussNet| -> Result<(Vec<f32>, Vec<f32>)> {
            let layer = &net.layers()[0];
            Ok((
                layer.precision().raw().flatten_all()?.to_vec1()?,
                layer
                    .weight()
                    .ok_or_else(|| anyhow::anyhow!("no weight"))?
                    .flatten_all()?
                    .to_vec1()?,
            ))
        };
        let (precision_before, weight_before) = initial(&fresh)?;
        let schedule = Schedule {
            epochs: 2,
            batch_size: 4,
            learning_rate: 1e-3,
            precision_lr_scale: 1e-30,
        };
        let (model, _) = train_fgn(
            trunk,
            config,
            &FgnObjectiveConfig::default(),
            &train,
            &schedule,
            Augment::None,
            1e-2,
            &mut StdRng::seed_from_u64(0),
            &cpu,
        )?;
        let (precision_after, weight_after) = initial(&model.net)?;
        assert_ne!(weight_after, weight_before, "the head did not train");
        assert_eq!(precision_after, precision_before);
        Ok(())
    }
}
