//! Fitting: the EM steps with their projection onto the layer's family, the data-driven
//! start, the choice among starts, and the optional gradient refinement.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::{GaussLayerConfig, Parameterization};
use crate::density;
use crate::error::{GaussError, Result};
use crate::linalg::{self, host};
use crate::precision::Precision;
use crate::repair;

use super::kmeans::{checked_samples, host_values, kmeans, KMeans, Samples};
use super::{GaussianMixture, MixtureFit, MixtureFitOptions, MIXTURE_LOGITS_NAME};

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

/// The mixture's tensors, copied (for keeping the best of several starts).
struct Snapshot {
    center: Tensor,
    raw: Tensor,
    logits: Tensor,
}

impl GaussianMixture {
    /// Writes log-weights, means and the raw precision tensor into the mixture's tensors.
    pub(super) fn write(&self, log_weights: &[f64], means: &Tensor, raw: &Tensor) -> Result<()> {
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
