//! The layer as a density model: each neuron `z` is the normal N(c_z, P_z⁻¹).
//!
//! - [`GaussLayer::log_prob`]: the normalized per-neuron log-density
//!   `log N(x | c_z, P_z⁻¹) = −m2/2 + ½·log det P_z − ½·d·log 2π`, from the layer's own
//!   distance kernel and log-determinant (never `log g` of an underflowed `g`);
//! - [`GaussLayer::sample`]: draws from every neuron's normal;
//! - [`GaussLayer::from_covariance`] / [`GaussLayer::from_precision`]: a Gaussian-only layer
//!   holding given means and covariances (or precisions) in one step, with errors that say
//!   which floor of the config a matrix falls through.
//!
//! Inputs may have any shape (…, d), like `candle_nn::Linear`: the leading dimensions are
//! flattened and restored on the output.
//!
//! To fit a density by gradient descent on the NLL (`gauss_losses::layer_nll`), mind the
//! start: a fresh layer's centers are near 0 and its precisions near `I/d`, so data far from
//! the origin (e.g. offset by +100) should be standardized first, or the layer started from
//! the data ([`GaussLayer::from_covariance`] with the sample mean and covariance,
//! [`crate::GaussianMixture::fit`] for a mixture); otherwise Adam can stall far from the
//! optimum (see `layer_nll`'s docs).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gauss_layer::{GaussLayer, GaussLayerConfig};
//! let device = Device::Cpu;
//! // One neuron: N(0, diag(1, 4)) in 2-D.
//! let mean = Tensor::new(&[0.0f64, 0.0], &device)?;
//! let covariance = Tensor::new(&[[1.0f64, 0.0], [0.0, 4.0]], &device)?;
//! let layer = GaussLayer::from_covariance(&mean, &covariance, GaussLayerConfig::default())?;
//! // At the mean: −½·log det(2π Σ) = −log 2π − ½·log 4.
//! let x = Tensor::new(&[[[0.0f64, 0.0]]], &device)?; // (1, 1, 2): any (…, d)
//! let log_p = layer.log_prob(&x)?; // (1, 1, 1)
//! let expected = -(2.0 * std::f64::consts::PI).ln() - 0.5 * 4f64.ln();
//! assert!((log_p.flatten_all()?.to_vec1::<f64>()?[0] - expected).abs() < 1e-12);
//! // 1000 draws from the neuron: (n, Z, d).
//! let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
//! assert_eq!(layer.sample(1000, &mut rng)?.dims(), &[1000, 1, 2]);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::{DType, Tensor, WithDType, D};
use rand::Rng;
use rand_distr::StandardNormal;

use crate::config::{GaussLayerConfig, Parameterization};
use crate::cpu;
use crate::error::{check_device, check_dtype, check_float_dtype, GaussError, Result};
use crate::layer::GaussLayer;
use crate::linalg::host::HostMatrix;
use crate::linalg::{self, host};
use crate::ops::{flatten_leading, log_prob_from_mahalanobis};
use crate::precision::Precision;
use crate::repair;
use crate::route::host_reads_are_free;

/// `leading` followed by `tail`.
pub(crate) fn with_tail(leading: &[usize], tail: &[usize]) -> Vec<usize> {
    leading.iter().chain(tail).copied().collect()
}

/// The rows of `x` (over its last dimension) that hold ±∞ and no NaN: samples at infinity,
/// whose log-density is −∞ under every normal ([`GaussLayer::log_prob`] and the density
/// views). Returns the mask (…, 1) (u8) and `x` with those rows zeroed, so that no ∞ reaches
/// the computation (where `0·∞` makes NaN, which the mask would hide from the value but not
/// from the gradient); `None` and `x` itself when `x` is known to hold no ∞.
///
/// On the CPU one scan of `x` tells (reading it is free, and the masking would cost more
/// than the distances of a diagonal layer: measured, it doubled a diag `layer_nll` step);
/// elsewhere, and for a `portable` layer (which runs on the CPU what a GPU runs), the mask is
/// built in tensor ops, since a read would stall the device.
pub(crate) fn infinite_rows(x: &Tensor, portable: bool) -> Result<(Option<Tensor>, Tensor)> {
    if !portable && holds_no_infinity_on_host(x)? {
        return Ok((None, x.clone()));
    }
    // 0·x is NaN exactly where x is ±∞ or NaN.
    let zeroed = (x * 0.0)?;
    let non_finite = zeroed.ne(&zeroed)?.max_keepdim(D::Minus1)?;
    let nan = x.ne(x)?.max_keepdim(D::Minus1)?;
    let mask = non_finite.gt(&nan)?;
    let finite = mask
        .broadcast_as(x.shape())?
        .where_cond(&x.zeros_like()?, x)?;
    Ok((Some(mask), finite))
}

/// Whether `x` is a CPU tensor known to hold no ±∞ (one scan of its storage); `false` when
/// it holds one, or lives on another device, or has a dtype without ∞.
fn holds_no_infinity_on_host(x: &Tensor) -> Result<bool> {
    // A fold without early exit, so the f32 and f64 scans vectorize.
    fn scan<T: WithDType>(x: &Tensor, is_infinite: impl Fn(T) -> bool) -> Result<bool> {
        Ok(cpu::with_row_major::<T, _>(x, |values| {
            Ok(!values.iter().fold(false, |any, &v| any | is_infinite(v)))
        })?)
    }
    if !host_reads_are_free(x.device()) {
        return Ok(false);
    }
    match x.dtype() {
        DType::F32 => scan(x, f32::is_infinite),
        DType::F64 => scan(x, f64::is_infinite),
        DType::F16 => scan(x, half::f16::is_infinite),
        DType::BF16 => scan(x, half::bf16::is_infinite),
        _ => Ok(false),
    }
}

/// `log_p` with the entries of the rows that `mask` marks set to −∞ (`mask` broadcasts to
/// `log_p`'s shape); `log_p` itself without a mask.
pub(crate) fn minus_infinity_where(mask: Option<&Tensor>, log_p: Tensor) -> Result<Tensor> {
    let Some(mask) = mask else {
        return Ok(log_p);
    };
    let minus_infinity = (log_p.ones_like()? * f64::NEG_INFINITY)?;
    Ok(mask
        .broadcast_as(log_p.shape())?
        .where_cond(&minus_infinity, &log_p)?)
}

/// `v` in scientific notation with at most 3 significant digits (`1e-12`, `2.5e3`): bounds in
/// error messages, free of rounding noise such as `9.999999999999999e-13`.
pub(crate) fn short(v: f64) -> String {
    let text = format!("{v:.2e}");
    match text.split_once('e') {
        Some((mantissa, exponent)) if mantissa.contains('.') => {
            let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
            format!("{mantissa}e{exponent}")
        }
        _ => text,
    }
}

/// What the caller handed to a one-step constructor.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Given {
    Covariance,
    Precision,
}

impl Given {
    fn name(self) -> &'static str {
        match self {
            Given::Covariance => "covariance",
            Given::Precision => "precision",
        }
    }
}

/// One neuron's matrices on the host, f64, row-major.
struct HostNeuron {
    covariance: HostMatrix,
    precision: HostMatrix,
}

/// Checks one neuron's given matrix (symmetric, finite, positive definite) and returns both
/// its covariance and its precision.
fn host_neuron(block: &[f64], d: usize, neuron: usize, given: Given) -> Result<HostNeuron> {
    let name = given.name();
    if let Some(bad) = block.iter().find(|v| !v.is_finite()) {
        return Err(GaussError::data(
            name,
            format!("neuron {neuron}: the {name} matrix holds a non-finite value ({bad})"),
        ));
    }
    let scale = block.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let asymmetry = (0..d)
        .flat_map(|i| (0..i).map(move |j| (i, j)))
        .fold(0.0f64, |m, (i, j)| {
            m.max((block[i * d + j] - block[j * d + i]).abs())
        });
    if asymmetry > 1e-8 * scale {
        return Err(GaussError::data(
            name,
            format!(
                "neuron {neuron}: the {name} matrix must be symmetric, but entries differ from their transposes by up to {} (largest entry {})",
                short(asymmetry),
                short(scale)
            ),
        ));
    }
    let matrix = host::symmetric_block(block, d);
    let smallest = host::smallest_eigenvalue(&matrix, neuron)?;
    let inverse = if smallest > 0.0 {
        host::spd_inverse(&matrix)
    } else {
        None
    };
    let Some(inverse) = inverse else {
        return Err(GaussError::data(
            name,
            format!(
                "neuron {neuron}: the {name} matrix must be positive definite, but its smallest eigenvalue is {}",
                short(smallest)
            ),
        ));
    };
    Ok(match given {
        Given::Covariance => HostNeuron {
            covariance: matrix,
            precision: inverse,
        },
        Given::Precision => HostNeuron {
            covariance: inverse,
            precision: matrix,
        },
    })
}

/// Checks that `config` can hold the neuron, with errors that state the floors:
/// - a width floor σ holds only covariances whose every eigenvalue exceeds σ²;
/// - cholesky keeps the diagonal of the Cholesky factor of (the base) `P` above
///   `factor_diag_floor`, so precision eigenvalues below about `floor²` (variances above
///   about `1/floor²`) are out of reach.
fn check_representable(
    host: &HostNeuron,
    d: usize,
    config: &GaussLayerConfig,
    neuron: usize,
) -> Result<()> {
    let min_variance = host::smallest_eigenvalue(&host.covariance, neuron)?;
    let base_precision = match config.precision.width_floor {
        None => host.precision.clone(),
        Some(sigma) => {
            let s2 = sigma * sigma;
            let base = HostMatrix::from_fn(d, d, |i, j| {
                host.covariance[(i, j)] - if i == j { s2 } else { 0.0 }
            });
            let base_min = host::smallest_eigenvalue(&base, neuron)?;
            let inverse = if base_min > 0.0 {
                host::spd_inverse(&base)
            } else {
                None
            };
            match inverse {
                Some(p) => p,
                None => {
                    return Err(GaussError::config(
                        "width_floor",
                        format!(
                            "neuron {neuron}: with width_floor σ = {} the layer holds covariances whose every eigenvalue exceeds σ² = {}, but the smallest eigenvalue of this covariance is {}; lower or unset `width_floor`",
                            short(sigma),
                            short(s2),
                            short(min_variance)
                        ),
                    ))
                }
            }
        }
    };
    if config.precision.parameterization != Parameterization::Cholesky {
        return Ok(());
    }
    let floor = config.precision.factor_diag_floor;
    let below = host::cholesky_diagonal(&base_precision)
        .map(|diagonal| diagonal.into_iter().enumerate().find(|&(_, v)| v <= floor))
        .unwrap_or(Some((0, f64::NAN)));
    if let Some((row, value)) = below {
        let min_precision = host::smallest_eigenvalue(&base_precision, neuron)?;
        return Err(GaussError::config(
            "factor_diag_floor",
            format!(
                "neuron {neuron}: the cholesky parameterization keeps every diagonal entry of P's Cholesky factor above factor_diag_floor = {}, so it holds precisions whose eigenvalues are above about floor² = {} (variances below about {}); this matrix has Cholesky diagonal {} at row {row}, smallest precision eigenvalue {} (largest variance {}). Rescale the data, lower `factor_diag_floor` (0 is allowed), or use the expm, direct or diag parameterization",
                short(floor),
                short(floor * floor),
                short(1.0 / (floor * floor)),
                short(value),
                short(min_precision),
                short(1.0 / min_precision),
            ),
        ));
    }
    Ok(())
}

/// Checks on the host that `config` can hold the precision matrices `values` ((Z, d, d),
/// row-major, f64): the errors of [`GaussLayer::from_precision`], which state the floors.
pub(crate) fn check_precision_blocks(
    values: &[f64],
    z: usize,
    d: usize,
    config: &GaussLayerConfig,
) -> Result<()> {
    for neuron in 0..z {
        let block = &values[neuron * d * d..(neuron + 1) * d * d];
        let host = host_neuron(block, d, neuron, Given::Precision)?;
        check_representable(&host, d, config, neuron)?;
    }
    Ok(())
}

/// Refuses a non-finite mean (its log-density would be NaN everywhere), naming the element:
/// `means` holds Z rows of `d` values, given as one mean (d) when `one_neuron`.
fn check_finite_means(means: &[f64], d: usize, one_neuron: bool) -> Result<()> {
    let Some(at) = means.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let element = if one_neuron {
        format!("mean[{at}]")
    } else {
        format!("mean[{}][{}]", at / d, at % d)
    };
    Err(GaussError::data(
        "mean",
        format!(
            "{element} is {}; every element of a mean must be finite",
            means[at]
        ),
    ))
}

/// Checks `mean` (Z, d) or (d) against `matrix` (Z, d, d) or (d, d); returns them as
/// (Z, d) and (Z, d, d).
fn neuron_batch(mean: &Tensor, matrix: &Tensor, given: Given) -> Result<(Tensor, Tensor)> {
    let name = given.name();
    let (mean, matrix) = match (mean.dims(), matrix.dims()) {
        (&[d], &[r, c]) if d >= 1 && r == d && c == d => (mean.unsqueeze(0)?, matrix.unsqueeze(0)?),
        (&[z, d], &[zz, r, c]) if z >= 1 && d >= 1 && zz == z && r == d && c == d => {
            (mean.clone(), matrix.clone())
        }
        (&[d], _) if d >= 1 => {
            return Err(GaussError::shape(
                name,
                format!("({d}, {d}) for a mean of shape ({d})"),
                matrix.dims(),
            ))
        }
        (&[z, d], _) if z >= 1 && d >= 1 => {
            return Err(GaussError::shape(
                name,
                format!("({z}, {d}, {d}) for means of shape ({z}, {d})"),
                matrix.dims(),
            ))
        }
        (dims, _) => {
            return Err(GaussError::shape(
                "mean",
                "(Z, d) or (d) with Z, d >= 1",
                dims,
            ))
        }
    };
    check_float_dtype("mean", mean.dtype())?;
    check_dtype(name, &matrix, mean.dtype(), "mean")?;
    check_device(name, &matrix, mean.device(), "mean")?;
    Ok((mean, matrix))
}

impl GaussLayer {
    /// A Gaussian-only layer whose neuron `z` is N(`mean[z]`, `covariance[z]`): the one-step
    /// way to hold a known normal (or Z of them) as a layer, in any parameterization.
    ///
    /// The layer is Gaussian-only whatever `config.gaussian_only` says (a density has no
    /// linear part; `tanh` and `tied_bias` must be false); the other fields (parameterization,
    /// floors, kernel) are used as given. The precision is computed on the host in f64 and
    /// stored in the dtype and on the device of `mean`.
    ///
    /// # Shapes
    /// `mean`: (Z, d) with `covariance`: (Z, d, d); or `mean`: (d) with `covariance`: (d, d)
    /// for one neuron.
    ///
    /// # Errors
    /// Shapes, dtypes or devices that do not match; a mean that is not finite
    /// ([`GaussError::Data`] naming the element); a covariance that is not finite,
    /// symmetric (to 1e-8 relative) and positive definite; a covariance the config cannot
    /// hold, with the floor named and its bound stated: `width_floor` σ (every covariance
    /// eigenvalue must exceed σ²), cholesky's `factor_diag_floor` f (variances up to about
    /// 1/f², 1e12 at the default f = 1e-6), diag (diagonal covariances only), sphere
    /// (multiples of the identity only).
    pub fn from_covariance(
        mean: &Tensor,
        covariance: &Tensor,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        Self::from_matrices(mean, covariance, config, Given::Covariance)
    }

    /// A Gaussian-only layer whose neuron `z` is N(`mean[z]`, `precision[z]⁻¹`); as
    /// [`GaussLayer::from_covariance`] with the precision given instead.
    ///
    /// `precision` is the effective precision: with a width floor σ, it must be narrower
    /// than σ allows in no direction (see [`crate::Precision`]).
    ///
    /// # Shapes
    /// `mean`: (Z, d) with `precision`: (Z, d, d); or `mean`: (d) with `precision`: (d, d).
    ///
    /// # Errors
    /// As [`GaussLayer::from_covariance`], for the precision matrix.
    pub fn from_precision(
        mean: &Tensor,
        precision: &Tensor,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        Self::from_matrices(mean, precision, config, Given::Precision)
    }

    /// A Gaussian-only lowrank layer whose neuron `z` has mean `mean[z]` and precision
    /// `diag(diagonal[z]) + U_z U_zᵀ`, from the parts directly (no factorization); see
    /// [`Precision::from_low_rank`].
    ///
    /// # Shapes
    /// `mean`: (Z, d), `diagonal`: (Z, d), `factor` U: (Z, d, r) with `config` lowrank:r.
    ///
    /// # Errors
    /// As [`Precision::from_low_rank`]; a mean of another shape, dtype or device.
    pub fn from_low_rank(
        mean: &Tensor,
        diagonal: &Tensor,
        factor: &Tensor,
        config: GaussLayerConfig,
    ) -> Result<Self> {
        let config = GaussLayerConfig {
            gaussian_only: true,
            ..config
        };
        config.validate()?;
        let precision = Precision::from_low_rank(diagonal, factor, &config)?;
        GaussLayer::new(None, None, mean.contiguous()?, precision, config)
    }

    fn from_matrices(
        mean: &Tensor,
        matrix: &Tensor,
        config: GaussLayerConfig,
        given: Given,
    ) -> Result<Self> {
        let one_neuron = mean.rank() == 1;
        let config = GaussLayerConfig {
            gaussian_only: true,
            ..config
        };
        config.validate()?;
        let (mean, matrix) = neuron_batch(mean, matrix, given)?;
        let (z, d) = mean.dims2()?;
        // One read for both: the means ride along with the matrices, which are read anyway.
        let block = d * d;
        let both = Tensor::cat(&[&matrix.reshape((z, block))?, &mean], 1)?;
        let both = host::to_host_values(&both)?;
        let mut values = Vec::with_capacity(z * block);
        let mut means = Vec::with_capacity(z * d);
        for row in both.chunks(block + d) {
            values.extend_from_slice(&row[..block]);
            means.extend_from_slice(&row[block..]);
        }
        check_finite_means(&means, d, one_neuron)?;
        let mut precision = Vec::with_capacity(z * d * d);
        for neuron in 0..z {
            let host = host_neuron(
                &values[neuron * d * d..(neuron + 1) * d * d],
                d,
                neuron,
                given,
            )?;
            check_representable(&host, d, &config, neuron)?;
            for i in 0..d {
                for j in 0..d {
                    precision.push(match given {
                        // Keep the caller's precision bit for bit.
                        Given::Precision => values[neuron * d * d + i * d + j],
                        Given::Covariance => host.precision[(i, j)],
                    });
                }
            }
        }
        let precision = Tensor::from_vec(precision, (z, d, d), &candle_core::Device::Cpu)?;
        let precision = Precision::from_precision_matrix(&precision, &config)?;
        let precision = precision.with_raw(
            precision
                .raw()
                .to_dtype(mean.dtype())?
                .to_device(mean.device())?,
        )?;
        GaussLayer::new(None, None, mean.contiguous()?, precision, config)
    }

    /// Normalized log-density of `x` under each neuron's normal N(c_z, P_z⁻¹):
    /// `−m2/2 + ½·log det P_z − ½·d·log 2π`, with `m2` from the layer's distance kernel.
    /// For a layer with a linear part the density is that of its Gaussian factor.
    ///
    /// A sample holding ±∞ (and no NaN) gets −∞ under every neuron, as in the density views
    /// and torch: the layer's distance kernels alone would give NaN (`∞ − ∞`), so such rows
    /// are zeroed before the kernel and set to −∞ after it (no ∞ reaches the gradient). On
    /// the CPU one scan of `x` decides whether any row needs it; elsewhere, and for a
    /// `portable` layer, the masking runs in tensor ops (no read back). Input is not checked for NaN (a NaN sample
    /// gives NaN); [`GaussLayer::log_prob_validated`] and [`crate::MultivariateNormal`] (on
    /// by default) check it, as torch's `validate_args`.
    ///
    /// # Accuracy
    /// In f64 the result matches SciPy to about 1e-14 at condition number κ ≤ 1e2 and 1e-9 at
    /// κ = 1e8. In f32 the parameterizations that store a factor or a logarithm (cholesky,
    /// expm, diag, sphere, lowrank) stay about a thousand times more accurate than `direct`
    /// on ill-conditioned precisions (measured on 2026-12-04), because `direct` stores `P`
    /// itself: rounding its entries to f32 (relative 6e-8) already moves the
    /// smallest eigenvalue by up to about 6e-8·λ_max, so its densities err by about
    /// κ·6e-8 relative (measured 4.9e-3 at κ = 1e6, 1.3e-1 at κ = 1e8), and no factorization
    /// of the stored matrix can recover what the rounding lost. For ill-conditioned
    /// precisions in f32 use cholesky or expm, or keep `direct` in f64.
    ///
    /// # Shapes
    /// `x`: (…, d) → (…, Z)
    ///
    /// # Errors
    /// `x` not ending in d or of another dtype than the layer; a `direct` precision that is
    /// not positive definite (see [`crate::repair`]).
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let (d, z) = (self.in_features(), self.out_features());
        let (flat, leading) = flatten_leading(x, d, "input x")?;
        let out_shape = with_tail(&leading, &[z]);
        if flat.dims()[0] == 0 {
            return Ok(Tensor::zeros(out_shape, x.dtype(), x.device())?);
        }
        if self.precision().parameterization() == Parameterization::Direct {
            repair::ensure_positive_definite(self.precision())?;
        }
        // Checked before `infinite_rows` computes with `x` (an integer `x` would get there).
        check_dtype("input x", &flat, self.center().dtype(), "center")?;
        check_device(
            "input x",
            &flat,
            self.center().device(),
            "the layer's center",
        )?;
        let (infinite, finite) = infinite_rows(&flat, self.config().precision.portable)?;
        let m2 = self.mahalanobis_sq(&finite)?;
        let log_det = self.precision().log_det_precision()?;
        let log_p = log_prob_from_mahalanobis(&m2, &log_det, d)?;
        Ok(minus_infinity_where(infinite.as_ref(), log_p)?.reshape(out_shape)?)
    }

    /// A matrix `A_z` per neuron with `A_z A_zᵀ = Σ_z`, or the standard deviations when the
    /// precision is diagonal.
    pub(crate) fn covariance_root(&self) -> Result<CovarianceRoot> {
        let precision = self.precision();
        if let Some(p) = precision.diagonal_precision()? {
            return Ok(CovarianceRoot::Diagonal(p.recip()?.sqrt()?));
        }
        if precision.is_factor_lower_triangular() {
            if let Some(lower) = precision.factor()? {
                // P = L Lᵀ ⇒ Σ = L⁻ᵀ L⁻¹ = (L⁻ᵀ)(L⁻ᵀ)ᵀ.
                return Ok(CovarianceRoot::Full(linalg::transpose(
                    &linalg::tril_inverse(&lower)?,
                )?));
            }
        }
        if precision.parameterization() == Parameterization::Direct {
            repair::ensure_positive_definite(precision)?;
        }
        Ok(CovarianceRoot::Full(linalg::cholesky(
            &precision.covariance_matrix()?,
        )?))
    }

    /// `n` independent draws from each neuron's normal N(c_z, P_z⁻¹): `c_z + A_z ε` with
    /// `A_z A_zᵀ = Σ_z` and `ε` standard normal, drawn on the host from `rng` (so a seeded
    /// `rng` gives the same draws on every device), then moved to the layer's dtype and
    /// device.
    ///
    /// # Shapes
    /// → (n, Z, d)
    ///
    /// # Errors
    /// A `direct` precision that is not positive definite; (field `n`) an `n` whose draws
    /// need more elements than one allocation holds.
    pub fn sample<R: Rng + ?Sized>(&self, n: usize, rng: &mut R) -> Result<Tensor> {
        let (z, d) = (self.out_features(), self.in_features());
        check_draw_count(n, z * d)?;
        let center = self.center();
        let noise: Vec<f64> = (0..n * z * d).map(|_| rng.sample(StandardNormal)).collect();
        let noise = host::from_host(noise, &[n, z, d], center.dtype(), center.device())?;
        let spread = match self.covariance_root()? {
            CovarianceRoot::Diagonal(std) => noise.broadcast_mul(&std.unsqueeze(0)?)?,
            CovarianceRoot::Full(root) => {
                // (Z, d, d) × (Z, d, n) → (Z, d, n) → (n, Z, d).
                let columns = noise.permute((1, 2, 0))?.contiguous()?;
                linalg::matmul(&root, &columns)?.permute((2, 0, 1))?
            }
        };
        Ok(spread.broadcast_add(&center.unsqueeze(0)?)?.contiguous()?)
    }
}

/// Refuses `n` draws of `per_draw` values each whose noise no allocation holds: the element
/// count `n * per_draw` overflowed usize (a panic) or the host `Vec` aborted the process.
pub(crate) fn check_draw_count(n: usize, per_draw: usize) -> Result<()> {
    let limit = crate::config::MAX_TENSOR_ELEMENTS;
    if n.checked_mul(per_draw).is_none_or(|count| count > limit) {
        return Err(GaussError::config(
            "n",
            format!(
                "{n} draws of {per_draw} values each need more than the {limit} elements one allocation holds; draw fewer"
            ),
        ));
    }
    Ok(())
}

/// See [`GaussLayer::covariance_root`].
pub(crate) enum CovarianceRoot {
    /// Standard deviations (Z, d).
    Diagonal(Tensor),
    /// `A` (Z, d, d) with `A Aᵀ = Σ`.
    Full(Tensor),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::log_normalizer;
    use crate::testing::relative_error;
    use candle_core::{DType, Device};

    #[test]
    fn log_prob_of_a_standard_normal_is_closed_form() -> Result<()> {
        let dev = Device::Cpu;
        for parameterization in Parameterization::ALL {
            let config = GaussLayerConfig::with_parameterization(parameterization);
            let mean = Tensor::zeros(3, DType::F64, &dev)?;
            let eye = Tensor::eye(3, DType::F64, &dev)?;
            let layer = GaussLayer::from_covariance(&mean, &eye, config)?;
            let x = Tensor::new(&[[1.0f64, 2.0, -2.0], [0.0, 0.0, 0.0]], &dev)?;
            // −|x|²/2 − (3/2)·log 2π.
            let expected = Tensor::new(&[[-4.5 - log_normalizer(3)], [-log_normalizer(3)]], &dev)?;
            let err = relative_error(&layer.log_prob(&x)?, &expected)?;
            assert!(err < 1e-12, "{parameterization}: {err}");
        }
        Ok(())
    }

    #[test]
    fn shapes_follow_linear() -> Result<()> {
        let dev = Device::Cpu;
        let mean = Tensor::zeros((4, 3), DType::F32, &dev)?;
        let cov = Tensor::eye(3, DType::F32, &dev)?
            .unsqueeze(0)?
            .repeat((4, 1, 1))?;
        let layer = GaussLayer::from_covariance(&mean, &cov, GaussLayerConfig::default())?;
        for dims in [vec![3], vec![5, 3], vec![2, 5, 3], vec![0, 3]] {
            let x = Tensor::zeros(dims.as_slice(), DType::F32, &dev)?;
            let mut expected = dims.clone();
            *expected.last_mut().unwrap() = 4;
            assert_eq!(layer.log_prob(&x)?.dims(), expected.as_slice());
        }
        let bad = Tensor::zeros((2, 4), DType::F32, &dev)?;
        let err = layer.log_prob(&bad).unwrap_err().to_string();
        assert!(err.contains("(…, 3)"), "{err}");
        Ok(())
    }

    /// A non-finite mean is refused, naming the element, by both constructors, for one
    /// neuron and a batch, as the non-finite covariance is: it was accepted, and every
    /// log-density was then NaN (the covariance was checked for finiteness, the mean not).
    #[test]
    fn non_finite_means_are_refused_naming_the_element() -> Result<()> {
        let dev = Device::Cpu;
        let eye = Tensor::eye(2, DType::F32, &dev)?;
        let eyes = eye.unsqueeze(0)?.repeat((2, 1, 1))?;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let one = Tensor::new(&[0.0f32, bad], &dev)?;
            let two = Tensor::new(&[[0.0f32, 0.0], [bad, 1.0]], &dev)?;
            for (mean, matrix, element) in [(&one, &eye, "mean[1]"), (&two, &eyes, "mean[1][0]")] {
                for result in [
                    GaussLayer::from_covariance(mean, matrix, GaussLayerConfig::default()),
                    GaussLayer::from_precision(mean, matrix, GaussLayerConfig::default()),
                ] {
                    match result {
                        Err(GaussError::Data { origin, reason }) => {
                            assert_eq!(origin, "mean");
                            assert!(
                                reason.starts_with(&format!("{element} is {bad}")),
                                "{reason}"
                            );
                        }
                        other => panic!(
                            "mean {bad} at {element}: expected a Data error, got {:?}",
                            other.map(|l| l.out_features())
                        ),
                    }
                }
            }
        }
        // Finite means (a batch, a view, a transposed one) are taken as they are.
        let means = Tensor::new(&[[0.0f32, 1.0], [2.0, 3.0]], &dev)?.t()?;
        let layer = GaussLayer::from_covariance(&means, &eyes, GaussLayerConfig::default())?;
        assert_eq!(layer.center().to_vec2::<f32>()?, [[0.0, 2.0], [1.0, 3.0]]);
        Ok(())
    }

    /// A draw count whose noise no allocation holds is a config error naming `n`, from the
    /// layer, the distribution views and a mixture: `n * Z * d` overflowed (a panic) at
    /// `usize::MAX`, and at 2^62 the host `Vec` of noise panicked ("capacity overflow").
    #[test]
    fn draw_counts_beyond_one_allocation_are_refused() -> Result<()> {
        let mean = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let eye = Tensor::eye(3, DType::F32, &Device::Cpu)?
            .unsqueeze(0)?
            .repeat((2, 1, 1))?;
        let layer = GaussLayer::from_covariance(&mean, &eye, GaussLayerConfig::default())?;
        let weights = Tensor::new(&[0.5f32, 0.5], &Device::Cpu)?;
        let mixture = crate::GaussianMixture::new(layer.clone(), weights.log()?)?;
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let is_n_error = |result: Result<Tensor>| match result {
            Err(GaussError::InvalidConfig { field: "n", .. }) => {}
            other => panic!(
                "expected a config error naming n, got {:?}",
                other.map(|t| t.dims().to_vec())
            ),
        };
        for n in [usize::MAX, 1 << 62] {
            is_n_error(layer.sample(n, &mut rng));
            is_n_error(layer.distributions()?.rsample(n, &mut rng));
            is_n_error(layer.distribution(1)?.sample(n, &mut rng));
            is_n_error(mixture.sample(n, &mut rng));
        }
        assert_eq!(layer.sample(2, &mut rng)?.dims(), [2, 2, 3]);
        assert_eq!(mixture.sample(2, &mut rng)?.dims(), [2, 3]);
        Ok(())
    }
}
