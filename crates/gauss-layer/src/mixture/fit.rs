//! Fitting: the EM steps with their projection onto the layer's family, the data-driven
//! start, the choice among starts, and the optional gradient refinement.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::{GaussLayerConfig, Parameterization};
use crate::density;
use crate::error::{GaussError, Result};
use crate::linalg::host::HostMatrix;
use crate::linalg::{self, host};
use crate::precision::{LowRankFit, Precision};
use crate::repair;

use super::kmeans::{checked_samples, host_values, kmeans, squared_distances, KMeans, Samples};
use super::{GaussianMixture, MixtureFit, MixtureFitOptions, MIXTURE_LOGITS_NAME};

/// lowrank's rank r when EM fits the layer's own family `diag(e^θ) + U Uᵀ` (r < d, no width
/// floor): first the diagonal members (U = 0, the diag fit), then generalized M-steps of
/// [`LowRankFit::ascend`] from there, so the fit scores at least the diagonal fit.
fn low_rank_em_rank(config: &GaussLayerConfig, dim: usize) -> Option<usize> {
    match config.precision.parameterization {
        Parameterization::LowRank { rank }
            if rank < dim && config.precision.width_floor.is_none() =>
        {
            Some(rank)
        }
        _ => None,
    }
}

/// The lowrank M-step's L-BFGS stops once no entry of the profile gradient (dimensionless,
/// `∂/∂θ` of the weighted log-likelihood per sample) exceeds this, or after
/// `LOW_RANK_ITERATIONS_PER_STEP` iterations: a generalized M-step needs only to raise the
/// likelihood, and the next step continues from there.
const LOW_RANK_GRADIENT_TOLERANCE: f64 = 1e-9;
const LOW_RANK_ITERATIONS_PER_STEP: usize = 20;

/// Which members of the layer's family an M-step chooses among.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// The whole family.
    Family,
    /// lowrank's first stage: its diagonal members (U = 0).
    Diagonal,
}

/// The covariance family's M-step statistic: diag and sphere need only per-dimension
/// variances; every other parameterization takes the full covariance.
fn needs_full_covariance(parameterization: Parameterization) -> bool {
    !matches!(
        parameterization,
        Parameterization::Diag | Parameterization::Sphere
    )
}

/// The mixture's tensors, copied (for keeping the best of several starts).
struct Snapshot {
    center: Tensor,
    raw: Tensor,
    logits: Tensor,
}

/// `source` in `target`'s dtype and device, in storage of its own: Candle's `slice_set`
/// refuses a source that shares the target's storage (the mixture's own means handed back to
/// `set_parameters`, or a view of them), and the dtype, device and layout conversions return
/// the same storage when they have nothing to do. The copy is O(K·d²), once per EM step.
fn detached_source(source: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok(source
        .to_dtype(target.dtype())?
        .to_device(target.device())?
        .copy()?)
}

impl GaussianMixture {
    /// Writes log-weights, means and the raw precision tensor into the mixture's tensors.
    pub(super) fn write(&self, log_weights: &[f64], means: &Tensor, raw: &Tensor) -> Result<()> {
        let center = self.layer.center();
        let (dtype, device) = (center.dtype(), center.device());
        let logits = host::from_host(log_weights.to_vec(), &[log_weights.len()], dtype, device)?;
        self.logits.slice_set(&logits, 0, 0)?;
        center.slice_set(&detached_source(means, center)?, 0, 0)?;
        let own_raw = self.layer.precision().raw();
        own_raw.slice_set(&detached_source(raw, own_raw)?, 0, 0)?;
        Ok(())
    }

    /// E-step: the mean log-likelihood and the responsibilities (N, K), both summed in
    /// [`linalg::accumulation_dtype`] (f32 for f16 and bf16 samples).
    fn e_step(&self, x: &Tensor) -> Result<(f64, Tensor)> {
        let joint = self
            .joint_log_prob(x)?
            .to_dtype(linalg::accumulation_dtype(x.dtype()))?;
        // −∞ (not NaN) for a sample every component gives −∞; its responsibilities are NaN.
        let log_norm = linalg::log_sum_exp(&joint, 1)?; // (N)
        let mean = linalg::read_scalar(&log_norm.mean_all()?)?;
        let resp = joint.broadcast_sub(&log_norm.unsqueeze(1)?)?.exp()?;
        Ok((mean, resp))
    }

    /// M-step from responsibilities `resp` (N, K, in [`linalg::accumulation_dtype`]): weighted means,
    /// covariances (with `reg_covar` on the diagonal, projected onto the family), weights;
    /// written in place.
    fn m_step(&self, samples: &Samples, resp: &Tensor, reg_covar: f64, stage: Stage) -> Result<()> {
        let x = &samples.wide;
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

        // The counts and the means in one read: (K, 1 + d) rows `[n_k, μ_k]`.
        let counts_and_means = host_values(&Tensor::cat(&[&counts, &means], 1)?)?;
        let counts_host: Vec<f64> = counts_and_means.chunks(d + 1).map(|row| row[0]).collect();
        let means_host: Vec<&[f64]> = counts_and_means
            .chunks(d + 1)
            .map(|row| &row[1..])
            .collect();
        // Per component: the weighted covariance around its own mean (d × d, row-major),
        // before `reg_covar`.
        let mut spreads: Vec<Vec<f64>> = Vec::with_capacity(k);
        if needs_full_covariance(config.precision.parameterization) {
            for (component, count) in counts_host.iter().enumerate() {
                let centered = x.broadcast_sub(&means.narrow(0, component, 1)?)?;
                let weighted = centered.broadcast_mul(&resp.narrow(1, component, 1)?)?;
                // The scatter Σ r (x − μ)(x − μ)ᵀ (d rows) and the drift Σ r (x − μ) (one
                // more row), in one read.
                let scatter = Tensor::cat(
                    &[&weighted.t()?.matmul(&centered)?, &weighted.sum_keepdim(0)?],
                    0,
                )?;
                let values = host_values(&scatter)?;
                let (block, drift) = values.split_at(d * d);
                // The corrected two-pass formula (Chan, Golub & LeVeque): the drift is the
                // rounding error of μ times the weight, and `drift driftᵀ / n` takes its
                // square back out of the scatter. Without it, a component collapsed onto
                // identical points kept a scatter of μ's rounding error squared (7e-32 for
                // points at (1, 1)) and, with `reg_covar = 0`, a singular covariance that
                // passed for a fit.
                spreads.push(
                    (0..d * d)
                        .map(|ij| {
                            let (i, j) = (ij / d, ij % d);
                            let scatter = 0.5 * (block[i * d + j] + block[j * d + i]);
                            (scatter - drift[i] * drift[j] / count) / count
                        })
                        .collect(),
                );
            }
        } else {
            // E_k[(x − μ_k)²] = E_k[x̃²] − E_k[x̃]² with x̃ = x − m, m the data mean: three
            // matmuls for all components, and no cancellation beyond the spread of the means.
            // E_k[x̃] (= μ_k − m) is summed from the same x̃ as E_k[x̃²]: a component of
            // identical samples then gets a variance of the order of ε·x̃², not the square of
            // the difference between the roundings of μ_k and m (which let 1000 copies of
            // (0.1, 0.3) pass for a fit with variance 1e-28 at `reg_covar = 0`).
            let second = resp_t
                .matmul(&samples.centered_sq)?
                .broadcast_div(&counts)?;
            let shifted = resp_t.matmul(&samples.centered)?.broadcast_div(&counts)?;
            let variances = host_values(&(second - shifted.sqr()?)?)?;
            for row in variances.chunks(d) {
                spreads.push(
                    (0..d * d)
                        .map(|ij| {
                            let i = ij / d;
                            if i == ij % d {
                                row[i].max(0.0)
                            } else {
                                0.0
                            }
                        })
                        .collect(),
                );
            }
        }
        // A tied mixture pools them into one, weighted by the counts (scikit-learn's tied
        // M-step: the summed scatter divided by Σ_k n_k).
        if self.tied {
            let total: f64 = counts_host.iter().sum();
            let mut pooled = vec![0.0; d * d];
            for (spread, count) in spreads.iter().zip(&counts_host) {
                for (p, v) in pooled.iter_mut().zip(spread) {
                    *p += v * count / total;
                }
            }
            spreads = vec![pooled];
        }
        let mut covariances: Vec<f64> = Vec::with_capacity(spreads.len() * d * d);
        for (component, spread) in spreads.iter().enumerate() {
            let mut cov = HostMatrix::from_fn(d, d, |i, j| {
                let v = spread[i * d + j];
                if i == j {
                    v + reg_covar
                } else {
                    v
                }
            });
            project_covariance(&mut cov, config, component)?;
            let means: &[&[f64]] = if self.tied {
                &means_host
            } else {
                &means_host[component..=component]
            };
            check_not_collapsed(&cov, means, eps, component)?;
            covariances.extend((0..d * d).map(|ij| cov[(ij / d, ij % d)]));
        }
        let blocks = spreads.len();
        let log_weights: Vec<f64> = counts_host.iter().map(|c| (c / n as f64).ln()).collect();
        let raw = match low_rank_em_rank(config, d) {
            Some(rank) => self.low_rank_raw(&covariances, blocks, d, rank, stage)?,
            None => raw_from_covariances(&covariances, blocks, d, config)?,
        };
        // Tied: the one precision, in every component.
        let raw = if blocks < k {
            let mut dims = raw.dims().to_vec();
            dims[0] = k;
            raw.broadcast_as(dims)?.contiguous()?
        } else {
            raw
        };
        self.write(&log_weights, &means, &raw)
    }

    /// lowrank's M-step: per component, the diagonal maximizer (`Stage::Diagonal`) or the
    /// profile ascent from the current θ (`Stage::Family`); the raw tensor (K, d, r + 1).
    fn low_rank_raw(
        &self,
        covariances: &[f64],
        k: usize,
        d: usize,
        rank: usize,
        stage: Stage,
    ) -> Result<Tensor> {
        let current = host_values(self.layer.precision().raw())?;
        let mut raw = Vec::with_capacity(k * d * (rank + 1));
        for (component, cov) in covariances.chunks(d * d).enumerate() {
            let theta: Vec<f64> = match stage {
                Stage::Diagonal => (0..d).map(|i| -cov[i * d + i].ln()).collect(),
                Stage::Family => (0..d)
                    .map(|i| current[(component * d + i) * (rank + 1)])
                    .collect(),
            };
            let mut fit = LowRankFit::from_theta(&theta, rank);
            if stage == Stage::Family {
                fit.ascend(
                    cov,
                    LOW_RANK_GRADIENT_TOLERANCE,
                    LOW_RANK_ITERATIONS_PER_STEP,
                    component,
                )?;
            }
            raw.extend(fit.raw());
        }
        Ok(Tensor::from_vec(raw, (k, d, rank + 1), &Device::Cpu)?)
    }

    /// The stage EM starts in: lowrank (below full rank) starts with its diagonal members.
    fn first_stage(&self) -> Stage {
        match low_rank_em_rank(self.layer.config(), self.dim()) {
            Some(_) => Stage::Diagonal,
            None => Stage::Family,
        }
    }

    /// k-means on the data (k-means++ seeding, Lloyd's iterations), then the M-step of the
    /// hard clusters; returns the Lloyd iterations of the best of `kmeans_inits` runs.
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
        let x = &samples.wide;
        let ids = Tensor::arange(0u32, k as u32, x.device())?.unsqueeze(0)?;
        let one_hot = best
            .labels
            .unsqueeze(1)?
            .broadcast_eq(&ids)?
            .to_dtype(x.dtype())?;
        self.m_step(samples, &one_hot, options.reg_covar, self.first_stage())?;
        Ok(best.steps)
    }

    /// EM from the current parameters until the mean log-likelihood changes by less than
    /// `tol`; returns it, the M-steps taken and whether `tol` was met.
    fn em(
        &self,
        samples: &Samples,
        options: &MixtureFitOptions,
        stage: Stage,
    ) -> Result<(f64, usize, bool)> {
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
            self.m_step(samples, &resp, options.reg_covar, stage)?;
            steps += 1;
        }
    }

    /// The start alone: k-means++ seeding and Lloyd's iterations (best of
    /// `options.kmeans_inits` runs by inertia), then the M-step of the hard clusters written
    /// into the mixture (scikit-learn's `init_params='kmeans'`).
    /// Returns the Lloyd iterations.
    ///
    /// # Shapes
    /// `x`: (…, d), at least K samples
    ///
    /// # Errors
    /// Samples on another device than the mixture's ([`GaussError::DeviceMismatch`]), of the
    /// wrong width or dtype, too few or non-finite; invalid options.
    pub fn init_from_kmeans(&self, x: &Tensor, options: &MixtureFitOptions) -> Result<usize> {
        options.validate()?;
        let samples = checked_samples(
            x,
            self.dim(),
            self.logits.dtype(),
            self.logits.device(),
            self.num_components(),
        )?;
        let mut rng = StdRng::seed_from_u64(options.seed);
        self.init_from_data(&samples, options, &mut rng)
    }

    /// The `means_init` start: every sample to its nearest given mean, the M-step of those
    /// clusters, then the given means written back over the clusters' own.
    fn init_from_means(&self, samples: &Samples, means: &[f64], reg_covar: f64) -> Result<()> {
        let (k, d) = (self.num_components(), self.dim());
        if means.len() != k * d {
            return Err(GaussError::config(
                "means_init",
                format!(
                    "must hold K·d = {k}·{d} = {} values (row-major), got {}",
                    k * d,
                    means.len()
                ),
            ));
        }
        if let Some(bad) = means.iter().find(|v| !v.is_finite()) {
            return Err(GaussError::config(
                "means_init",
                format!("must be finite, got {bad}"),
            ));
        }
        let x = &samples.wide;
        let centers = host::from_host(means.to_vec(), &[k, d], x.dtype(), x.device())?;
        let distances = squared_distances(
            &samples.centered,
            &samples.centered_norm_sq,
            &centers.broadcast_sub(&samples.offset)?,
        )?;
        let ids = Tensor::arange(0u32, k as u32, x.device())?.unsqueeze(0)?;
        let one_hot = distances
            .argmin(1)?
            .unsqueeze(1)?
            .broadcast_eq(&ids)?
            .to_dtype(x.dtype())?;
        self.m_step(samples, &one_hot, reg_covar, self.first_stage())?;
        let center = self.layer.center();
        center.slice_set(&detached_source(&centers, center)?, 0, 0)?;
        Ok(())
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

    /// Fits the mixture to `x` by maximum likelihood: k-means start (k-means++ seeding and
    /// Lloyd's iterations, scikit-learn's `init_params='kmeans'`; or `means_init`, or
    /// the current values with `warm_start`), EM, and, only when asked (`refine_steps`),
    /// gradient refinement; see the module docs. The fitted values are written into the
    /// mixture's tensors in place. A tied mixture
    /// ([`GaussianMixture::with_tied_covariance`]) stays tied: every M-step writes one
    /// pooled covariance into all components, and it is never refined by gradient (its fit
    /// is EM's, whose M-steps maximize over every family).
    ///
    /// # Shapes
    /// `x`: (…, d), at least K samples
    ///
    /// # Errors
    /// Samples on another device than the mixture's ([`GaussError::DeviceMismatch`]), of the
    /// wrong width or dtype, too few, with fewer distinct samples than
    /// components, or non-finite; invalid options (`means_init` of the wrong length); an
    /// M-step covariance that is not positive definite, e.g. for samples identical along a
    /// coordinate with `reg_covar = 0` ([`GaussError::InvalidConfig`] naming `reg_covar`); a
    /// covariance the config cannot hold (e.g. variances beyond cholesky's
    /// `factor_diag_floor`, stated in the message); refinement of a mixture whose tensors are
    /// not variables, or of a tied mixture.
    pub fn fit(&self, x: &Tensor, options: &MixtureFitOptions) -> Result<MixtureFit> {
        options.validate()?;
        if self.tied && options.refine_steps.is_some_and(|steps| steps > 0) {
            return Err(GaussError::config(
                "refine_steps",
                "gradient refinement moves each component's precision on its own, which would untie a tied mixture; set `refine_steps: None` or `Some(0)`",
            ));
        }
        let samples = checked_samples(
            x,
            self.dim(),
            self.logits.dtype(),
            self.logits.device(),
            self.num_components(),
        )?;
        let mut rng = StdRng::seed_from_u64(options.seed);
        let mut best: Option<(MixtureFit, Option<Snapshot>)> = None;
        let single_start = options.warm_start || options.means_init.is_some();
        let starts = if single_start { 1 } else { options.n_init };
        for start in 0..starts {
            let (kmeans_steps, first) = if options.warm_start {
                (0, Stage::Family)
            } else if let Some(means) = &options.means_init {
                self.init_from_means(&samples, means, options.reg_covar)?;
                (0, self.first_stage())
            } else {
                let steps = self.init_from_data(&samples, options, &mut rng)?;
                (steps, self.first_stage())
            };
            let (mut mean, mut em_steps, mut converged) = self.em(&samples, options, first)?;
            if first == Stage::Diagonal {
                // lowrank: from the diagonal fit into the whole family; every step is monotone.
                let (family_mean, family_steps, family_converged) =
                    self.em(&samples, options, Stage::Family)?;
                (mean, converged) = (family_mean, family_converged);
                em_steps += family_steps;
            }
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
                let snapshot = if start + 1 < starts {
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
        // No refinement by default: every M-step maximizes over the layer's family (the
        // projection onto it is exact, or lowrank's monotone block ascent; a width floor,
        // which would make lowrank's approximate, is refused with lowrank).
        let refine_steps = options.refine_steps.unwrap_or(0);
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
fn project_covariance(
    cov: &mut HostMatrix,
    config: &GaussLayerConfig,
    component: usize,
) -> Result<()> {
    let d = cov.nrows();
    if config.precision.parameterization == Parameterization::Sphere {
        let mean = (0..d).map(|i| cov[(i, i)]).sum::<f64>() / d as f64;
        *cov = HostMatrix::from_fn(d, d, |i, j| if i == j { mean } else { 0.0 });
    }
    let Some(sigma) = config.precision.width_floor else {
        return Ok(());
    };
    let lowest = sigma * sigma * (1.0 + 1e-6);
    *cov = host::raise_eigenvalues(cov, lowest, component)?;
    Ok(())
}

/// The error of an M-step covariance that is not positive definite (one message for every
/// parameterization and cause).
fn not_positive_definite(component: usize) -> GaussError {
    GaussError::config(
        "reg_covar",
        format!("component {component}: the M-step covariance is not positive definite; raise `reg_covar`"),
    )
}

/// Refuses an M-step covariance `cov` (with `reg_covar`, projected) that has collapsed along
/// a coordinate: a variance at most the square of one unit in the last place (`eps`, of the
/// dtype the M-step sums in) of the component's mean there, so that its samples are
/// identical there to working precision, and the covariance is singular but for rounding
/// (`means`: the component's mean, or every component's for a tied covariance). For five
/// copies of (1, 1), diag's variances came out 0 and failed as not positive definite, while
/// the full forms' rounding left a remainder of 7e-32, so cholesky reported a converged fit
/// with a singular covariance and expm failed elsewhere; now all of them refuse with this
/// one error.
fn check_not_collapsed(
    cov: &HostMatrix,
    means: &[&[f64]],
    eps: f64,
    component: usize,
) -> Result<()> {
    for i in 0..cov.nrows() {
        let position = means.iter().fold(0.0f64, |m, mean| m.max(mean[i].abs()));
        let resolution = eps * position;
        let variance = cov[(i, i)];
        if variance.is_nan() || variance <= resolution * resolution {
            return Err(not_positive_definite(component));
        }
    }
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
        let cov = HostMatrix::from_fn(d, d, |i, j| block[i * d + j]);
        let inverse = host::spd_inverse(&cov).ok_or_else(|| not_positive_definite(component))?;
        for i in 0..d {
            for j in 0..d {
                precision.push(0.5 * (inverse[(i, j)] + inverse[(j, i)]));
            }
        }
    }
    let tensor = Tensor::from_vec(precision.clone(), (k, d, d), &Device::Cpu)?;
    // The precision in the family's raw form (lowrank reaches here only at full rank, which
    // holds every precision; below it the M-steps go through `low_rank_raw`).
    match Precision::from_precision_matrix_within(&tensor, config, f64::INFINITY) {
        Ok(p) => Ok(p.raw().clone()),
        Err(original) => {
            density::check_precision_blocks(&precision, k, d, config)?;
            Err(original)
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    use super::super::{gaussian_mixture, MixtureFitOptions};
    use crate::config::GaussLayerConfig;
    use crate::error::{GaussError, Result};

    /// Samples on another device than the mixture's get the typed
    /// [`GaussError::DeviceMismatch`] naming them, before any work: the mixture is left as
    /// it was (without the check, `init_from_kmeans` ran on the host and wrote its result to
    /// the device, and `fit` failed only in its first E-step, with the layer's "input x"
    /// error). CPU samples with a mixture on `device`; on the CPU alone (nothing to
    /// mismatch) the same call fits.
    fn samples_on_another_device_are_refused(device: &Device) -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let mixture = gaussian_mixture(2, 2, GaussLayerConfig::default(), vb)?;
        let x = Tensor::new(
            &[
                [0.0f32, 0.2],
                [1.1, -0.3],
                [0.4, 1.3],
                [-0.7, 0.5],
                [9.6, 0.1],
                [10.8, -0.4],
                [10.2, 1.2],
                [11.5, 0.6],
            ],
            &Device::Cpu,
        )?;
        let options = MixtureFitOptions::default();
        if device.is_cpu() {
            assert!(mixture.fit(&x, &options)?.converged);
            return Ok(());
        }
        let before = mixture.means().to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        for result in [
            mixture.init_from_kmeans(&x, &options).map(|_| ()),
            mixture.fit(&x, &options).map(|_| ()),
        ] {
            match result {
                Err(GaussError::DeviceMismatch {
                    what,
                    expected,
                    got,
                    ..
                }) => {
                    assert_eq!(what, "samples x");
                    assert_eq!((expected, got), (device.location(), Device::Cpu.location()));
                }
                other => panic!("expected DeviceMismatch for samples x, got {other:?}"),
            }
        }
        let after = mixture.means().to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(before, after, "the refused calls changed the mixture");
        Ok(())
    }
    crate::test_device!(samples_on_another_device_are_refused);

    /// The E-step's log-normalizer of a sample that every component gives −∞ (its squared
    /// distances overflow f32) was Candle's `log_sum_exp` of −∞ alone, NaN, so EM's
    /// log-likelihood was NaN; it is −∞ now (the log of an empty sum, as SciPy's
    /// `logsumexp`), and the finite sample's responsibilities still sum to 1.
    fn e_step_of_a_far_away_sample_is_minus_infinity(device: &Device) -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let mixture = gaussian_mixture(2, 2, GaussLayerConfig::default(), vb)?;
        // |x|²/d = 1e40/2 overflows f32 (largest 3.4e38) under the initial precision I/d.
        let x = Tensor::new(&[[1e20f32, 0.0], [0.0, 0.0]], &Device::Cpu)?.to_device(device)?;
        let (mean, resp) = mixture.e_step(&x)?;
        assert_eq!(mean, f64::NEG_INFINITY);
        let finite = resp.get(1)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        assert!(
            (finite.iter().sum::<f32>() - 1.0).abs() < 1e-6,
            "{finite:?}"
        );
        Ok(())
    }
    crate::test_device!(e_step_of_a_far_away_sample_is_minus_infinity);

    /// Samples identical along a coordinate give a component no spread there: with
    /// `reg_covar = 0` its covariance is singular, and every parameterization refuses it
    /// with one error naming `reg_covar` (diag did; cholesky reported a converged fit with
    /// covariance [[7.1e-32, 7.1e-32], [7.1e-32, 7.1e-32]] for five copies of (1, 1), and
    /// expm failed with another error). A tied covariance over two such clusters too. With
    /// `reg_covar > 0` the fit is the closed form: the scatter is 0, so the covariance is
    /// `reg_covar · I` (scikit-learn's `_estimate_gaussian_covariances_full` adds `reg_covar`
    /// to the diagonal of the scatter).
    #[test]
    fn identical_samples_need_reg_covar_in_every_parameterization() -> Result<()> {
        use crate::config::Parameterization;
        let parameterizations = [
            Parameterization::Cholesky,
            Parameterization::Direct,
            Parameterization::Expm,
            Parameterization::Diag,
            Parameterization::Sphere,
            Parameterization::LowRank { rank: 1 },
            Parameterization::LowRank { rank: 2 },
        ];
        // (points, copies, components, tied); 0.1 and 0.3 have no exact binary form, so
        // their means carry rounding; a thousand copies sum it up.
        let cases: [(&[[f64; 2]], usize, usize, bool); 5] = [
            (&[[1.0, 1.0]], 5, 1, false),
            (&[[0.1, 0.3]], 1000, 1, false),
            (&[[0.0, 0.0]], 4, 1, false),
            (&[[-3.0, 7.5]], 3, 1, false),
            (&[[1.0, 1.0], [5.0, -5.0]], 3, 2, true),
        ];
        for parameterization in parameterizations {
            for (points, copies, k, tied) in cases {
                if tied && !super::needs_full_covariance(parameterization) {
                    // diag's and sphere's variances come from one pass of sums (E[x̃²] −
                    // E[x̃]²), whose rounding is of the order of ε·E[x̃²]: two clusters of
                    // identical points away from the data mean keep a variance of that order
                    // (3e-15 here), as before. Their untied cases above are caught.
                    continue;
                }
                let rows: Vec<f64> = points
                    .iter()
                    .flat_map(|p| std::iter::repeat_n(p, copies).flatten().copied())
                    .collect();
                let n = rows.len() / 2;
                let x = Tensor::from_vec(rows, (n, 2), &Device::Cpu)?;
                let what = format!("{parameterization} {points:?} x{copies}, tied {tied}");
                for reg_covar in [0.0, 1e-6] {
                    let varmap = VarMap::new();
                    // f64: a host (Device::Cpu) mixture, the precision the check is about.
                    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
                    let config = GaussLayerConfig::with_parameterization(parameterization);
                    let mixture = gaussian_mixture(2, k, config, vb)?.with_tied_covariance(tied)?;
                    let options = MixtureFitOptions {
                        reg_covar,
                        ..Default::default()
                    };
                    let result = mixture.fit(&x, &options);
                    if reg_covar == 0.0 {
                        match result {
                            Err(GaussError::InvalidConfig { field, reason }) => {
                                assert_eq!(field, "reg_covar", "{what}");
                                assert!(
                                    reason.ends_with("the M-step covariance is not positive definite; raise `reg_covar`"),
                                    "{what}: {reason}"
                                );
                            }
                            other => panic!("{what}: expected the reg_covar error, got {other:?}"),
                        }
                        continue;
                    }
                    assert!(result?.converged, "{what}");
                    for block in mixture.covariances()?.to_vec3::<f64>()? {
                        for (i, row) in block.iter().enumerate() {
                            for (j, &v) in row.iter().enumerate() {
                                let expected = if i == j { reg_covar } else { 0.0 };
                                assert!(
                                    (v - expected).abs() < 1e-9 * reg_covar,
                                    "{what}: covariance {block:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
