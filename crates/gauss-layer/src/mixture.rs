//! Gaussian mixtures: a Gaussian-only [`GaussLayer`] (one neuron per component) plus mixing
//! logits, `p(x) = Σ_k softmax(logits)_k · N(x | c_k, P_k⁻¹)`.
//!
//! [`GaussianMixture::fit`] fits it to data the way scikit-learn's `GaussianMixture` does, so
//! it reaches the same mean log-likelihood (its `score`):
//! 1. **k-means++ on the data** (the greedy variant scikit-learn uses, best of a few seedings
//!    by inertia), then Lloyd's iterations; the hard clusters give the first M-step;
//! 2. **EM** until the mean log-likelihood changes by less than `tol` per iteration. The
//!    M-step computes each component's weighted mean and covariance (plus `reg_covar` on the
//!    diagonal), projects the covariance onto the parameterization's family (its diagonal for
//!    diag, its mean variance for sphere, the matrix itself otherwise) and writes it into the
//!    layer through [`Precision::from_precision_matrix`]. For cholesky, direct, expm, diag and
//!    sphere that is the exact maximizer, which is why EM rather than gradient descent: each
//!    step is closed form, monotone, and free of learning rates; a start from the data avoids
//!    the stalls of a cold gradient start.
//!    With a width floor σ the family is {Σ : Σ ⪰ σ² I}; raising the covariance's eigenvalues
//!    below σ² to σ² is that family's exact maximizer too.
//! 3. **Gradient refinement** (optional; automatic for a parameterization not listed above,
//!    whose `from_precision_matrix` may only approximate the M-step's covariance): AdamW on
//!    the mean mixture NLL through the layer's own parameterization.
//!
//! Every update is written in place into the layer's and the logits' tensors, so a mixture
//! built through a `VarBuilder` over a `VarMap` ([`gaussian_mixture`]) stays a normal trainable
//! layer: `varmap.all_vars()` holds the fitted `center`, precision tensor and `mixture_logits`
//! (the name `gauss_losses::mixture_logits` uses, so `gauss_losses::mixture_nll` of the layer
//! and logits is the mixture's NLL), ready for further gradient training or `varmap.save`.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use gauss_layer::{gaussian_mixture, MixtureFitOptions};
//! use gauss_layer::GaussLayerConfig;
//! let device = Device::Cpu;
//! // Two well-separated blobs in 2-D.
//! let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
//! let truth = gauss_layer::GaussLayer::from_covariance(
//!     &Tensor::new(&[[-5.0f64, 0.0], [5.0, 0.0]], &device)?,
//!     &Tensor::eye(2, DType::F64, &device)?.unsqueeze(0)?.repeat((2, 1, 1))?,
//!     GaussLayerConfig::default(),
//! )?;
//! let x = truth.sample(200, &mut rng)?.reshape((400, 2))?; // (n, Z, d) → (n·Z, d)
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F64, &device);
//! let mixture = gaussian_mixture(2, 2, GaussLayerConfig::default(), vb)?;
//! let fit = mixture.fit(&x, &MixtureFitOptions::default())?;
//! assert!(fit.converged);
//! let weights = mixture.weights()?.to_vec1::<f64>()?;
//! assert!((weights[0] - 0.5).abs() < 1e-9); // the two blobs hold 200 points each
//! // log p(x) per sample; its mean is `fit.mean_log_likelihood`.
//! let mean = mixture.log_prob(&x)?.mean_all()?.to_scalar::<f64>()?;
//! assert!((mean - fit.mean_log_likelihood).abs() < 1e-12);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Init, Optimizer, ParamsAdamW, VarBuilder};
use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use crate::config::{GaussLayerConfig, Parameterization};
use crate::density::{self, CovarianceRoot};
use crate::error::{check_dtype, GaussError, Result};
use crate::layer::{gauss_layer, GaussLayer};
use crate::linalg::{self, host};
use crate::precision::Precision;
use crate::repair;

/// The name of the mixing logits in a `VarBuilder` (as `gauss_losses::mixture_logits`).
pub const MIXTURE_LOGITS_NAME: &str = "mixture_logits";

/// A mixture of the normals of a Gaussian-only layer's neurons, weighted by
/// `softmax(logits)`.
#[derive(Clone, Debug)]
pub struct GaussianMixture {
    layer: GaussLayer,
    logits: Tensor,
}

/// Creates (or loads) a mixture of `components` normals over `in_features` dims through a
/// `VarBuilder`: the Gaussian-only layer's tensors (`center`, the precision tensor) and
/// `mixture_logits` (K, zero: equal weights) under the builder's prefix.
///
/// The layer is Gaussian-only whatever `config.gaussian_only` says. Fit it with
/// [`GaussianMixture::fit`] (which starts from the data, so the initial values do not matter).
///
/// # Errors
/// Zero sizes or an invalid config; tensors of the wrong shape in the builder.
pub fn gaussian_mixture(
    in_features: usize,
    components: usize,
    config: GaussLayerConfig,
    vb: VarBuilder,
) -> Result<GaussianMixture> {
    let config = GaussLayerConfig {
        gaussian_only: true,
        ..config
    };
    let layer = gauss_layer(in_features, components, config, vb.clone())?;
    let logits = vb.get_with_hints(components, MIXTURE_LOGITS_NAME, Init::Const(0.0))?;
    GaussianMixture::new(layer, logits)
}

/// Settings of [`GaussianMixture::fit`]; the defaults follow scikit-learn's
/// `GaussianMixture` where it has the same setting.
#[derive(Clone, Debug, PartialEq)]
pub struct MixtureFitOptions {
    /// Most EM iterations per start. Default 1000 (scikit-learn: 100).
    pub max_em_steps: usize,
    /// EM stops once the mean log-likelihood (nats per sample) changes by less than this from
    /// one iteration to the next. Default 1e-6 (scikit-learn: 1e-3, which stops earlier).
    pub tol: f64,
    /// Added to the diagonal of every covariance in each M-step, so that no component
    /// collapses onto a few points. Default 1e-6 (scikit-learn's `reg_covar`).
    pub reg_covar: f64,
    /// Independent starts (k-means, then EM); the one with the highest log-likelihood is
    /// kept. Default 1 (scikit-learn's `n_init`).
    pub n_init: usize,
    /// k-means++ seedings per start; the k-means run with the lowest inertia is kept.
    /// Default 3.
    pub kmeans_inits: usize,
    /// Most Lloyd iterations per k-means run. Default 300 (scikit-learn's `KMeans`).
    pub max_kmeans_steps: usize,
    /// AdamW steps on the mean mixture NLL after EM. `None` (the default): none when the
    /// M-step is the exact maximizer for the layer's family (cholesky, direct, expm, diag,
    /// sphere, with or without a width floor), 300 otherwise.
    pub refine_steps: Option<usize>,
    /// Peak learning rate of the refinement (cosine decay to 1/1000 of it). Default 1e-3.
    pub refine_lr: f64,
    /// Seed of the k-means++ draws. Default 0.
    pub seed: u64,
}

impl Default for MixtureFitOptions {
    fn default() -> Self {
        Self {
            max_em_steps: 1000,
            tol: 1e-6,
            reg_covar: 1e-6,
            n_init: 1,
            kmeans_inits: 3,
            max_kmeans_steps: 300,
            refine_steps: None,
            refine_lr: 1e-3,
            seed: 0,
        }
    }
}

impl MixtureFitOptions {
    fn validate(&self) -> Result<()> {
        if !(self.tol.is_finite() && self.tol > 0.0) {
            return Err(GaussError::config(
                "tol",
                format!("must be finite and > 0, got {}", self.tol),
            ));
        }
        if !(self.reg_covar.is_finite() && self.reg_covar >= 0.0) {
            return Err(GaussError::config(
                "reg_covar",
                format!("must be finite and >= 0, got {}", self.reg_covar),
            ));
        }
        if !(self.refine_lr.is_finite() && self.refine_lr > 0.0) {
            return Err(GaussError::config(
                "refine_lr",
                format!("must be finite and > 0, got {}", self.refine_lr),
            ));
        }
        if self.n_init == 0 || self.kmeans_inits == 0 {
            return Err(GaussError::config(
                "n_init",
                "`n_init` and `kmeans_inits` must be >= 1",
            ));
        }
        Ok(())
    }
}

/// How [`GaussianMixture::fit`] went.
#[derive(Clone, Debug, PartialEq)]
pub struct MixtureFit {
    /// Mean log-likelihood of the data under the fitted mixture, nats per sample
    /// (scikit-learn's `score`).
    pub mean_log_likelihood: f64,
    /// Lloyd iterations of the kept start's k-means.
    pub kmeans_steps: usize,
    /// EM iterations (M-steps) of the kept start.
    pub em_steps: usize,
    /// Gradient refinement steps taken.
    pub refine_steps: usize,
    /// Whether EM met `tol` before `max_em_steps`.
    pub converged: bool,
}

/// Whether the M-step's covariance, projected onto the family (see [`project_covariance`]),
/// is the exact maximizer: true for the parameterizations whose `from_precision_matrix`
/// holds every projected covariance exactly (lowrank only at full rank, `rank >= d`).
fn m_step_is_exact(config: &GaussLayerConfig, dim: usize) -> bool {
    match config.parameterization {
        Parameterization::Cholesky
        | Parameterization::Direct
        | Parameterization::Expm
        | Parameterization::Diag
        | Parameterization::Sphere => true,
        Parameterization::LowRank { rank } => rank >= dim,
    }
}

/// The covariance family's M-step statistic: diag and sphere need only per-dimension
/// variances; every other parameterization takes the full covariance.
fn needs_full_covariance(parameterization: Parameterization) -> bool {
    !matches!(
        parameterization,
        Parameterization::Diag | Parameterization::Sphere
    )
}

/// The samples of a fit with what every step reuses.
struct Samples {
    /// (N, d).
    x: Tensor,
    /// `x` minus its column means (N, d): k-means works on it, and diag/sphere M-steps take
    /// second moments from it (centering keeps them from cancelling).
    centered: Tensor,
    /// `centered²` (N, d).
    centered_sq: Tensor,
    /// `‖centered‖²` per row (N).
    centered_norm_sq: Tensor,
    /// The column means (1, d).
    offset: Tensor,
}

impl Samples {
    fn new(x: Tensor) -> Result<Self> {
        let offset = x.mean_keepdim(0)?;
        let centered = x.broadcast_sub(&offset)?;
        let centered_sq = centered.sqr()?;
        let centered_norm_sq = centered_sq.sum(1)?;
        Ok(Self {
            x,
            centered,
            centered_sq,
            centered_norm_sq,
            offset,
        })
    }
}

/// `x` as (N, d), checked: dtype of the mixture, finite, at least `min_rows` rows.
fn checked_samples(x: &Tensor, d: usize, dtype: DType, min_rows: usize) -> Result<Samples> {
    let (flat, _) = density::flatten_leading(x, d, "samples x")?;
    check_dtype("samples x", &flat, dtype, "the mixture")?;
    let n = flat.dims()[0];
    if n < min_rows {
        return Err(GaussError::shape(
            "samples x",
            format!("(N, {d}) with N >= {min_rows} (at least one sample per component)"),
            x.dims(),
        ));
    }
    let energy = linalg::read_scalar(&flat.sqr()?.sum_all()?)?;
    if !energy.is_finite() {
        return Err(GaussError::config(
            "samples x",
            "holds non-finite values (or values whose squares overflow)",
        ));
    }
    Samples::new(flat)
}

/// Host f64 values of a tensor.
fn host_values(t: &Tensor) -> Result<Vec<f64>> {
    // Moved first and cast on the host: Metal has no f64.
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

/// The result of one k-means run.
struct KMeans {
    labels: Tensor,
    inertia: f64,
    steps: usize,
}

/// Squared distances of every row of `x` (N, d) to every row of `centers` (K, d), by the
/// expansion `|x|² − 2 x·c + |c|²` (clamped at 0). `x_sq`: (N).
fn squared_distances(x: &Tensor, x_sq: &Tensor, centers: &Tensor) -> Result<Tensor> {
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
fn kmeans(samples: &Samples, k: usize, max_steps: usize, rng: &mut StdRng) -> Result<KMeans> {
    let (x, x_sq) = (&samples.centered, &samples.centered_norm_sq);
    let (n, d) = x.dims2()?;
    let tolerance = 1e-4 * linalg::read_scalar(&samples.centered_sq.sum_all()?)? / (n * d) as f64;
    let trials = 2 + (k as f64).ln().floor() as usize;
    let first = rng.random_range(0..n);
    let mut chosen = vec![first];
    let row = |i: usize| x.narrow(0, i, 1);
    let mut closest = host_values(&squared_distances(x, x_sq, &row(first)?)?)?;
    while chosen.len() < k {
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

/// The mixture's tensors, copied (for keeping the best of several starts).
struct Snapshot {
    center: Tensor,
    raw: Tensor,
    logits: Tensor,
}

impl GaussianMixture {
    /// A mixture from a Gaussian-only layer and its logits.
    ///
    /// # Shapes
    /// `logits`: (Z), Z the layer's neurons.
    ///
    /// # Errors
    /// A layer with a linear part; logits of another shape, dtype or device.
    pub fn new(layer: GaussLayer, logits: Tensor) -> Result<Self> {
        if !layer.config().gaussian_only {
            return Err(GaussError::config(
                "gaussian_only",
                "a mixture's components are the neurons of a Gaussian-only layer, but this layer has a linear part",
            ));
        }
        let k = layer.out_features();
        if logits.dims() != [k] {
            return Err(GaussError::shape(
                "mixture logits",
                format!("({k}), one per neuron"),
                logits.dims(),
            ));
        }
        check_dtype(
            "mixture logits",
            &logits,
            layer.center().dtype(),
            "the layer's center",
        )?;
        if !logits.device().same_device(layer.center().device()) {
            return Err(GaussError::config(
                "device",
                "the mixture logits are on another device than the layer",
            ));
        }
        Ok(Self { layer, logits })
    }

    /// The Gaussian-only layer holding the components (neuron `k` is component `k`).
    pub fn layer(&self) -> &GaussLayer {
        &self.layer
    }

    /// The mixing logits (K); the weights are their softmax.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// Number of components K.
    pub fn num_components(&self) -> usize {
        self.layer.out_features()
    }

    /// Dimension d of the samples.
    pub fn dim(&self) -> usize {
        self.layer.in_features()
    }

    /// `log softmax(logits)`.
    ///
    /// # Shapes
    /// → (K)
    pub fn log_weights(&self) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(&self.logits, 0)?)
    }

    /// The mixing weights `softmax(logits)`.
    ///
    /// # Shapes
    /// → (K)
    pub fn weights(&self) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax(&self.logits, 0)?)
    }

    /// The component means (the layer's centers).
    ///
    /// # Shapes
    /// → (K, d)
    pub fn means(&self) -> &Tensor {
        self.layer.center()
    }

    /// The component covariances `P_k⁻¹`.
    ///
    /// # Shapes
    /// → (K, d, d)
    pub fn covariances(&self) -> Result<Tensor> {
        self.layer.precision().covariance_matrix()
    }

    /// `log π_k + log N(x | c_k, P_k⁻¹)` per component.
    ///
    /// # Shapes
    /// `x`: (…, d) → (…, K)
    ///
    /// # Errors
    /// As [`GaussLayer::log_prob`].
    pub fn joint_log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let log_weights = self.log_weights()?;
        Ok(self.layer.log_prob(x)?.broadcast_add(&log_weights)?)
    }

    /// Log-density of the mixture, `logsumexp_k(log π_k + log N(x | c_k, P_k⁻¹))`, in the
    /// log domain throughout (far-away samples give large finite values, not `log 0`).
    ///
    /// # Shapes
    /// `x`: (…, d) → (…)
    ///
    /// # Errors
    /// As [`GaussLayer::log_prob`].
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.joint_log_prob(x)?.log_sum_exp(D::Minus1)?)
    }

    /// Posterior probability of each component given `x` (rows sum to 1).
    ///
    /// # Shapes
    /// `x`: (…, d) → (…, K)
    ///
    /// # Errors
    /// As [`GaussLayer::log_prob`].
    pub fn responsibilities(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax_last_dim(&self.joint_log_prob(x)?)?)
    }

    /// `n` independent draws from the mixture, each with the component it came from. The
    /// components and the standard normal noise come from `rng` on the host (the same draws
    /// on every device).
    ///
    /// # Shapes
    /// → (n, d)
    ///
    /// # Errors
    /// A `direct` precision that is not positive definite.
    pub fn sample_with_components<R: Rng + ?Sized>(
        &self,
        n: usize,
        rng: &mut R,
    ) -> Result<(Tensor, Vec<usize>)> {
        let (k, d) = (self.num_components(), self.dim());
        let center = self.layer.center();
        let (dtype, device) = (center.dtype(), center.device());
        let weights = host_values(&self.weights()?)?;
        let total: f64 = weights.iter().sum();
        let components: Vec<usize> = (0..n)
            .map(|_| {
                let mut target = rng.random::<f64>() * total;
                for (i, &w) in weights.iter().enumerate() {
                    if target < w {
                        return i;
                    }
                    target -= w;
                }
                k - 1
            })
            .collect();
        let noise: Vec<f64> = (0..n * d).map(|_| rng.sample(StandardNormal)).collect();
        if n == 0 {
            return Ok((Tensor::zeros((0, d), dtype, device)?, components));
        }
        // Group the draws by component, transform each group, then restore the draw order.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| components[i]);
        let sorted: Vec<f64> = order
            .iter()
            .flat_map(|&i| noise[i * d..(i + 1) * d].iter().copied())
            .collect();
        let sorted = host::from_host(sorted, &[n, d], dtype, device)?;
        let root = self.layer.covariance_root()?;
        let mut groups = Vec::with_capacity(k);
        let mut start = 0;
        for component in 0..k {
            let count = components.iter().filter(|&&c| c == component).count();
            if count == 0 {
                continue;
            }
            let eps = sorted.narrow(0, start, count)?;
            let spread = match &root {
                CovarianceRoot::Diagonal(std) => {
                    eps.broadcast_mul(&std.narrow(0, component, 1)?)?
                }
                CovarianceRoot::Full(a) => eps.matmul(&a.get(component)?.t()?)?,
            };
            groups.push(spread.broadcast_add(&center.narrow(0, component, 1)?)?);
            start += count;
        }
        let grouped = Tensor::cat(&groups, 0)?;
        let mut position = vec![0u32; n];
        for (j, &i) in order.iter().enumerate() {
            position[i] = j as u32;
        }
        let position = Tensor::new(position, device)?;
        Ok((grouped.index_select(&position, 0)?, components))
    }

    /// `n` independent draws from the mixture (see
    /// [`GaussianMixture::sample_with_components`]).
    ///
    /// # Shapes
    /// → (n, d)
    ///
    /// # Errors
    /// A `direct` precision that is not positive definite.
    pub fn sample<R: Rng + ?Sized>(&self, n: usize, rng: &mut R) -> Result<Tensor> {
        Ok(self.sample_with_components(n, rng)?.0)
    }

    /// Writes weights, means and covariances into the mixture's tensors in place (a `VarMap`
    /// holding them sees the new values). The covariances must be representable by the
    /// layer's parameterization (diagonal for diag, multiples of the identity for sphere).
    ///
    /// # Shapes
    /// `weights`: (K), positive (normalized here); `means`: (K, d); `covariances`: (K, d, d).
    ///
    /// # Errors
    /// Wrong shapes; non-positive weights; covariances that are not symmetric positive
    /// definite or that the config cannot hold (the errors of
    /// [`GaussLayer::from_covariance`]).
    pub fn set_parameters(
        &self,
        weights: &Tensor,
        means: &Tensor,
        covariances: &Tensor,
    ) -> Result<()> {
        let (k, d) = (self.num_components(), self.dim());
        if weights.dims() != [k] {
            return Err(GaussError::shape(
                "weights",
                format!("({k})"),
                weights.dims(),
            ));
        }
        let weights = host_values(weights)?;
        if weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
            return Err(GaussError::config(
                "weights",
                format!("must be finite and > 0, got {weights:?}"),
            ));
        }
        let total: f64 = weights.iter().sum();
        let log_weights: Vec<f64> = weights.iter().map(|w| (w / total).ln()).collect();
        let fresh = GaussLayer::from_covariance(means, covariances, self.layer.config().clone())?;
        if fresh.in_features() != d || fresh.out_features() != k {
            return Err(GaussError::shape(
                "means",
                format!("({k}, {d})"),
                means.dims(),
            ));
        }
        self.write(&log_weights, fresh.center(), fresh.precision().raw())
    }

    /// Writes log-weights, means and the raw precision tensor into the mixture's tensors.
    fn write(&self, log_weights: &[f64], means: &Tensor, raw: &Tensor) -> Result<()> {
        let center = self.layer.center();
        let (dtype, device) = (center.dtype(), center.device());
        let logits = host::from_host(log_weights.to_vec(), &[log_weights.len()], dtype, device)?;
        self.logits.slice_set(&logits, 0, 0)?;
        center.slice_set(
            &means.to_dtype(dtype)?.to_device(device)?.contiguous()?,
            0,
            0,
        )?;
        let own_raw = self.layer.precision().raw();
        own_raw.slice_set(&raw.to_dtype(dtype)?.to_device(device)?.contiguous()?, 0, 0)?;
        Ok(())
    }

    /// E-step: the mean log-likelihood and the responsibilities (N, K).
    fn e_step(&self, x: &Tensor) -> Result<(f64, Tensor)> {
        let joint = self.joint_log_prob(x)?;
        let log_norm = joint.log_sum_exp(1)?; // (N)
        let mean = linalg::read_scalar(&log_norm.mean_all()?)?;
        let resp = joint.broadcast_sub(&log_norm.unsqueeze(1)?)?.exp()?;
        Ok((mean, resp))
    }

    /// M-step from responsibilities `resp` (N, K): weighted means, covariances (with
    /// `reg_covar` on the diagonal, projected onto the family), weights; written in place.
    fn m_step(&self, samples: &Samples, resp: &Tensor, reg_covar: f64) -> Result<()> {
        let x = &samples.x;
        let (n, d) = x.dims2()?;
        let k = self.num_components();
        let config = self.layer.config();
        let eps = match x.dtype() {
            DType::F64 => f64::EPSILON,
            _ => f32::EPSILON as f64,
        };
        let counts = (resp.sum(0)? + 10.0 * eps)?.unsqueeze(1)?; // (K, 1), as scikit-learn
        let resp_t = resp.t()?;
        let means = resp_t.matmul(x)?.broadcast_div(&counts)?; // (K, d)
        let counts_host = host_values(&counts)?;
        let mut covariances: Vec<f64> = Vec::with_capacity(k * d * d);
        if needs_full_covariance(config.parameterization) {
            for (component, count) in counts_host.iter().enumerate() {
                let centered = x.broadcast_sub(&means.narrow(0, component, 1)?)?;
                let weighted = centered.broadcast_mul(&resp.narrow(1, component, 1)?)?;
                let block = host_values(&weighted.t()?.matmul(&centered)?)?;
                let mut cov = Mat::from_fn(d, d, |i, j| {
                    let v = 0.5 * (block[i * d + j] + block[j * d + i]) / count;
                    if i == j {
                        v + reg_covar
                    } else {
                        v
                    }
                });
                project_covariance(&mut cov, config)?;
                covariances.extend((0..d * d).map(|ij| cov[(ij / d, ij % d)]));
            }
        } else {
            // E_k[(x − μ_k)²] = E_k[x̃²] − (μ_k − m)² with x̃ = x − m, m the data mean: two
            // matmuls for all components, and no cancellation beyond the spread of the means.
            let second = resp_t
                .matmul(&samples.centered_sq)?
                .broadcast_div(&counts)?;
            let shifted = means.broadcast_sub(&samples.offset)?;
            let variances = host_values(&(second - shifted.sqr()?)?)?;
            for row in variances.chunks(d) {
                let mut cov = Mat::from_fn(d, d, |i, j| {
                    if i == j {
                        row[i].max(0.0) + reg_covar
                    } else {
                        0.0
                    }
                });
                project_covariance(&mut cov, config)?;
                covariances.extend((0..d * d).map(|ij| cov[(ij / d, ij % d)]));
            }
        }
        let log_weights: Vec<f64> = counts_host.iter().map(|c| (c / n as f64).ln()).collect();
        let raw = raw_from_covariances(&covariances, k, d, config)?;
        self.write(&log_weights, &means, &raw)
    }

    /// k-means++ on the data, then the M-step of the hard clusters; returns the Lloyd
    /// iterations of the best of `kmeans_inits` seedings.
    fn init_from_data(
        &self,
        samples: &Samples,
        options: &MixtureFitOptions,
        rng: &mut StdRng,
    ) -> Result<usize> {
        let k = self.num_components();
        let mut best: Option<KMeans> = None;
        for _ in 0..options.kmeans_inits {
            let run = kmeans(samples, k, options.max_kmeans_steps, rng)?;
            if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
                best = Some(run);
            }
        }
        let Some(best) = best else {
            return Ok(0);
        };
        let x = &samples.x;
        let ids = Tensor::arange(0u32, k as u32, x.device())?.unsqueeze(0)?;
        let one_hot = best
            .labels
            .unsqueeze(1)?
            .broadcast_eq(&ids)?
            .to_dtype(x.dtype())?;
        self.m_step(samples, &one_hot, options.reg_covar)?;
        Ok(best.steps)
    }

    /// EM from the current parameters until the mean log-likelihood changes by less than
    /// `tol`; returns it, the M-steps taken and whether `tol` was met.
    fn em(&self, samples: &Samples, options: &MixtureFitOptions) -> Result<(f64, usize, bool)> {
        let mut previous = f64::NEG_INFINITY;
        let mut steps = 0;
        loop {
            let (mean, resp) = self.e_step(&samples.x)?;
            if !mean.is_finite() {
                return Err(GaussError::config(
                    "reg_covar",
                    format!("EM reached a non-finite log-likelihood ({mean}) after {steps} steps; raise `reg_covar`"),
                ));
            }
            if (mean - previous).abs() < options.tol {
                return Ok((mean, steps, true));
            }
            if steps == options.max_em_steps {
                return Ok((mean, steps, false));
            }
            previous = mean;
            self.m_step(samples, &resp, options.reg_covar)?;
            steps += 1;
        }
    }

    /// The start alone: k-means++ seeding (best of `options.kmeans_inits` by inertia),
    /// Lloyd's iterations, then the M-step of the hard clusters written into the mixture.
    /// Returns the Lloyd iterations.
    ///
    /// # Shapes
    /// `x`: (…, d), at least K samples
    ///
    /// # Errors
    /// Samples of the wrong width or dtype, too few or non-finite; invalid options.
    pub fn init_from_kmeans(&self, x: &Tensor, options: &MixtureFitOptions) -> Result<usize> {
        options.validate()?;
        let samples = checked_samples(x, self.dim(), self.logits.dtype(), self.num_components())?;
        let mut rng = StdRng::seed_from_u64(options.seed);
        self.init_from_data(&samples, options, &mut rng)
    }

    fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            center: self.layer.center().copy()?,
            raw: self.layer.precision().raw().copy()?,
            logits: self.logits.copy()?,
        })
    }

    fn restore(&self, snapshot: &Snapshot) -> Result<()> {
        self.layer.center().slice_set(&snapshot.center, 0, 0)?;
        self.layer
            .precision()
            .raw()
            .slice_set(&snapshot.raw, 0, 0)?;
        self.logits.slice_set(&snapshot.logits, 0, 0)?;
        Ok(())
    }

    /// Fits the mixture to `x` by maximum likelihood: k-means++ start, EM, and (when the
    /// M-step is not exact for the family, or when asked) gradient refinement; see the
    /// module docs. The fitted values are written into the mixture's tensors in place.
    ///
    /// # Shapes
    /// `x`: (…, d), at least K samples
    ///
    /// # Errors
    /// Samples of the wrong width or dtype, too few or non-finite; invalid options; a
    /// covariance the config cannot hold (e.g. variances beyond cholesky's
    /// `factor_diag_floor`, stated in the message); refinement of a mixture whose tensors are
    /// not variables.
    pub fn fit(&self, x: &Tensor, options: &MixtureFitOptions) -> Result<MixtureFit> {
        options.validate()?;
        let samples = checked_samples(x, self.dim(), self.logits.dtype(), self.num_components())?;
        let mut rng = StdRng::seed_from_u64(options.seed);
        let mut best: Option<(MixtureFit, Option<Snapshot>)> = None;
        for start in 0..options.n_init {
            let kmeans_steps = self.init_from_data(&samples, options, &mut rng)?;
            let (mean, em_steps, converged) = self.em(&samples, options)?;
            let fit = MixtureFit {
                mean_log_likelihood: mean,
                kmeans_steps,
                em_steps,
                refine_steps: 0,
                converged,
            };
            let better = best
                .as_ref()
                .is_none_or(|(b, _)| mean > b.mean_log_likelihood);
            if better {
                let snapshot = if start + 1 < options.n_init {
                    Some(self.snapshot()?)
                } else {
                    None
                };
                best = Some((fit, snapshot));
            }
        }
        let Some((mut fit, snapshot)) = best else {
            return Err(GaussError::config("n_init", "must be >= 1"));
        };
        if let Some(snapshot) = snapshot {
            self.restore(&snapshot)?;
        }
        let refine_steps =
            options
                .refine_steps
                .unwrap_or(if m_step_is_exact(self.layer.config(), self.dim()) {
                    0
                } else {
                    300
                });
        if refine_steps > 0 {
            self.refine(&samples.x, refine_steps, options.refine_lr)?;
            fit.refine_steps = refine_steps;
            fit.mean_log_likelihood = self.e_step(&samples.x)?.0;
        }
        Ok(fit)
    }

    /// AdamW on the mean mixture NLL through the layer's parameterization (cosine decay of
    /// the learning rate); a `direct` precision is repaired after every step.
    fn refine(&self, x: &Tensor, steps: usize, lr: f64) -> Result<()> {
        let tensors = [
            ("center", self.layer.center()),
            ("precision", self.layer.precision().raw()),
            (MIXTURE_LOGITS_NAME, &self.logits),
        ];
        let mut vars = Vec::with_capacity(3);
        for (name, tensor) in tensors {
            if !tensor.is_variable() {
                return Err(GaussError::config(
                    "refine_steps",
                    format!(
                        "gradient refinement updates the mixture's variables, but its `{name}` tensor is not one; build the mixture with `gaussian_mixture` through a VarBuilder over a VarMap, or set `refine_steps: Some(0)`"
                    ),
                ));
            }
            vars.push(Var::from_tensor(tensor)?);
        }
        let raw_var = vars[1].clone();
        let params = ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut optimizer = AdamW::new(vars, params)?;
        let floor = lr * 1e-3;
        let direct = self.layer.precision().parameterization() == Parameterization::Direct;
        for step in 0..steps {
            let progress = step as f64 / steps as f64;
            optimizer.set_learning_rate(
                floor + 0.5 * (lr - floor) * (1.0 + (std::f64::consts::PI * progress).cos()),
            );
            let loss = self.log_prob(x)?.mean_all()?.neg()?;
            optimizer.backward_step(&loss)?;
            if direct {
                repair::repair_var_in_place(&raw_var, 1e-12)?;
            }
        }
        Ok(())
    }
}

/// Projects an M-step covariance onto what the config holds, which is the family's exact
/// maximizer of the weighted likelihood: diag keeps the diagonal (already so), sphere the
/// mean variance; a width floor σ holds only covariances whose eigenvalues exceed σ², and
/// raising the smaller ones to σ² (times 1 + 1e-6, so the base precision stays finite) is
/// the maximizer over that set (the weighted likelihood depends on the eigenvalues through
/// `Σ −log λ − c/λ` per eigenvector, each term increasing up to λ = c).
fn project_covariance(cov: &mut Mat<f64>, config: &GaussLayerConfig) -> Result<()> {
    let d = cov.nrows();
    if config.parameterization == Parameterization::Sphere {
        let mean = (0..d).map(|i| cov[(i, i)]).sum::<f64>() / d as f64;
        *cov = Mat::from_fn(d, d, |i, j| if i == j { mean } else { 0.0 });
    }
    let Some(sigma) = config.width_floor else {
        return Ok(());
    };
    let lowest = sigma * sigma * (1.0 + 1e-6);
    let evd = cov.self_adjoint_eigen(Side::Lower).map_err(|e| {
        GaussError::Candle(candle_core::Error::Msg(format!(
            "symmetric eigendecomposition failed: {e:?}"
        )))
    })?;
    let (values, vectors) = (evd.S().column_vector(), evd.U());
    let raised: Vec<f64> = (0..d).map(|i| values[i].max(lowest)).collect();
    *cov = Mat::from_fn(d, d, |i, j| {
        (0..d)
            .map(|m| vectors[(i, m)] * raised[m] * vectors[(j, m)])
            .sum()
    });
    Ok(())
}

/// The raw precision tensor (CPU, f64) holding covariances `values` ((K, d, d) row-major),
/// through [`Precision::from_precision_matrix`]; a failure is explained with the floors.
fn raw_from_covariances(
    values: &[f64],
    k: usize,
    d: usize,
    config: &GaussLayerConfig,
) -> Result<Tensor> {
    let mut precision = Vec::with_capacity(k * d * d);
    for component in 0..k {
        let block = &values[component * d * d..(component + 1) * d * d];
        let cov = Mat::from_fn(d, d, |i, j| block[i * d + j]);
        let inverse = cov
            .llt(Side::Lower)
            .map_err(|_| {
                GaussError::config(
                    "reg_covar",
                    format!("component {component}: the M-step covariance is not positive definite; raise `reg_covar`"),
                )
            })?
            .inverse();
        for i in 0..d {
            for j in 0..d {
                precision.push(0.5 * (inverse[(i, j)] + inverse[(j, i)]));
            }
        }
    }
    let tensor = Tensor::from_vec(precision.clone(), (k, d, d), &Device::Cpu)?;
    // The nearest representable precision where the family is smaller than the M-step's
    // (lowrank below full rank); the gradient refinement takes it from there.
    match Precision::from_precision_matrix_within(&tensor, config, f64::INFINITY) {
        Ok(p) => Ok(p.raw().clone()),
        Err(original) => {
            density::check_precision_blocks(&precision, k, d, config)?;
            Err(original)
        }
    }
}
