//! Two moons in 2-D: a classical MLP and an FGN network side by side, drawn as PNG maps so
//! you see where the FGN network says "I don't know" (softmax near uniform, drawn grey).
//!
//! ```text
//! cargo run --release -p toy2d -- --out-dir toy2d-out
//! ```
//! Writes `classical_decision.png`, `fgn_decision.png`, `fgn_confidence.png` and
//! `fgn_gaussian_activity.png` (each with axes, a legend of the data points and a colour bar);
//! prints one JSON line with accuracies and far-away confidences.

mod font;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use examples_support::parameterization;
use gauss_layer::{
    repair, GaussLayerConfig, GaussNet, GaussNetConfig, Parameterization, PrecisionConfig,
};
use gauss_losses::{fgn_objective, FgnObjectiveConfig};
use plotters::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

#[derive(Parser)]
#[command(
    about = "Classical vs FGN decision maps on two moons, as PNG files",
    long_about = "Trains a classical MLP (2-32-32-2, ReLU) and an FGN network (2-16-2 Gaussian \
neurons, gated) on 400 noisy two-moons points, full batch with AdamW, and draws over \
[-3, 4] x [-3, 3.5]: each network's P(class 1) (blue = class 0, red = class 1, grey = \
unsure), the FGN's max softmax, and the FGN output layer's strongest Gaussian activity. \
The last line of stdout is one JSON object with both accuracies and the mean max softmax \
on the map's border, far from the data. Runs with the same --seed give the same maps and \
numbers: the seed draws the data and both networks' initial weights."
)]
struct Args {
    /// Directory for the PNG files (created if missing; checked writable before training).
    #[arg(long, default_value = "toy2d-out")]
    out_dir: PathBuf,
    /// Full-batch training steps of each network (>= 1).
    #[arg(long, default_value_t = 600, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    steps: usize,
    /// Seed of the data set and of both networks' initialization (the classical MLP's and the
    /// FGN's).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight of the λ-loss (mean covariance eigenvalue) in the FGN objective: larger keeps
    /// the Gaussians tighter around the data.
    #[arg(long, default_value_t = 0.1)]
    lambda_sigma: f64,
    /// Precision parameterization of the FGN layers. lowrank needs its rank: `--param
    /// lowrank:R` or `--param lowrank --rank R`.
    #[arg(long, default_value = "cholesky", value_parser = examples_support::parameterization_parser())]
    param: String,
    /// Columns of U for `--param lowrank` (1 <= R <= 2, the input dimension); `--param
    /// lowrank:R` names it too (the two must agree).
    #[arg(long)]
    rank: Option<usize>,
    /// Side of the square map in pixels (the PNG adds margins for axes, legend and colour bar).
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(64..=4096))]
    size: u32,
}

/// Makes `--out-dir` (if missing) and checks it takes files, so a run that cannot save its
/// pictures fails before training rather than after: a probe file is created and removed.
fn prepare_out_dir(dir: &Path) -> Result<()> {
    if std::fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
        bail!(
            "--out-dir {} is a file, not a directory: name a directory (it is created if missing)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create --out-dir {}", dir.display()))?;
    examples_support::check_dir_writable(
        dir,
        &format!("--out-dir {} (the PNG files go there)", dir.display()),
    )
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

/// Values uniform in `[-bound, bound]`, as an f32 tensor of `shape`.
fn uniform(rng: &mut StdRng, shape: &[usize], bound: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-bound..=bound) as f32)
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Trains the classical MLP. Candle's CPU generator cannot be seeded, so the `Linear` layers'
/// initial weights and biases are drawn from `rng` instead (as `fgn-classifier` does): the
/// variance of Candle's own init (Kaiming: weights uniform in ±√(3 / fan_in), biases in
/// ±1/√fan_in), but the same values for the same seed.
fn train_mlp(x: &Tensor, y: &Tensor, steps: usize, rng: &mut StdRng) -> Result<Mlp> {
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let sizes = [2, 32, 32, 2];
    let layers = sizes
        .windows(2)
        .enumerate()
        .map(|(i, w)| candle_nn::linear(w[0], w[1], vb.pp(i)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    for (i, w) in sizes.windows(2).enumerate() {
        let bound = 1.0 / (w[0] as f64).sqrt();
        let weight = uniform(rng, &[w[1], w[0]], bound * 3f64.sqrt())?;
        varmap.set_one(format!("{i}.weight"), weight)?;
        varmap.set_one(format!("{i}.bias"), uniform(rng, &[w[1]], bound)?)?;
    }
    let mlp = Mlp(layers);
    let mut opt = adam(&varmap, 0.01)?;
    for _ in 0..steps {
        let loss = candle_nn::loss::cross_entropy(&mlp.forward(x)?, y)?;
        opt.backward_step(&loss)?;
    }
    Ok(mlp)
}

/// Smallest eigenvalue a `direct` precision is repaired to after a step (as `fgn-classifier`).
const DIRECT_MIN_EIGENVALUE: f64 = 1e-3;

/// The FGN network (2-16-2, gated; its initial weights drawn from `seed`) and its variables.
/// Built before any training, so a config the layers refuse (e.g. a rank above 2) fails at
/// once.
fn build_fgn(parameterization: Parameterization, seed: u64) -> Result<(GaussNet, VarMap)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let layer = GaussLayerConfig {
        precision: PrecisionConfig::with_parameterization(parameterization),
        tanh: true,
        init: gauss_layer::InitConfig {
            seed: Some(seed),
            ..Default::default()
        },
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
    Ok((net, varmap))
}

/// The FGN objective of `--lambda-sigma` (an error for a negative or non-finite weight).
fn objective(lambda_sigma: f64) -> Result<FgnObjectiveConfig> {
    let objective = FgnObjectiveConfig {
        lambda_sigma,
        ..Default::default()
    };
    objective.validate().context("--lambda-sigma")?;
    Ok(objective)
}

/// Trains the FGN network full batch: AdamW on the FGN objective, each `direct` precision
/// repaired after each step.
fn train_fgn(
    net: &GaussNet,
    varmap: &VarMap,
    x: &Tensor,
    y: &Tensor,
    steps: usize,
    lambda_sigma: f64,
) -> Result<()> {
    let direct = repair::direct_vars(varmap, net.layers())?;
    let mut opt = adam(varmap, 0.02)?;
    let objective = objective(lambda_sigma)?;
    for _ in 0..steps {
        let logits = net.forward(x, true)?;
        let loss = fgn_objective(&logits, y, net.layers(), &objective)?;
        opt.backward_step(&loss.total)?;
        for precision in &direct {
            repair::repair_var_if_needed(precision, DIRECT_MIN_EIGENVALUE)?;
        }
    }
    Ok(())
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

/// How one map is labelled and coloured.
struct MapStyle<'a> {
    /// Title above the map.
    title: &'a str,
    /// Name of the plotted quantity, under the colour bar.
    bar_title: &'a str,
    /// The values at the bottom and top of the colour bar.
    range: (f32, f32),
    /// Colour bar ticks: value and label.
    ticks: &'a [(f32, &'a str)],
    /// Colour of a value.
    color: &'a dyn Fn(f32) -> RGBColor,
}

/// Margins around the square map, in pixels: room for the title and legend (top), the x
/// axis (bottom), the y axis (left) and the colour bar with its labels (right).
const TOP: i32 = 34;
const BOTTOM: i32 = 50;
const LEFT: i32 = 56;
const RIGHT: i32 = 170;
/// Font scale of every label (a 5×7 glyph becomes 10×14 pixels).
const TEXT: i32 = 2;
const INK: RGBColor = RGBColor(30, 30, 30);
const CLASS_COLORS: [RGBColor; 2] = [RGBColor(20, 40, 140), RGBColor(140, 20, 20)];

/// `value` in `[lo, hi]` mapped to `[0, size]` pixels.
fn to_pixels(value: f64, (lo, hi): (f64, f64), size: i32) -> i32 {
    ((value - lo) / (hi - lo) * size as f64).round() as i32
}

/// Draws the map and writes it as a PNG through the library's one atomic write: an
/// interrupted run leaves the previous picture or none, never half of one (plotters' own file
/// backend writes in place).
fn draw_map(
    path: &Path,
    size: u32,
    values: &[f32],
    style: &MapStyle,
    points: &[[f32; 2]],
    labels: &[u32],
) -> Result<()> {
    let side = size as i32;
    let (width, height) = ((LEFT + side + RIGHT) as u32, (TOP + side + BOTTOM) as u32);
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    render_map(
        &mut rgb,
        (width, height),
        side,
        values,
        style,
        points,
        labels,
    )?;
    let image = image::RgbImage::from_raw(width, height, rgb)
        .context("the rendered map does not fill its picture")?;
    let mut png = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut png),
            image::ImageOutputFormat::Png,
        )
        .with_context(|| format!("cannot encode {}", path.display()))?;
    gauss_layer::files::write_atomically(path, &png)?;
    Ok(())
}

/// Draws the map into `rgb` (RGB bytes of a `width × height` picture).
fn render_map(
    rgb: &mut [u8],
    (width, height): (u32, u32),
    side: i32,
    values: &[f32],
    style: &MapStyle,
    points: &[[f32; 2]],
    labels: &[u32],
) -> Result<()> {
    let root = BitMapBackend::with_buffer(rgb, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let text = |s: &str, at: (i32, i32)| font::draw_text(&root, s, at, TEXT, INK);
    let line_height = font::text_height(TEXT);

    // The map, cell by cell.
    let edge = |i: usize| i as i32 * side / GRID as i32;
    for (i, &v) in values.iter().enumerate() {
        let (row, col) = (i / GRID, i % GRID);
        root.draw(&Rectangle::new(
            [
                (LEFT + edge(col), TOP + edge(row)),
                (LEFT + edge(col + 1), TOP + edge(row + 1)),
            ],
            (style.color)(v).filled(),
        ))?;
    }
    // The training points.
    for (p, &l) in points.iter().zip(labels) {
        let px = LEFT + to_pixels(p[0] as f64, X_RANGE, side);
        let py = TOP + side - to_pixels(p[1] as f64, Y_RANGE, side);
        if (LEFT..LEFT + side).contains(&px) && (TOP..TOP + side).contains(&py) {
            let fill = CLASS_COLORS[(l as usize).min(1)];
            root.draw(&Circle::new((px, py), 2, fill.filled()))?;
        }
    }

    // Axes: a frame, integer ticks, labels x1 and x2.
    root.draw(&Rectangle::new(
        [(LEFT - 1, TOP - 1), (LEFT + side, TOP + side)],
        INK.stroke_width(1),
    ))?;
    for t in (X_RANGE.0.ceil() as i32)..=(X_RANGE.1.floor() as i32) {
        let px = LEFT + to_pixels(t as f64, X_RANGE, side);
        root.draw(&PathElement::new(
            vec![(px, TOP + side), (px, TOP + side + 5)],
            INK,
        ))?;
        let label = t.to_string();
        text(
            &label,
            (px - font::text_width(&label, TEXT) / 2, TOP + side + 8),
        )?;
    }
    for t in (Y_RANGE.0.ceil() as i32)..=(Y_RANGE.1.floor() as i32) {
        let py = TOP + side - to_pixels(t as f64, Y_RANGE, side);
        root.draw(&PathElement::new(vec![(LEFT - 6, py), (LEFT - 1, py)], INK))?;
        let label = t.to_string();
        text(
            &label,
            (
                LEFT - 9 - font::text_width(&label, TEXT),
                py - line_height / 2,
            ),
        )?;
    }
    text(
        "x1",
        (
            LEFT + side / 2 - font::text_width("x1", TEXT) / 2,
            TOP + side + 12 + line_height,
        ),
    )?;
    text("x2", (4, TOP + side / 2 - line_height / 2))?;

    // Title (left) and legend of the points (right), above the map.
    text(style.title, (LEFT, (TOP - line_height) / 2))?;
    let mut x = width as i32 - 8;
    for (class, color) in CLASS_COLORS.iter().enumerate().rev() {
        let label = format!("class {class}");
        x -= font::text_width(&label, TEXT);
        text(&label, (x, (TOP - line_height) / 2))?;
        x -= 10;
        root.draw(&Circle::new((x, TOP / 2), 4, color.filled()))?;
        x -= 16;
    }

    // Colour bar: the colour of every value in the range, bottom to top, with ticks.
    let bar_left = LEFT + side + 18;
    let bar_width = 18;
    let (lo, hi) = style.range;
    for row in 0..side {
        let v = hi - (hi - lo) * (row as f32 + 0.5) / side as f32;
        root.draw(&Rectangle::new(
            [(bar_left, TOP + row), (bar_left + bar_width, TOP + row + 1)],
            (style.color)(v).filled(),
        ))?;
    }
    root.draw(&Rectangle::new(
        [(bar_left - 1, TOP - 1), (bar_left + bar_width, TOP + side)],
        INK.stroke_width(1),
    ))?;
    for &(v, label) in style.ticks {
        let py = TOP + side - to_pixels(v as f64, (lo as f64, hi as f64), side);
        root.draw(&PathElement::new(
            vec![(bar_left + bar_width, py), (bar_left + bar_width + 5, py)],
            INK,
        ))?;
        text(label, (bar_left + bar_width + 8, py - line_height / 2))?;
    }
    text(style.bar_title, (bar_left, TOP + side + 12 + line_height))?;

    root.present()?;
    Ok(())
}

examples_support::global_allocator!();

fn main() {
    let args = Args::parse();
    // A failure is one line on stderr (`error: ` and its causes) and exit status 1.
    examples_support::exit_on_error(examples_support::run_on_thread_pool(move || run(args)));
}

fn run(args: Args) -> Result<()> {
    // Everything the user can get wrong is checked before training: the parameterization,
    // --lambda-sigma, the layers' config (the FGN is built first; its initial weights come
    // from its own seed, so the order changes none) and the output directory.
    let parameterization = parameterization(&args.param, args.rank)?;
    objective(args.lambda_sigma)?;
    let (fgn, fgn_vars) = build_fgn(parameterization, args.seed)?;
    prepare_out_dir(&args.out_dir)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let (points, labels) = moons(400, 0.1, &mut rng)?;
    let x = tensor(&points)?;
    let y = Tensor::new(labels.as_slice(), &Device::Cpu)?;

    // The MLP's initial weights continue the data's random stream.
    let mlp = train_mlp(&x, &y, args.steps, &mut rng)?;
    train_fgn(&fgn, &fgn_vars, &x, &y, args.steps, args.lambda_sigma)?;

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
    let decision_ticks = [(0.0, "0 class 0"), (0.5, "0.5 unsure"), (1.0, "1 class 1")];
    let decision = |title| MapStyle {
        title,
        bar_title: "P(class 1)",
        range: (0.0, 1.0),
        ticks: &decision_ticks,
        color: &decision_color,
    };
    draw_map(
        &out.join("classical_decision.png"),
        args.size,
        &class1(&mlp_probs)?,
        &decision("classical MLP"),
        &points,
        &labels,
    )?;
    draw_map(
        &out.join("fgn_decision.png"),
        args.size,
        &class1(&fgn_probs)?,
        &decision("FGN"),
        &points,
        &labels,
    )?;
    // Max softmax is in [0.5, 1] for two classes: stretch it to [0, 1].
    let confidence_color = |c: f32| intensity_color((c - 0.5) * 2.0);
    draw_map(
        &out.join("fgn_confidence.png"),
        args.size,
        &fgn_conf,
        &MapStyle {
            title: "FGN confidence",
            bar_title: "max softmax",
            range: (0.5, 1.0),
            ticks: &[(0.5, "0.5"), (0.75, "0.75"), (1.0, "1")],
            color: &confidence_color,
        },
        &points,
        &labels,
    )?;
    draw_map(
        &out.join("fgn_gaussian_activity.png"),
        args.size,
        &activity,
        &MapStyle {
            title: "FGN output Gaussians",
            bar_title: "max g",
            range: (0.0, 1.0),
            ticks: &[(0.0, "0"), (0.5, "0.5"), (1.0, "1")],
            color: &intensity_color,
        },
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
    let summary = Summary {
        param: parameterization,
        classical_accuracy: accuracy(&mlp.forward(&x)?, &y)?,
        fgn_accuracy: accuracy(&fgn.forward(&x, false)?, &y)?,
        classical_far: far_mean(&mlp_conf),
        fgn_far: far_mean(&fgn_conf),
    };
    examples_support::print_line(summary.json_line(out))?;
    Ok(())
}

/// What the last line of stdout reports.
struct Summary {
    param: Parameterization,
    classical_accuracy: f64,
    fgn_accuracy: f64,
    /// Mean max softmax on the map's border ring.
    classical_far: f64,
    fgn_far: f64,
}

impl Summary {
    /// One JSON object, built by serde_json rather than by hand: a NaN becomes `null` (not
    /// the bare `NaN` no JSON reader takes) and the path is escaped as JSON (not as Rust's
    /// `{:?}`, whose `\u{7}` is invalid JSON). Numbers keep the 4 decimals they always had.
    fn json_line(&self, out_dir: &Path) -> String {
        let round = |v: f64| (v * 1e4).round() / 1e4;
        serde_json::json!({
            "param": self.param.to_string(),
            "classical_accuracy": round(self.classical_accuracy),
            "fgn_accuracy": round(self.fgn_accuracy),
            "classical_far_mean_max_softmax": round(self.classical_far),
            "fgn_far_mean_max_softmax": round(self.fgn_far),
            "out_dir": out_dir.display().to_string(),
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--steps 0` trained nothing and drew the untrained maps; it is refused by name.
    #[test]
    fn zero_steps_are_refused() {
        use clap::Parser;
        let e = Args::try_parse_from(["toy2d", "--steps", "0"])
            .err()
            .expect("--steps 0 must be refused")
            .to_string();
        assert!(e.contains("--steps"), "{e}");
        assert_eq!(
            Args::try_parse_from(["toy2d", "--steps", "1"])
                .unwrap()
                .steps,
            1
        );
    }

    /// The classical MLP is a function of the seed: two trainings from the same seed give
    /// bit-identical logits, another seed other ones.
    #[test]
    fn classical_mlp_is_deterministic_from_the_seed() -> Result<()> {
        let train = |seed: u64| -> Result<Vec<f32>> {
            let mut rng = StdRng::seed_from_u64(seed);
            let (points, labels) = moons(40, 0.1, &mut rng)?;
            let (x, y) = (
                tensor(&points)?,
                Tensor::new(labels.as_slice(), &Device::Cpu)?,
            );
            let mlp = train_mlp(&x, &y, 5, &mut rng)?;
            Ok(mlp.forward(&x)?.flatten_all()?.to_vec1()?)
        };
        let first = train(3)?;
        assert_eq!(first, train(3)?);
        assert_ne!(first, train(4)?);
        Ok(())
    }

    /// `direct` trains: every step's repair keeps the precisions positive definite (without
    /// it the loss fails within the first steps, `precision of neuron 0 is not positive
    /// definite`), and the trained network is finite and better than chance.
    #[test]
    fn direct_trains_with_a_repair_after_each_step() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(0);
        let (points, labels) = moons(100, 0.1, &mut rng)?;
        let (x, y) = (
            tensor(&points)?,
            Tensor::new(labels.as_slice(), &Device::Cpu)?,
        );
        let (net, varmap) = build_fgn(Parameterization::Direct, 0)?;
        assert_eq!(repair::direct_vars(&varmap, net.layers())?.len(), 2);
        train_fgn(&net, &varmap, &x, &y, 60, 0.1)?;
        for precision in repair::direct_vars(&varmap, net.layers())? {
            let report = repair::check_positive_definite_matrices(precision.as_tensor())?;
            assert!(report.neurons.iter().all(|n| n.positive_definite));
        }
        let logits = net.forward(&x, false)?;
        assert!(logits
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite()));
        assert!(accuracy(&logits, &y)? > 0.6);
        let (other, other_vars) = build_fgn(Parameterization::Cholesky, 0)?;
        assert!(repair::direct_vars(&other_vars, other.layers())?.is_empty());
        Ok(())
    }

    #[test]
    fn lowrank_takes_its_rank_from_the_name_or_rank_and_both_must_agree() -> Result<()> {
        let lowrank = |rank| Parameterization::LowRank { rank };
        assert_eq!(parameterization("lowrank:2", None)?, lowrank(2));
        assert_eq!(parameterization("lowrank", Some(2))?, lowrank(2));
        assert_eq!(parameterization("lowrank:2", Some(2))?, lowrank(2));
        let err = parameterization("lowrank:2", Some(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("two ranks"), "{err}");
        assert!(parameterization("lowrank", None).is_err());
        assert!(parameterization("lowrank:0", None).is_err());
        assert!(parameterization("direct", Some(2)).is_err());
        assert_eq!(parameterization("direct", None)?, Parameterization::Direct);
        // Through the command line: `lowrank:R` is accepted, a bad rank refused by clap.
        let args = Args::try_parse_from(["toy2d", "--param", "lowrank:2"])?;
        assert_eq!(parameterization(&args.param, args.rank)?, lowrank(2));
        let args = Args::try_parse_from(["toy2d", "--param", "lowrank:x"])?;
        assert!(parameterization(&args.param, args.rank).is_err());
        assert!(Args::try_parse_from(["toy2d", "--param", "nope"]).is_err());
        // A rank the 2-input layer cannot have fails when the network is built (before
        // training), not later.
        assert!(build_fgn(lowrank(8), 0).is_err());
        Ok(())
    }

    #[test]
    fn out_dir_is_created_checked_and_left_clean() -> Result<()> {
        let root = std::env::temp_dir().join(format!("toy2d-test-{}", std::process::id()));
        let dir = root.join("a/b");
        prepare_out_dir(&dir)?;
        assert!(dir.is_dir());
        assert_eq!(
            std::fs::read_dir(&dir)?.count(),
            0,
            "the probe file is removed"
        );
        prepare_out_dir(&dir)?;
        let file = root.join("file");
        std::fs::write(&file, b"x")?;
        let err = examples_support::one_line(&prepare_out_dir(&file).unwrap_err());
        assert!(err.contains("is a file, not a directory"), "{err}");
        assert!(prepare_out_dir(&file.join("sub")).is_err());
        std::fs::remove_dir_all(&root)?;
        Ok(())
    }

    #[test]
    fn summary_is_json_with_nan_as_null_and_the_path_escaped() -> Result<()> {
        let summary = Summary {
            param: Parameterization::LowRank { rank: 2 },
            classical_accuracy: 0.987_65,
            fgn_accuracy: 1.0,
            classical_far: 0.99,
            fgn_far: f64::NAN,
        };
        let dir = "out \"dir\" \\ \u{7} é";
        let line = summary.json_line(Path::new(dir));
        let value: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
        assert_eq!(value["param"], "lowrank:2", "{line}");
        assert_eq!(value["classical_accuracy"], 0.9877, "{line}");
        assert_eq!(value["fgn_accuracy"], 1.0, "{line}");
        assert!(value["fgn_far_mean_max_softmax"].is_null(), "{line}");
        assert_eq!(value["out_dir"], dir, "{line}");
        Ok(())
    }
}
