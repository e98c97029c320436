//! Two moons in 2-D: a classical MLP and an FGN network side by side, drawn as PNG maps so
//! you see where the FGN network says "I don't know" (softmax near uniform, drawn grey).
//!
//! ```text
//! cargo run --release -p toy2d -- --out-dir toy2d-out
//! ```
//! Writes `classical_decision.png`, `fgn_decision.png`, `fgn_confidence.png` and
//! `fgn_gaussian_activity.png`; prints one JSON line with accuracies and far-away confidences.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use gauss_layer::{GaussLayerConfig, GaussNet, GaussNetConfig, Parameterization};
use gauss_losses::{fgn_objective, FgnObjectiveConfig};
use plotters::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

#[derive(Parser)]
#[command(about = "Classical vs FGN decision maps on two moons, as PNG files")]
struct Args {
    /// Directory for the PNG files (created if missing).
    #[arg(long, default_value = "toy2d-out")]
    out_dir: PathBuf,
    /// Full-batch training steps.
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// Seed of the data set.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight of the λ-loss.
    #[arg(long, default_value_t = 0.1)]
    lambda_sigma: f64,
    /// Image size in pixels (square).
    #[arg(long, default_value_t = 400)]
    size: u32,
}

/// The plotted square: the moons live in about [-1.2, 2.2] × [-0.7, 1.2].
const X_RANGE: (f64, f64) = (-3.0, 4.0);
const Y_RANGE: (f64, f64) = (-3.0, 3.5);
const GRID: usize = 140;

/// Two interleaved half circles with Gaussian noise; labels 0 and 1.
fn moons(n: usize, noise: f64, rng: &mut StdRng) -> Result<(Vec<[f32; 2]>, Vec<u32>)> {
    let normal = Normal::new(0.0, noise)?;
    let mut points = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let t = rng.random_range(0.0..std::f64::consts::PI);
        let (x, y, label) = if i % 2 == 0 {
            (t.cos(), t.sin(), 0)
        } else {
            (1.0 - t.cos(), 0.5 - t.sin(), 1)
        };
        points.push([
            (x + normal.sample(rng)) as f32,
            (y + normal.sample(rng)) as f32,
        ]);
        labels.push(label);
    }
    Ok((points, labels))
}

fn tensor(points: &[[f32; 2]]) -> Result<Tensor> {
    let flat: Vec<f32> = points.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (points.len(), 2), &Device::Cpu)?)
}

fn adam(varmap: &VarMap, lr: f64) -> Result<AdamW> {
    Ok(AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?)
}

struct Mlp(Vec<Linear>);

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.0.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 < self.0.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

fn train_mlp(x: &Tensor, y: &Tensor, steps: usize) -> Result<Mlp> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let sizes = [2, 32, 32, 2];
    let layers = sizes
        .windows(2)
        .enumerate()
        .map(|(i, w)| candle_nn::linear(w[0], w[1], vb.pp(i)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mlp = Mlp(layers);
    let mut opt = adam(&varmap, 0.01)?;
    for _ in 0..steps {
        let loss = candle_nn::loss::cross_entropy(&mlp.forward(x)?, y)?;
        opt.backward_step(&loss)?;
    }
    Ok(mlp)
}

fn train_fgn(x: &Tensor, y: &Tensor, steps: usize, lambda_sigma: f64) -> Result<GaussNet> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let layer = GaussLayerConfig {
        parameterization: Parameterization::Cholesky,
        tanh: true,
        ..Default::default()
    };
    let config = GaussNetConfig {
        in_features: 2,
        hidden: vec![16],
        out_features: 2,
        layer: layer.clone(),
        output_layer: Some(GaussLayerConfig {
            tanh: false,
            ..layer
        }),
        gate: true,
        ..Default::default()
    };
    let net = GaussNet::new(config, vb)?;
    let mut opt = adam(&varmap, 0.02)?;
    let objective = FgnObjectiveConfig {
        lambda_sigma,
        ..Default::default()
    };
    for _ in 0..steps {
        let logits = net.forward(x, true)?;
        let loss = fgn_objective(&logits, y, net.layers(), &objective)?;
        opt.backward_step(&loss.total)?;
    }
    Ok(net)
}

fn accuracy(logits: &Tensor, y: &Tensor) -> Result<f64> {
    let hits = logits
        .argmax(D::Minus1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(hits as f64)
}

/// Grid points, row-major from the top-left, and their cell size.
fn grid() -> Result<Tensor> {
    let mut points = Vec::with_capacity(GRID * GRID);
    for row in 0..GRID {
        for col in 0..GRID {
            let x = X_RANGE.0 + (col as f64 + 0.5) / GRID as f64 * (X_RANGE.1 - X_RANGE.0);
            let y = Y_RANGE.1 - (row as f64 + 0.5) / GRID as f64 * (Y_RANGE.1 - Y_RANGE.0);
            points.push([x as f32, y as f32]);
        }
    }
    tensor(&points)
}

/// Colour of a class-1 probability: blue (class 0) to red (class 1) through grey, the grey
/// meaning "either class" (max softmax 0.5).
fn decision_color(p1: f32) -> RGBColor {
    let confidence = ((p1 - 0.5).abs() * 2.0).clamp(0.0, 1.0);
    let (r, g, b) = if p1 >= 0.5 {
        (220.0, 60.0, 50.0)
    } else {
        (40.0, 90.0, 210.0)
    };
    let grey = 200.0;
    let mix = |c: f32| (grey + (c - grey) * confidence) as u8;
    RGBColor(mix(r), mix(g), mix(b))
}

/// White (0) to dark green (1).
fn intensity_color(v: f32) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    RGBColor(
        (255.0 - 225.0 * v) as u8,
        (255.0 - 135.0 * v) as u8,
        (255.0 - 195.0 * v) as u8,
    )
}

fn draw_map(
    path: &Path,
    size: u32,
    values: &[f32],
    color: impl Fn(f32) -> RGBColor,
    points: &[[f32; 2]],
    labels: &[u32],
) -> Result<()> {
    let root = BitMapBackend::new(path, (size, size)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .margin(0)
        .build_cartesian_2d(X_RANGE.0..X_RANGE.1, Y_RANGE.0..Y_RANGE.1)?;
    let dx = (X_RANGE.1 - X_RANGE.0) / GRID as f64;
    let dy = (Y_RANGE.1 - Y_RANGE.0) / GRID as f64;
    chart.draw_series(values.iter().enumerate().map(|(i, &v)| {
        let (row, col) = (i / GRID, i % GRID);
        let x0 = X_RANGE.0 + col as f64 * dx;
        let y1 = Y_RANGE.1 - row as f64 * dy;
        Rectangle::new([(x0, y1 - dy), (x0 + dx, y1)], color(v).filled())
    }))?;
    chart.draw_series(points.iter().zip(labels).map(|(p, &l)| {
        let fill = if l == 0 {
            RGBColor(20, 40, 140)
        } else {
            RGBColor(140, 20, 20)
        };
        Circle::new((p[0] as f64, p[1] as f64), 2, fill.filled())
    }))?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// mimalloc keeps freed blocks for reuse instead of returning them to the kernel: training
/// allocates and frees many large tensors per step (see the README, "Performance").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fixes the thread count once: Candle reads `RAYON_NUM_THREADS` on every CPU matmul and,
/// when it is unset, counts the cores from `/proc` and sysfs each time. Sets it (to Candle's
/// own default unless the user chose) and builds the global rayon pool with the same count.
/// Runs first in `main`, before any other thread exists.
fn pin_threads() {
    let threads = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
}

fn main() -> Result<()> {
    pin_threads();
    let args = Args::parse();
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let (points, labels) = moons(400, 0.1, &mut rng)?;
    let x = tensor(&points)?;
    let y = Tensor::new(labels.as_slice(), &Device::Cpu)?;

    let mlp = train_mlp(&x, &y, args.steps)?;
    let fgn = train_fgn(&x, &y, args.steps, args.lambda_sigma)?;

    let grid = grid()?;
    let mlp_probs = candle_nn::ops::softmax_last_dim(&mlp.forward(&grid)?)?;
    let (fgn_logits, gaussians) = fgn.forward_with_gaussians(&grid, false)?;
    let fgn_probs = candle_nn::ops::softmax_last_dim(&fgn_logits)?;
    let class1 =
        |p: &Tensor| -> Result<Vec<f32>> { Ok(p.narrow(1, 1, 1)?.flatten_all()?.to_vec1()?) };
    let fgn_conf: Vec<f32> = fgn_probs.max(D::Minus1)?.to_vec1()?;
    let activity: Vec<f32> = gaussians
        .last()
        .context("network has no layers")?
        .max(D::Minus1)?
        .to_vec1()?;

    let out = &args.out_dir;
    draw_map(
        &out.join("classical_decision.png"),
        args.size,
        &class1(&mlp_probs)?,
        decision_color,
        &points,
        &labels,
    )?;
    draw_map(
        &out.join("fgn_decision.png"),
        args.size,
        &class1(&fgn_probs)?,
        decision_color,
        &points,
        &labels,
    )?;
    // Max softmax is in [0.5, 1] for two classes: stretch it to [0, 1].
    draw_map(
        &out.join("fgn_confidence.png"),
        args.size,
        &fgn_conf,
        |c| intensity_color((c - 0.5) * 2.0),
        &points,
        &labels,
    )?;
    draw_map(
        &out.join("fgn_gaussian_activity.png"),
        args.size,
        &activity,
        intensity_color,
        &points,
        &labels,
    )?;

    // Confidence far from the data: the border ring of the grid.
    let far: Vec<usize> = (0..GRID * GRID)
        .filter(|i| {
            let (r, c) = (i / GRID, i % GRID);
            r < 5 || c < 5 || r >= GRID - 5 || c >= GRID - 5
        })
        .collect();
    let mlp_conf: Vec<f32> = mlp_probs.max(D::Minus1)?.to_vec1()?;
    let far_mean = |c: &[f32]| far.iter().map(|&i| c[i] as f64).sum::<f64>() / far.len() as f64;
    println!(
        "{{\"classical_accuracy\":{:.4},\"fgn_accuracy\":{:.4},\"classical_far_mean_max_softmax\":{:.4},\"fgn_far_mean_max_softmax\":{:.4},\"out_dir\":{:?}}}",
        accuracy(&mlp.forward(&x)?, &y)?,
        accuracy(&fgn.forward(&x, false)?, &y)?,
        far_mean(&mlp_conf),
        far_mean(&fgn_conf),
        out.display().to_string()
    );
    Ok(())
}
