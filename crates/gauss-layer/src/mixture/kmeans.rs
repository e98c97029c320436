//! The data-driven start: k-means++ seeding and Lloyd's iterations on the centered samples,
//! as scikit-learn's `GaussianMixture(init_params='k-means++')` starts.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use crate::error::{check_dtype, GaussError, Result};
use crate::linalg;

/// The samples of a fit with what every step reuses.
pub(super) struct Samples {
    /// (N, d), in the mixture's dtype (what its densities take).
    pub(super) x: Tensor,
    /// `x` in [`linalg::accumulation_dtype`] (N, d): the M-steps' weighted sums run on it.
    pub(super) wide: Tensor,
    /// `wide` minus its column means (N, d): k-means works on it, and diag/sphere M-steps
    /// take second moments from it (centering keeps them from cancelling).
    pub(super) centered: Tensor,
    /// `centered²` (N, d).
    pub(super) centered_sq: Tensor,
    /// `‖centered‖²` per row (N).
    pub(super) centered_norm_sq: Tensor,
    /// The column means (1, d), in [`linalg::accumulation_dtype`].
    pub(super) offset: Tensor,
}

impl Samples {
    fn new(x: Tensor, wide: Tensor) -> Result<Self> {
        let offset = wide.mean_keepdim(0)?;
        let centered = wide.broadcast_sub(&offset)?;
        let centered_sq = centered.sqr()?;
        let centered_norm_sq = centered_sq.sum(1)?;
        Ok(Self {
            x,
            wide,
            centered,
            centered_sq,
            centered_norm_sq,
            offset,
        })
    }
}

/// `x` as (N, d), checked: dtype of the mixture, finite, at least `min_rows` rows.
pub(super) fn checked_samples(
    x: &Tensor,
    d: usize,
    dtype: DType,
    min_rows: usize,
) -> Result<Samples> {
    let (flat, _) = crate::ops::flatten_leading(x, d, "samples x")?;
    check_dtype("samples x", &flat, dtype, "the mixture")?;
    let n = flat.dims()[0];
    if n < min_rows {
        return Err(GaussError::shape(
            "samples x",
            format!("(N, {d}) with N >= {min_rows} (at least one sample per component)"),
            x.dims(),
        ));
    }
    let wide = flat.to_dtype(linalg::accumulation_dtype(dtype))?;
    let energy = linalg::read_scalar(&wide.sqr()?.sum_all()?)?;
    if !energy.is_finite() {
        return Err(GaussError::data(
            "samples x",
            "holds non-finite values (or values whose squares overflow)",
        ));
    }
    Samples::new(flat, wide)
}

/// Host f64 values of a tensor.
pub(super) fn host_values(t: &Tensor) -> Result<Vec<f64>> {
    // Moved first and cast on the host: Metal has no f64.
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

/// The result of one k-means run.
pub(super) struct KMeans {
    pub(super) labels: Tensor,
    pub(super) inertia: f64,
    pub(super) steps: usize,
}

/// Squared distances of every row of `x` (N, d) to every row of `centers` (K, d), by the
/// expansion `|x|² − 2 x·c + |c|²` (clamped at 0). `x_sq`: (N).
pub(super) fn squared_distances(x: &Tensor, x_sq: &Tensor, centers: &Tensor) -> Result<Tensor> {
    let c_sq = centers.sqr()?.sum(1)?;
    let cross = x.matmul(&centers.t()?)?;
    Ok((cross * -2.0)?
        .broadcast_add(&x_sq.unsqueeze(1)?)?
        .broadcast_add(&c_sq.unsqueeze(0)?)?
        .relu()?)
}

/// An index drawn with probability proportional to `weights` (uniform if they are all 0).
fn draw_index(weights: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = weights.iter().sum();
    if total.is_nan() || total <= 0.0 {
        return rng.random_range(0..weights.len());
    }
    let mut target = rng.random::<f64>() * total;
    for (i, &w) in weights.iter().enumerate() {
        if target < w {
            return i;
        }
        target -= w;
    }
    weights.len() - 1
}

/// Greedy k-means++ seeding (Arthur & Vassilvitskii, with scikit-learn's `2 + ln k`
/// candidates per center), then Lloyd's iterations until the labels stop changing or the
/// centers move by less than scikit-learn's tolerance (squared shift at most 1e-4 times the
/// mean per-feature variance).
pub(super) fn kmeans(
    samples: &Samples,
    k: usize,
    max_steps: usize,
    rng: &mut StdRng,
) -> Result<KMeans> {
    let (x, x_sq) = (&samples.centered, &samples.centered_norm_sq);
    let (n, d) = x.dims2()?;
    let tolerance = 1e-4 * linalg::read_scalar(&samples.centered_sq.sum_all()?)? / (n * d) as f64;
    let trials = 2 + (k as f64).ln().floor() as usize;
    let first = rng.random_range(0..n);
    let mut chosen = vec![first];
    let row = |i: usize| x.narrow(0, i, 1);
    let mut closest = host_values(&squared_distances(x, x_sq, &row(first)?)?)?;
    let energy: f64 = host_values(x_sq)?.iter().sum();
    while chosen.len() < k {
        // Every sample sits on a chosen seed (to rounding): the data has no more distinct
        // samples than the seeds so far, and a further component would hold none.
        let potential: f64 = closest.iter().sum();
        if potential.is_nan() || potential <= 1e-12 * energy {
            return Err(GaussError::data(
                "samples x",
                format!(
                    "holds only {} distinct samples (to a relative 1e-6), fewer than the {k} components; fit at most {} components",
                    chosen.len(),
                    chosen.len()
                ),
            ));
        }
        let candidates: Vec<usize> = (0..trials).map(|_| draw_index(&closest, rng)).collect();
        let rows = Tensor::new(
            candidates.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            x.device(),
        )?;
        let distances = host_values(&squared_distances(x, x_sq, &x.index_select(&rows, 0)?)?)?;
        let mut best: Option<(f64, usize)> = None;
        for t in 0..trials {
            let potential: f64 = (0..n)
                .map(|i| closest[i].min(distances[i * trials + t]))
                .sum();
            if best.is_none_or(|(p, _)| potential < p) {
                best = Some((potential, t));
            }
        }
        let t = best.map(|(_, t)| t).unwrap_or(0);
        chosen.push(candidates[t]);
        for (i, c) in closest.iter_mut().enumerate() {
            *c = c.min(distances[i * trials + t]);
        }
    }
    let rows = Tensor::new(
        chosen.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        x.device(),
    )?;
    let mut centers = x.index_select(&rows, 0)?;
    let ids = Tensor::arange(0u32, k as u32, x.device())?.unsqueeze(0)?;
    let mut previous: Option<Vec<u32>> = None;
    let mut shift = f64::INFINITY;
    let mut steps = 0;
    loop {
        let distances = squared_distances(x, x_sq, &centers)?;
        let labels = distances.argmin(1)?;
        let host = labels.to_vec1::<u32>()?;
        if previous.as_ref() == Some(&host) || shift <= tolerance || steps == max_steps {
            let inertia = linalg::read_scalar(&distances.min(1)?.sum_all()?)?;
            return Ok(KMeans {
                labels,
                inertia,
                steps,
            });
        }
        let one_hot = labels
            .unsqueeze(1)?
            .broadcast_eq(&ids)?
            .to_dtype(x.dtype())?;
        let counts = one_hot.sum(0)?; // (K)
        let sums = one_hot.t()?.matmul(x)?; // (K, d)
        let occupied = counts.gt(0.0)?.to_dtype(x.dtype())?.unsqueeze(1)?;
        let means = sums.broadcast_div(&counts.clamp(1.0, f64::INFINITY)?.unsqueeze(1)?)?;
        // An empty cluster keeps its center.
        let moved = (means.broadcast_mul(&occupied)?
            + centers.broadcast_mul(&occupied.affine(-1.0, 1.0)?)?)?;
        shift = linalg::read_scalar(&(&moved - &centers)?.sqr()?.sum_all()?)?;
        centers = moved;
        previous = Some(host);
        steps += 1;
    }
}
