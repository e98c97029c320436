//! The data-driven start: k-means++ seeding and Lloyd's iterations on the centered samples,
//! as scikit-learn's `GaussianMixture(init_params='kmeans')` (its default) starts: a `KMeans`
//! run, whose seeding is greedy k-means++, and the hard clusters it ends with. (scikit-learn's
//! `init_params='k-means++'` is another start: the k-means++ seeds alone, with no Lloyd
//! iterations.) Unlike scikit-learn, which runs `KMeans` once per start, the best of
//! `kmeans_inits` runs by inertia is kept.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use crate::error::{check_device, check_dtype, GaussError, Result};
use crate::linalg::{self, host};

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

/// `x` as (N, d), checked before any work: on the mixture's device, of its dtype, finite, at
/// least `min_rows` rows.
pub(super) fn checked_samples(
    x: &Tensor,
    d: usize,
    dtype: DType,
    device: &Device,
    min_rows: usize,
) -> Result<Samples> {
    check_device("samples x", x, device, "the mixture")?;
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
/// candidates per center), then [`lloyd`]'s iterations.
pub(super) fn kmeans(
    samples: &Samples,
    k: usize,
    max_steps: usize,
    rng: &mut StdRng,
) -> Result<KMeans> {
    let (x, x_sq) = (&samples.centered, &samples.centered_norm_sq);
    let n = x.dim(0)?;
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
            return Err(GaussError::data("samples x", {
                let distinct = chosen.len();
                let plural = if distinct == 1 { "" } else { "s" };
                format!(
                        "holds only {distinct} distinct sample{plural} (to a relative 1e-6), fewer than the {k} components; fit at most {distinct} component{plural}"
                    )
            }));
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
    Ok(lloyd(samples, x.index_select(&rows, 0)?, max_steps)?.0)
}

/// Lloyd's iterations from `centers` (K, d, in the centered coordinates of
/// `samples.centered`), as scikit-learn's `KMeans(algorithm='lloyd')`: until the labels stop
/// changing, the centers move by less than its tolerance (squared shift at most 1e-4 times the
/// mean per-feature variance), or after `max_steps` updates. A cluster
/// that an assignment leaves empty is relocated as scikit-learn does (see
/// [`relocated_centers`]). Returns the run and its final centers (K, d).
fn lloyd(samples: &Samples, mut centers: Tensor, max_steps: usize) -> Result<(KMeans, Tensor)> {
    let (x, x_sq) = (&samples.centered, &samples.centered_norm_sq);
    let (n, d) = x.dims2()?;
    let k = centers.dim(0)?;
    let tolerance = 1e-4 * linalg::read_scalar(&samples.centered_sq.sum_all()?)? / (n * d) as f64;
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
            let run = KMeans {
                labels,
                inertia,
                steps,
            };
            return Ok((run, centers));
        }
        let mut counts = vec![0usize; k];
        for &label in &host {
            counts[label as usize] += 1;
        }
        let one_hot = labels
            .unsqueeze(1)?
            .broadcast_eq(&ids)?
            .to_dtype(x.dtype())?;
        let sums = one_hot.t()?.matmul(x)?; // (K, d)
        let moved = if counts.contains(&0) {
            relocated_centers(x, &centers, &labels, &host, &sums, counts)?
        } else {
            sums.broadcast_div(&one_hot.sum(0)?.unsqueeze(1)?)?
        };
        shift = linalg::read_scalar(&(&moved - &centers)?.sqr()?.sum_all()?)?;
        centers = moved;
        previous = Some(host);
        steps += 1;
    }
}

/// The new centers of a Lloyd step that left clusters empty, by scikit-learn's rule
/// (`_relocate_empty_clusters_dense` in `sklearn/cluster/_k_means_common.pyx`): the samples
/// farthest from the centers they were assigned to (`old`, squared distances computed
/// directly, `|x − c|²`) become the centers of the empty clusters, the farthest to the empty
/// cluster of lowest index, and leave their old clusters' sums and counts. The other clusters
/// take the mean of what they hold. (With several empty clusters scikit-learn pairs them in
/// `np.argpartition`'s order, which numpy does not promise to be sorted; farthest first is
/// what it gave in the test below.)
///
/// `labels` (N, and `host_labels` on the host) assign the rows of `x` (N, d) to `old` (K, d);
/// `sums` (K, d) and `counts` (K) are the clusters' sums and sizes under them.
///
/// One deliberate difference, in corner cases: a center that still holds nothing (every
/// sample exactly on its center, so nothing to relocate; or a cluster whose every sample was
/// taken for an empty one) stays where it was, where scikit-learn 1.9 moves it onto the
/// largest cluster's.
fn relocated_centers(
    x: &Tensor,
    old: &Tensor,
    labels: &Tensor,
    host_labels: &[u32],
    sums: &Tensor,
    mut counts: Vec<usize>,
) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let k = counts.len();
    let empty: Vec<usize> = (0..k).filter(|&j| counts[j] == 0).collect();
    let distances = host_values(&(x - old.index_select(labels, 0)?)?.sqr()?.sum(1)?)?;
    let mut sums = host_values(sums)?;
    let farthest = distances.iter().copied().fold(0.0f64, f64::max);
    if farthest > 0.0 {
        // The `empty.len()` farthest samples (ties: the lower index first), farthest first.
        let by_distance =
            |a: &usize, b: &usize| distances[*b].total_cmp(&distances[*a]).then(a.cmp(b));
        let mut order: Vec<usize> = (0..n).collect();
        let count = empty.len().min(n);
        order.select_nth_unstable_by(count - 1, by_distance);
        order.truncate(count);
        order.sort_unstable_by(by_distance);
        let rows = Tensor::new(
            order.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            x.device(),
        )?;
        let points = host_values(&x.index_select(&rows, 0)?)?;
        for ((&cluster, &sample), point) in empty.iter().zip(&order).zip(points.chunks(d)) {
            let from = host_labels[sample] as usize;
            for (c, &v) in point.iter().enumerate() {
                sums[from * d + c] -= v;
                sums[cluster * d + c] = v;
            }
            counts[from] -= 1;
            counts[cluster] = 1;
        }
    }
    let old_values = host_values(old)?;
    let centers: Vec<f64> = (0..k * d)
        .map(|i| match counts[i / d] {
            0 => old_values[i],
            count => sums[i] / count as f64,
        })
        .collect();
    host::from_host(centers, &[k, d], x.dtype(), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Twelve samples in three groups of four, around (0, 0), (10.5, 0) and (5, 10).
    const X: [[f64; 2]; 12] = [
        [0.0, 0.2],
        [1.1, -0.3],
        [0.4, 1.3],
        [-0.7, 0.5],
        [9.6, 0.1],
        [10.8, -0.4],
        [10.2, 1.2],
        [11.5, 0.6],
        [4.3, 9.7],
        [5.9, 10.4],
        [5.2, 11.8],
        [4.6, 8.9],
    ];

    /// Lloyd's iterations on [`X`] from `init` (in the samples' coordinates): the final
    /// centers (in them too, row-major), labels and inertia.
    fn lloyd_from(init: &[[f64; 2]]) -> Result<(Vec<f64>, Vec<u32>, f64)> {
        let device = Device::Cpu;
        let x = Tensor::from_vec(X.concat(), (X.len(), 2), &device)?;
        let samples = checked_samples(&x, 2, DType::F64, &device, init.len())?;
        let init = Tensor::from_vec(init.concat(), (init.len(), 2), &device)?
            .broadcast_sub(&samples.offset)?;
        let (run, centers) = lloyd(&samples, init, 300)?;
        let centers = host_values(&centers.broadcast_add(&samples.offset)?)?;
        Ok((centers, run.labels.to_vec1::<u32>()?, run.inertia))
    }

    fn assert_close(got: &[f64], expected: &[f64], what: &str) {
        assert_eq!(got.len(), expected.len(), "{what}");
        for (g, e) in got.iter().zip(expected) {
            assert!(
                (g - e).abs() <= 1e-12 * e.abs().max(1.0),
                "{what}: {got:?} vs {expected:?}"
            );
        }
    }

    /// Clusters that an assignment leaves empty are relocated as scikit-learn's Lloyd
    /// relocates them (the samples farthest from their centers become their centers), not
    /// kept where they were. The expected values are scikit-learn 1.9.1's (numpy 2.4.6):
    ///
    /// ```python
    /// import numpy as np
    /// from sklearn.cluster import KMeans
    /// x = np.array([[0.0, 0.2], [1.1, -0.3], [0.4, 1.3], [-0.7, 0.5],
    ///               [9.6, 0.1], [10.8, -0.4], [10.2, 1.2], [11.5, 0.6],
    ///               [4.3, 9.7], [5.9, 10.4], [5.2, 11.8], [4.6, 8.9]])
    /// for init in [[[0.5, 0.5], [5.0, 0.5], [100.0, 100.0]],
    ///              [[5.0, 0.5], [100.0, 100.0], [-100.0, 50.0]]]:
    ///     km = KMeans(3, init=np.array(init), n_init=1, algorithm="lloyd").fit(x)
    ///     print(repr(km.cluster_centers_), km.labels_, repr(km.inertia_))
    /// ```
    #[test]
    fn empty_clusters_are_relocated_as_scikit_learn_does() -> Result<()> {
        // One empty cluster: (100, 100) holds nothing at first; the sample farthest from
        // its center, (5.2, 11.8) (from (5, 0.5)), takes it, and the three groups come out.
        let (centers, labels, inertia) = lloyd_from(&[[0.5, 0.5], [5.0, 0.5], [100.0, 100.0]])?;
        assert_close(
            &centers,
            &[
                0.20000000000000018,
                0.42500000000000027,
                10.525,
                0.375,
                5.0,
                10.200000000000001,
            ],
            "centers (one empty)",
        );
        assert_eq!(labels, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_close(&[inertia], &[12.482500000000003], "inertia (one empty)");

        // Two empty clusters: the farthest sample, (5.2, 11.8), goes to cluster 1 (the
        // empty one of lower index) and the next, (5.9, 10.4), to cluster 2.
        let (centers, labels, inertia) = lloyd_from(&[[5.0, 0.5], [100.0, 100.0], [-100.0, 50.0]])?;
        assert_close(
            &centers,
            &[
                5.3625,
                0.40000000000000036,
                5.2,
                11.8,
                4.933333333333334,
                9.666666666666666,
            ],
            "centers (two empty)",
        );
        assert_eq!(labels, [0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 1, 2]);
        assert_close(&[inertia], &[222.23208333333332], "inertia (two empty)");
        Ok(())
    }
}
