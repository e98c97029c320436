//! The maximum-likelihood lowrank precision for a given covariance: the `P = diag(e^θ) + U Uᵀ`
//! that maximizes `log det P − tr(S P)` (the Gaussian log-likelihood of data with covariance
//! `S`, up to constants). It serves the mixture's M-step and the exact recovery of a
//! low-rank-plus-diagonal precision in [`super::Precision::from_precision_matrix`].
//!
//! # Which family
//! The layer stores a *precision* `D + U Uᵀ` (diagonal plus low rank). Factor analysis fits a
//! *covariance* `Ψ + W Wᵀ`, whose precision `Ψ⁻¹ − Ψ⁻¹W(I + WᵀΨ⁻¹W)⁻¹WᵀΨ⁻¹` is diagonal
//! *minus* low rank: a different family, which the layer cannot hold. So the fit here is in
//! the layer's own family. Write `P = T (I + V Vᵀ) T` with `T = diag(t)`, `t = e^{θ/2}`,
//! `U = T V`:
//! - **V given θ is closed form**: it is the probabilistic-PCA problem on the scaled
//!   covariance `S̃ = T S T`. With its eigenpairs `(s_i, q_i)`, the optimum puts `V`'s
//!   columns on the r *smallest* `s_i < 1` with `‖v_i‖² = 1/s_i − 1` (each direction gains
//!   `s − 1 − ln s`, largest for the smallest `s`; von Neumann's trace inequality makes the
//!   aligned choice optimal).
//! - **θ maximizes the profile** `g(θ) = Σθ − Σ_{sel} (1 + ln s_i) − Σ_{rest} s_i` (sel: the
//!   chosen directions), whose gradient is `∂g/∂θ_j = 1 − Σ_{sel} q_ij² − Σ_{rest} s_i q_ij²`
//!   (`∂s_i/∂θ_j = s_i q_ij²`): L-BFGS with a backtracking line search that accepts only
//!   increases.
//!
//! Every accepted step raises the likelihood (near the optimum, where the value no longer
//! moves above its rounding, a step may instead keep it equal to 1e-14 relative while it
//! halves the gradient), and the start's value is at least that of the
//! current `(θ, U)`, so in EM this is a generalized M-step (monotone), and a start from the
//! diagonal fit (U = 0) can only improve on it. Block-coordinate ascent (V, then θ by
//! coordinate sweeps) was tried first: it converged linearly, so slowly that EM on an
//! elongated 5-D mixture was still moving after 1000 steps; with the profile ascent the same
//! EM converges in a handful of steps.

use crate::error::{GaussError, Result};
use crate::linalg::host;

/// A lowrank precision on the host: `P = diag(e^θ) + U Uᵀ`.
#[derive(Clone, Debug)]
pub(crate) struct LowRankFit {
    /// θ (d).
    theta: Vec<f64>,
    /// U (d, r), row-major.
    factor: Vec<f64>,
    rank: usize,
    /// `log det P − tr(S P)` after the last ascent.
    pub(crate) objective: f64,
}

/// The profile `g(θ)`, its gradient, and the optimal U for θ.
struct Profile {
    value: f64,
    gradient: Vec<f64>,
    factor: Vec<f64>,
}

/// How far θ_i may go below the diagonal fit's `−ln S_ii` (a factor e^−25 ≈ 1.4e-11 on the
/// diagonal entry; see [`LowRankFit::ascend`]).
const THETA_RANGE: f64 = 25.0;

/// The stored L-BFGS correction pairs.
const MEMORY: usize = 8;

impl LowRankFit {
    /// The diagonal start `P = diag(e^θ)` (U = 0).
    pub(crate) fn from_theta(theta: &[f64], rank: usize) -> Self {
        Self {
            theta: theta.to_vec(),
            factor: vec![0.0; theta.len() * rank],
            rank,
            objective: f64::NEG_INFINITY,
        }
    }

    /// The raw lowrank block (d, r + 1) row-major: `[θ_i, U_i,0 … U_i,r−1]` per row.
    pub(crate) fn raw(&self) -> Vec<f64> {
        let r = self.rank;
        let mut raw = Vec::with_capacity(self.theta.len() * (r + 1));
        for (i, &t) in self.theta.iter().enumerate() {
            raw.push(t);
            raw.extend(&self.factor[i * r..(i + 1) * r]);
        }
        raw
    }

    /// `P` as row-major (d, d) values.
    pub(crate) fn precision(&self) -> Vec<f64> {
        let (d, r) = (self.theta.len(), self.rank);
        let mut p = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                let inner: f64 = (0..r)
                    .map(|c| self.factor[i * r + c] * self.factor[j * r + c])
                    .sum();
                p[i * d + j] = inner + if i == j { self.theta[i].exp() } else { 0.0 };
            }
        }
        p
    }

    /// The profile at `theta` for covariance `s`.
    fn profile(&self, s: &[f64], theta: &[f64], neuron: usize) -> Result<Profile> {
        let (d, r) = (theta.len(), self.rank);
        let t: Vec<f64> = theta.iter().map(|v| (0.5 * v).exp()).collect();
        let scaled: Vec<f64> = (0..d * d).map(|ij| t[ij / d] * s[ij] * t[ij % d]).collect();
        let (values, vectors) = host::symmetric_eigen(&host::symmetric_block(&scaled, d), neuron)
            .map_err(|e| numerical(neuron, &e.to_string()))?;
        if values[0].is_nan() || values[0] <= 0.0 {
            return Err(numerical(
                neuron,
                &format!(
                    "the covariance is not positive definite (smallest eigenvalue of its scaled form {:e}); raise `reg_covar`",
                    values[0]
                ),
            ));
        }
        let chosen = values.iter().take(r).take_while(|&&v| v < 1.0).count();
        let mut value: f64 = theta.iter().sum();
        let mut gradient = vec![1.0; d];
        let mut factor = vec![0.0; d * r];
        for (i, &v) in values.iter().enumerate() {
            let selected = i < chosen;
            value -= if selected { 1.0 + v.ln() } else { v };
            let weight = if selected { 1.0 } else { v };
            for (j, g) in gradient.iter_mut().enumerate() {
                *g -= weight * vectors[(j, i)] * vectors[(j, i)];
            }
            if selected {
                let length = (1.0 / v - 1.0).sqrt();
                for j in 0..d {
                    factor[j * r + i] = t[j] * vectors[(j, i)] * length;
                }
            }
        }
        if !value.is_finite() {
            return Err(numerical(neuron, &format!("the likelihood became {value}")));
        }
        Ok(Profile {
            value,
            gradient,
            factor,
        })
    }

    /// Raises the likelihood for covariance `s` ((d, d) row-major, positive definite) from
    /// the current θ by L-BFGS on the profile, until the gradient's largest entry is below
    /// `gradient_tolerance`, no step raises it, or after `most_iterations`; U becomes the
    /// optimal factor for the final θ. Returns the iterations taken.
    ///
    /// # Errors
    /// [`GaussError::Numerical`] naming `neuron` when `s` is not finite or not positive
    /// definite.
    pub(crate) fn ascend(
        &mut self,
        s: &[f64],
        gradient_tolerance: f64,
        most_iterations: usize,
        neuron: usize,
    ) -> Result<usize> {
        let d = self.theta.len();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        // The optimum may lie on the family's boundary, a diagonal entry → 0 with U carrying
        // that coordinate (as Heywood cases in factor analysis); θ stops THETA_RANGE below
        // the diagonal fit's −ln S_ii instead, where the likelihood left is below rounding
        // and the scaled covariance stays well within the eigensolver's range.
        let lower: Vec<f64> = (0..d).map(|i| -s[i * d + i].ln() - THETA_RANGE).collect();
        let clamp = |theta: &mut [f64]| {
            theta
                .iter_mut()
                .zip(&lower)
                .for_each(|(t, l)| *t = t.max(*l));
        };
        // The gradient without the components that push a clamped θ_j further down.
        let free = |theta: &[f64], gradient: &[f64]| -> Vec<f64> {
            (0..d)
                .map(|j| {
                    if theta[j] <= lower[j] && gradient[j] < 0.0 {
                        0.0
                    } else {
                        gradient[j]
                    }
                })
                .collect()
        };
        clamp(&mut self.theta);
        let mut current = self.profile(s, &self.theta, neuron)?;
        let mut pairs: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> =
            std::collections::VecDeque::with_capacity(MEMORY);
        let mut iterations = 0;
        while iterations < most_iterations {
            let gradient = free(&self.theta, &current.gradient);
            let largest = gradient.iter().fold(0f64, |m, g| m.max(g.abs()));
            if largest.is_nan() || largest <= gradient_tolerance {
                break;
            }
            // Two-loop recursion on the ascent direction H·∇g.
            let mut q = gradient.clone();
            let mut alphas = Vec::with_capacity(pairs.len());
            for (step, change, rho) in pairs.iter().rev() {
                let alpha = rho * dot(step, &q);
                q.iter_mut().zip(change).for_each(|(v, c)| *v -= alpha * c);
                alphas.push(alpha);
            }
            let gamma = match pairs.back() {
                Some((step, change, _)) => dot(step, change) / dot(change, change),
                None => 1.0 / largest.max(1.0),
            };
            q.iter_mut().for_each(|v| *v *= gamma);
            for ((step, change, rho), alpha) in pairs.iter().zip(alphas.iter().rev()) {
                let beta = rho * dot(change, &q);
                q.iter_mut()
                    .zip(step)
                    .for_each(|(v, s)| *v += (alpha - beta) * s);
            }
            // H approximates the inverse of −∇²g; q must climb, and not below the bound.
            let mut q = free(&self.theta, &q);
            let mut slope = dot(&q, &gradient);
            if slope.is_nan() || slope <= 0.0 {
                q = gradient.iter().map(|g| g / largest.max(1.0)).collect();
                slope = dot(&q, &gradient);
                pairs.clear();
            }
            let mut length = 1.0;
            let mut accepted = None;
            for _ in 0..60 {
                let mut trial: Vec<f64> = (0..d).map(|j| self.theta[j] + length * q[j]).collect();
                clamp(&mut trial);
                // A trial that breaks the eigensolver (far too long a step) is just too long.
                if let Ok(profile) = self.profile(s, &trial, neuron) {
                    // Near the optimum the value changes below its rounding (relative 1e-16,
                    // so θ would stall near √ε): there a step that leaves the value equal to
                    // rounding and shrinks the gradient is taken too.
                    let rounding = 1e-14 * (1.0 + current.value.abs());
                    let smaller_gradient = free(&trial, &profile.gradient)
                        .iter()
                        .fold(0f64, |m, g| m.max(g.abs()))
                        < 0.5 * largest;
                    if profile.value >= current.value + 1e-4 * length * slope
                        || (profile.value >= current.value - rounding && smaller_gradient)
                    {
                        accepted = Some((trial, profile));
                        break;
                    }
                }
                length *= 0.5;
            }
            let Some((trial, profile)) = accepted else {
                break;
            };
            let step: Vec<f64> = (0..d).map(|j| trial[j] - self.theta[j]).collect();
            // Curvature of −g along the step: y = ∇(−g)(new) − ∇(−g)(old).
            let change: Vec<f64> = (0..d)
                .map(|j| current.gradient[j] - profile.gradient[j])
                .collect();
            let curvature = dot(&step, &change);
            if curvature > 1e-300 {
                if pairs.len() == MEMORY {
                    pairs.pop_front();
                }
                pairs.push_back((step, change, 1.0 / curvature));
            }
            self.theta = trial;
            current = profile;
            iterations += 1;
        }
        self.factor = current.factor;
        self.objective = current.value;
        Ok(iterations)
    }
}

fn numerical(neuron: usize, reason: &str) -> GaussError {
    GaussError::Numerical {
        what: format!("lowrank maximum-likelihood fit of neuron {neuron}"),
        reason: reason.to_string(),
    }
}
