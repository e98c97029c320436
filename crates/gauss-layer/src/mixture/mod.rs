//! Gaussian mixtures: a Gaussian-only [`GaussLayer`] (one neuron per component) plus mixing
//! logits, `p(x) = Σ_k softmax(logits)_k · N(x | c_k, P_k⁻¹)`.
//!
//! [`GaussianMixture::fit`] fits it to data the way scikit-learn's `GaussianMixture` does
//! with its default start, `init_params='kmeans'`. EM finds a local maximum, so the mean
//! log-likelihood (its `score`) it reaches depends on the start: it is that of scikit-learn's
//! `init_params='kmeans'`, while another start may end elsewhere (on
//! `make_moons(400, noise=0.08, random_state=0)`, K = 2, full covariances: −1.708982 here and
//! with `'kmeans'`, −1.690346 with `init_params='k-means++'`, `n_init=5`):
//! 1. **k-means on the data**: k-means++ seeding (the greedy variant scikit-learn uses, best
//!    of `kmeans_inits` k-means runs by inertia), then Lloyd's iterations (a cluster left
//!    empty takes the sample farthest from its center, as in scikit-learn); the hard clusters
//!    give the first M-step. This is scikit-learn's `init_params='kmeans'` (a `KMeans` run),
//!    not its `init_params='k-means++'` (the seeds alone, no Lloyd iterations);
//! 2. **EM** until the mean log-likelihood changes by less than `tol` per iteration. The
//!    M-step computes each component's weighted mean and covariance (plus `reg_covar` on the
//!    diagonal), projects the covariance onto the parameterization's family (its diagonal for
//!    diag, its mean variance for sphere, the matrix itself otherwise) and writes it into the
//!    layer through [`crate::Precision::from_precision_matrix`]. For cholesky, direct, expm, diag and
//!    sphere that is the exact maximizer, which is why EM rather than gradient descent: each
//!    step is closed form, monotone, and free of learning rates; a start from the data avoids
//!    the stalls of a cold gradient start.
//!    With a width floor σ the family is {Σ : Σ ⪰ σ² I}; raising the covariance's eigenvalues
//!    below σ² to σ² is that family's exact maximizer too.
//!    lowrank below full rank (`diag(e^θ) + U Uᵀ` precisions, r < d) runs EM twice: first
//!    over its diagonal members (U = 0; this is the diag fit), then over the whole family
//!    with generalized M-steps, a few rounds of the closed-form block ascent of the
//!    lowrank maximum likelihood per step (see `precision/low_rank_fit.rs`), each never
//!    lowering the likelihood: the fit scores at least the diagonal fit, and at most the
//!    full one. `reg_covar` enters the covariance the ascent fits, as for the other forms.
//!    A tied mixture ([`GaussianMixture::with_tied_covariance`], scikit-learn's
//!    `covariance_type='tied'`) pools the components' weighted scatter around their own
//!    means into one covariance, `Σ_k Σ_n r_nk (x_n − μ_k)(x_n − μ_k)ᵀ / N + reg_covar·I`,
//!    projected onto the family as above and written into every component.
//! 3. **Gradient refinement** (optional, `refine_steps`; off by default, since every
//!    M-step above maximizes over the layer's family): AdamW on the mean mixture NLL through
//!    the layer's own parameterization.
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

mod fit;
mod kmeans;
mod scores;

use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};
use rand::Rng;
use rand_distr::StandardNormal;

use crate::config::GaussLayerConfig;
use crate::density::{check_draw_count, CovarianceRoot};
use crate::error::{check_device, check_dtype, GaussError, Result};
use crate::layer::{gauss_layer, GaussLayer};
use crate::linalg::{self, host};

use kmeans::host_values;

/// The name of the mixing logits in a `VarBuilder` (as `gauss_losses::mixture_logits`).
pub const MIXTURE_LOGITS_NAME: &str = "mixture_logits";

/// A mixture of the normals of a Gaussian-only layer's neurons, weighted by
/// `softmax(logits)`.
#[derive(Clone, Debug)]
pub struct GaussianMixture {
    layer: GaussLayer,
    logits: Tensor,
    /// All components share one precision (scikit-learn's `covariance_type='tied'`).
    tied: bool,
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
    /// kept. Default 5 (scikit-learn's is 1): with one start, one of the 18 benchmark mixtures
    /// of `tools/density/mixtures.py` (32-D, 5 overlapping components) stopped in a local
    /// optimum 0.96 nats per sample below scikit-learn's; with 5, none did.
    pub n_init: usize,
    /// k-means runs (k-means++ seeding, then Lloyd's iterations) per start; the run with the
    /// lowest inertia is kept. Default 3 (scikit-learn's `GaussianMixture` runs one).
    pub kmeans_inits: usize,
    /// Most Lloyd iterations per k-means run. Default 300 (scikit-learn's `KMeans`).
    pub max_kmeans_steps: usize,
    /// AdamW steps on the mean mixture NLL after EM. `None` (the default) takes none: EM
    /// maximizes over every layer family (cholesky, direct, expm, diag, sphere, with or
    /// without a width floor; lowrank, which takes no width floor).
    pub refine_steps: Option<usize>,
    /// Peak learning rate of the refinement (cosine decay to 1/1000 of it). Default 1e-3.
    pub refine_lr: f64,
    /// Seed of the k-means++ draws. Default 0.
    pub seed: u64,
    /// Start EM from the mixture's current parameters (scikit-learn's `warm_start`, e.g.
    /// after a previous `fit` on similar data): no k-means and a single start (`n_init` and
    /// `means_init` are not used). Default false.
    pub warm_start: bool,
    /// Initial means (K·d values, row-major): each sample is assigned to its nearest given
    /// mean, the first M-step takes the weights and covariances of those clusters (around
    /// their own means) and keeps the given means, then EM runs (one start; no k-means).
    /// scikit-learn's `means_init` starts the means the same way but takes the weights and
    /// covariances from a `KMeans` run on the data (which does not see `means_init`), so
    /// the two starts, and possibly the optima EM reaches from them, differ. Default `None`
    /// (the k-means start).
    pub means_init: Option<Vec<f64>>,
}

impl Default for MixtureFitOptions {
    fn default() -> Self {
        Self {
            max_em_steps: 1000,
            tol: 1e-6,
            reg_covar: 1e-6,
            n_init: 5,
            kmeans_inits: 3,
            max_kmeans_steps: 300,
            refine_steps: None,
            refine_lr: 1e-3,
            seed: 0,
            warm_start: false,
            means_init: None,
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
        if self.n_init == 0 {
            return Err(GaussError::config("n_init", "must be >= 1, got 0"));
        }
        if self.kmeans_inits == 0 {
            return Err(GaussError::config("kmeans_inits", "must be >= 1, got 0"));
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
    /// Whether EM met `tol` before `max_em_steps` (for lowrank below full rank, in its
    /// second stage, the whole family; see [`GaussianMixture::fit`]).
    pub converged: bool,
}

impl GaussianMixture {
    /// A mixture from a Gaussian-only layer and its logits.
    ///
    /// A logit of −∞ is a component of weight 0 (as torch's `Categorical(logits=…)` takes
    /// it): it is never drawn and adds nothing to the density (`fit` writes finite logits
    /// again). NaN, +∞ (its softmax is ∞/∞) and all logits −∞ (0/0) define no weights.
    ///
    /// # Shapes
    /// `logits`: (Z), Z the layer's neurons.
    ///
    /// # Errors
    /// A layer with a linear part; logits of another shape, dtype or device; logits holding
    /// NaN or +∞, or all −∞ ([`GaussError::Data`], naming the logit).
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
        check_device(
            "mixture logits",
            &logits,
            layer.center().device(),
            "the layer's center",
        )?;
        check_logits(&host_values(&logits)?)?;
        Ok(Self {
            layer,
            logits,
            tied: false,
        })
    }

    /// The same mixture with its components' covariance tied (`true`: one covariance shared
    /// by all components, scikit-learn's `covariance_type='tied'` for the full
    /// parameterizations; with diag, sphere or lowrank the shared covariance stays in that
    /// family) or untied (`false`, the default).
    ///
    /// Tying writes component 0's precision into every component, in place (the mixture's
    /// tensors, and a `VarMap` holding them, see the change): on a fresh mixture about to be
    /// fitted that changes nothing that matters (`fit` starts from the data), and on a tied
    /// mixture loaded back from its tensors (a tied fit stores K equal copies) it changes
    /// nothing at all. Afterwards [`GaussianMixture::fit`] keeps the components tied (the
    /// M-step pools the components' scatter around their own means:
    /// `Σ = Σ_k Σ_n r_nk (x_n − μ_k)(x_n − μ_k)ᵀ / N + reg_covar·I`),
    /// [`GaussianMixture::set_parameters`] accepts only equal covariances, and
    /// [`GaussianMixture::num_parameters`] (so `bic` and `aic`) counts the covariance once.
    ///
    /// # Errors
    /// Candle errors writing the precision tensor (none for a mixture built by
    /// [`gaussian_mixture`] or [`GaussianMixture::new`]).
    pub fn with_tied_covariance(self, tied: bool) -> Result<Self> {
        let mixture = Self { tied, ..self };
        if tied {
            mixture.tie_precisions()?;
        }
        Ok(mixture)
    }

    /// Whether the components share one covariance (see
    /// [`GaussianMixture::with_tied_covariance`]).
    pub fn is_tied(&self) -> bool {
        self.tied
    }

    /// Writes component 0's raw precision into every component.
    fn tie_precisions(&self) -> Result<()> {
        let raw = self.layer.precision().raw();
        if raw.dim(0)? == 1 {
            // One component is tied already (and the broadcast below would be `raw` itself,
            // which `slice_set` refuses as its own source).
            return Ok(());
        }
        let shared = raw
            .narrow(0, 0, 1)?
            .broadcast_as(raw.shape())?
            .contiguous()?;
        raw.slice_set(&shared, 0, 0)?;
        Ok(())
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
    ///
    /// # Errors
    /// Candle errors (none for a mixture built by [`GaussianMixture::new`]).
    pub fn log_weights(&self) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(&self.logits, 0)?)
    }

    /// The mixing weights `softmax(logits)`.
    ///
    /// # Shapes
    /// → (K)
    ///
    /// # Errors
    /// Candle errors (none for a mixture built by [`GaussianMixture::new`]).
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
    ///
    /// # Errors
    /// As [`crate::Precision::covariance_matrix`] (e.g. a `direct` precision that is not
    /// positive definite).
    pub fn covariances(&self) -> Result<Tensor> {
        crate::repair::ensure_positive_definite(self.layer.precision())?;
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
    /// log domain throughout ([`crate::ops::log_sum_exp`]): far-away samples give large
    /// finite values, not `log 0`, while their squared Mahalanobis distances are representable
    /// in the dtype (for unit precisions, f64 to |x| ≈ 1e154, f32 to ≈ 1e19). Beyond that,
    /// and for a sample holding ±∞, every component's log-density is −∞ and so is the
    /// mixture's (as SciPy's `logsumexp`; never NaN), and one such sample makes
    /// [`GaussianMixture::score`] −∞. A sample holding NaN gives NaN.
    ///
    /// # Shapes
    /// `x`: (…, d) → (…)
    ///
    /// # Errors
    /// As [`GaussLayer::log_prob`].
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let joint = self.joint_log_prob(x)?;
        if joint.elem_count() == 0 {
            // No samples (N = 0 somewhere in the leading dimensions): Candle refuses a
            // reduction of an empty tensor, so the (…) result is made here.
            return Ok(Tensor::zeros(
                leading_dims(&joint),
                joint.dtype(),
                joint.device(),
            )?);
        }
        linalg::log_sum_exp(&joint, D::Minus1)
    }

    /// Posterior probability of each component given `x` (rows sum to 1).
    ///
    /// A sample whose log-density is −∞ under every component (see
    /// [`GaussianMixture::log_prob`]: far away, or holding ±∞) has no defined posterior: its
    /// row is NaN, as in scikit-learn's `predict_proba`; so is a row holding NaN. The input
    /// is not checked (a check would read back from the device); check it first where such
    /// rows can occur.
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
    /// → (draws (n, d), components: `n` indices below K on the host)
    ///
    /// # Errors
    /// A `direct` precision that is not positive definite; (field `n`) an `n` whose draws
    /// need more elements than one allocation holds.
    pub fn sample_with_components<R: Rng + ?Sized>(
        &self,
        n: usize,
        rng: &mut R,
    ) -> Result<(Tensor, Vec<usize>)> {
        let (k, d) = (self.num_components(), self.dim());
        check_draw_count(n, d)?;
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
    /// A `direct` precision that is not positive definite; (field `n`) an `n` whose draws
    /// need more elements than one allocation holds.
    pub fn sample<R: Rng + ?Sized>(&self, n: usize, rng: &mut R) -> Result<Tensor> {
        Ok(self.sample_with_components(n, rng)?.0)
    }

    /// Writes weights, means and covariances into the mixture's tensors in place (a `VarMap`
    /// holding them sees the new values). The covariances must be representable by the
    /// layer's parameterization (diagonal for diag, multiples of the identity for sphere),
    /// and equal (to 1e-12 relative) for a tied mixture.
    ///
    /// # Shapes
    /// `weights`: (K), positive (normalized here); `means`: (K, d); `covariances`: (K, d, d).
    ///
    /// # Errors
    /// Wrong shapes; non-positive weights; covariances that are not symmetric positive
    /// definite or that the config cannot hold (the errors of
    /// [`GaussLayer::from_covariance`]); unequal covariances for a tied mixture.
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
        if self.tied {
            check_equal_blocks(&host_values(covariances)?, k)?;
        }
        self.write(&log_weights, fresh.center(), fresh.precision().raw())?;
        if self.tied {
            self.tie_precisions()?;
        }
        Ok(())
    }
}

/// Logits whose softmax is a distribution: no NaN, no +∞, not all −∞ (see
/// [`GaussianMixture::new`]); NaN logits made every weight and log-density NaN, and
/// `sample_with_components` then drew every sample from the last component.
fn check_logits(logits: &[f64]) -> Result<()> {
    if let Some(k) = logits
        .iter()
        .position(|v| v.is_nan() || *v == f64::INFINITY)
    {
        return Err(GaussError::data(
            "mixture logits",
            format!(
                "logit {k} is {}; a logit must be finite, or −∞ for a component of weight 0",
                logits[k]
            ),
        ));
    }
    if !logits.is_empty() && logits.iter().all(|v| *v == f64::NEG_INFINITY) {
        return Err(GaussError::data(
            "mixture logits",
            "every logit is −∞, so no component has weight; at least one must be finite",
        ));
    }
    Ok(())
}

/// The dimensions of a (…, K) tensor but its last: the (…) of a per-sample result.
pub(super) fn leading_dims(joint: &Tensor) -> Vec<usize> {
    let dims = joint.dims();
    dims[..dims.len().saturating_sub(1)].to_vec()
}

/// A tied mixture's covariances `values` (K blocks, row-major) must be equal: every block
/// within 1e-12 of block 0, relative to block 0's largest entry.
fn check_equal_blocks(values: &[f64], k: usize) -> Result<()> {
    let size = values.len() / k.max(1);
    let (first, rest) = values.split_at(size.min(values.len()));
    let scale = first.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (component, block) in rest.chunks(size.max(1)).enumerate() {
        let gap = first
            .iter()
            .zip(block)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        if gap > 1e-12 * scale {
            return Err(GaussError::config(
                "covariances",
                format!(
                    "a tied mixture's components share one covariance, but covariance {} differs from covariance 0 by up to {gap:e}",
                    component + 1
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// NaN or +∞ logits, or all of them −∞, define no weights and are refused naming the
    /// logit; they were accepted, and then every weight and log-density was NaN and every
    /// sample came from the last component. A −∞ logit beside finite ones is a component of
    /// weight 0: its weight is 0, it is never drawn, and the density is the other
    /// component's alone (closed form: N(x | 0, I) at x = 0 is 1/(2π) in 2-D).
    #[test]
    fn logits_must_define_weights() -> Result<()> {
        let device = Device::Cpu;
        let means = Tensor::new(&[[0.0f32, 0.0], [5.0, 5.0]], &device)?;
        let eyes = Tensor::eye(2, DType::F32, &device)?
            .unsqueeze(0)?
            .repeat((2, 1, 1))?;
        let layer = GaussLayer::from_covariance(&means, &eyes, GaussLayerConfig::default())?;
        let inf = f32::INFINITY;
        for (logits, needle) in [
            ([f32::NAN, 0.0], "logit 0 is NaN"),
            ([0.0, f32::NAN], "logit 1 is NaN"),
            ([0.0, inf], "logit 1 is inf"),
            ([-inf, -inf], "every logit is −∞"),
        ] {
            let logits = Tensor::new(&logits, &device)?;
            match GaussianMixture::new(layer.clone(), logits) {
                Err(GaussError::Data { origin, reason }) => {
                    assert_eq!(origin, "mixture logits");
                    assert!(reason.contains(needle), "{reason}");
                }
                other => panic!("expected a Data error with `{needle}`, got {other:?}"),
            }
        }
        let mixture = GaussianMixture::new(layer, Tensor::new(&[0.0f32, -inf], &device)?)?;
        assert_eq!(mixture.weights()?.to_vec1::<f32>()?, [1.0, 0.0]);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
        let (_, components) = mixture.sample_with_components(100, &mut rng)?;
        assert!(components.iter().all(|&c| c == 0), "{components:?}");
        let x = Tensor::new(&[[0.0f32, 0.0]], &device)?;
        let log_p = mixture.log_prob(&x)?.to_vec1::<f32>()?[0] as f64;
        let expected = -(2.0 * std::f64::consts::PI).ln();
        assert!((log_p - expected).abs() < 1e-6, "{log_p} vs {expected}");
        Ok(())
    }
}
