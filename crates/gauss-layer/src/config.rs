//! Layer configuration: a plain struct with [`Default`], validated once, serializable so that
//! checkpoints can embed it.
//!
//! ```
//! use gauss_layer::{GaussLayerConfig, Parameterization, PrecisionConfig};
//! let config = GaussLayerConfig {
//!     precision: PrecisionConfig {
//!         parameterization: Parameterization::Diag,
//!         width_floor: Some(0.05),
//!         ..Default::default()
//!     },
//!     tanh: true,
//!     ..Default::default()
//! };
//! // The common case in one call:
//! let cholesky = GaussLayerConfig::with_parameterization(Parameterization::Cholesky);
//! assert_eq!(cholesky, GaussLayerConfig::default());
//! config.validate().unwrap();
//! let json = serde_json::to_string(&config).unwrap();
//! let back: GaussLayerConfig = serde_json::from_str(&json).unwrap();
//! assert_eq!(config, back);
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{GaussError, Result};

/// How each neuron's precision matrix `P` is stored and mapped to a positive-definite matrix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Parameterization {
    /// `P = L Lᵀ`, `L` lower triangular with its diagonal mapped through a positive map plus a
    /// floor. Positive definite for every finite raw value.
    #[default]
    Cholesky,
    /// `P = (A + Aᵀ)/2`, `A` stored directly. Not always positive definite: check and repair
    /// it after optimizer steps (see [`crate::repair`]).
    Direct,
    /// `P = expm((A + Aᵀ)/2)`. Positive definite; `log det P = tr A`.
    Expm,
    /// `P = diag(exp θ)`.
    Diag,
    /// `P = exp(θ) I`.
    Sphere,
    /// `P = diag(exp θ) + U Uᵀ` with `U` of `rank` columns: between diag and the full forms,
    /// O(d·(rank + 1)) per neuron and input (see [`crate::Precision`]). Positive definite for
    /// every finite raw value. Written `lowrank:R` on command lines
    /// ([`Parameterization::from_name`]) and `{"lowrank": {"rank": R}}` in JSON configs.
    #[serde(rename = "lowrank")]
    LowRank {
        /// Columns of `U`, at least 1.
        rank: usize,
    },
}

impl Parameterization {
    /// All parameterizations, in a fixed order (lowrank with rank 2 standing for its family).
    pub const ALL: [Parameterization; 6] = [
        Parameterization::Cholesky,
        Parameterization::Direct,
        Parameterization::Expm,
        Parameterization::Diag,
        Parameterization::Sphere,
        Parameterization::LowRank { rank: 2 },
    ];

    /// The lower-case name used in configs, CLIs and reference files.
    pub fn name(self) -> &'static str {
        match self {
            Parameterization::Cholesky => "cholesky",
            Parameterization::Direct => "direct",
            Parameterization::Expm => "expm",
            Parameterization::Diag => "diag",
            Parameterization::Sphere => "sphere",
            Parameterization::LowRank { .. } => "lowrank",
        }
    }
}

impl Parameterization {
    /// One line on what the parameterization stores, for help texts.
    pub fn summary(self) -> &'static str {
        match self {
            Parameterization::Cholesky => {
                "P = L Lᵀ, L lower triangular (d(d+1)/2 values per neuron)"
            }
            Parameterization::Direct => {
                "P = (A + Aᵀ)/2 stored directly (d² values; positive definite only if repaired)"
            }
            Parameterization::Expm => "P = expm((A + Aᵀ)/2) (d² values per neuron)",
            Parameterization::Diag => "P = diag(exp θ): axis-aligned (d values per neuron)",
            Parameterization::Sphere => "P = exp(θ) I: round (1 value per neuron)",
            Parameterization::LowRank { .. } => {
                "P = diag(exp θ) + U Uᵀ, U with R columns (d·(R+1) values per neuron)"
            }
        }
    }

    /// The parameterization called `name` ([`Parameterization::name`], or `lowrank:R`), with
    /// lowrank's rank given apart as command lines take it (`--param lowrank --rank 8`).
    ///
    /// ```
    /// use gauss_layer::Parameterization;
    /// assert_eq!(Parameterization::from_name("diag", None)?, Parameterization::Diag);
    /// let low_rank = Parameterization::from_name("lowrank", Some(8))?;
    /// assert_eq!(low_rank, Parameterization::LowRank { rank: 8 });
    /// assert!(Parameterization::from_name("lowrank", None).is_err());
    /// assert!(Parameterization::from_name("diag", Some(8)).is_err());
    /// # Ok::<(), gauss_layer::GaussError>(())
    /// ```
    ///
    /// # Errors
    /// [`GaussError::InvalidConfig`]: an unknown name, lowrank without a rank (or rank 0), or
    /// a rank given for a parameterization that has none.
    pub fn from_name(name: &str, rank: Option<usize>) -> Result<Self> {
        match (name, rank) {
            ("lowrank", Some(rank)) => format!("lowrank:{rank}").parse(),
            ("lowrank", None) => Err(GaussError::config(
                "parameterization",
                "lowrank needs a rank R >= 1 (`rank`, or the name `lowrank:R`; `--rank R` in the example binaries)",
            )),
            (other, None) => other.parse(),
            // An unknown name is reported as such, before the rank.
            (other, Some(rank)) => match other.parse::<Parameterization>()? {
                Parameterization::LowRank { .. } => Err(GaussError::config(
                    "parameterization",
                    format!("{other:?} names its rank already; `rank` ({rank}) gives it twice"),
                )),
                parsed => Err(GaussError::config(
                    "parameterization",
                    format!("a rank ({rank}) is only meaningful for lowrank, got `{parsed}`"),
                )),
            },
        }
    }
}

impl std::fmt::Display for Parameterization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Parameterization::LowRank { rank } => write!(f, "lowrank:{rank}"),
            other => f.write_str(other.name()),
        }
    }
}

impl std::str::FromStr for Parameterization {
    type Err = GaussError;
    /// Parses `cholesky`, `direct`, `expm`, `diag`, `sphere` or `lowrank:R` (R ≥ 1).
    fn from_str(s: &str) -> Result<Self> {
        if let Some(rank) = s.strip_prefix("lowrank") {
            let rank = rank.strip_prefix(':').and_then(|r| r.parse::<usize>().ok());
            return match rank {
                Some(rank) if rank >= 1 => Ok(Parameterization::LowRank { rank }),
                _ => Err(GaussError::config(
                    "parameterization",
                    format!("lowrank needs its rank as `lowrank:R` with R >= 1, got {s:?}"),
                )),
            };
        }
        Parameterization::ALL
            .into_iter()
            .find(|p| p.name() == s && !matches!(p, Parameterization::LowRank { .. }))
            .ok_or_else(|| {
                GaussError::config(
                    "parameterization",
                    format!(
                        "must be one of cholesky, direct, expm, diag, sphere, lowrank:R; got {s:?}"
                    ),
                )
            })
    }
}

/// The positive map applied to the diagonal of the Cholesky factor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositiveMap {
    /// `softplus(r) = log(1 + e^r)`: gradients stay bounded for large raw values.
    #[default]
    Softplus,
    /// `exp(r)`.
    Exp,
}

/// Which form of the squared Mahalanobis distance the layer uses (`docs/design.md` §4 has
/// the table of what `Auto` picks per parameterization and device;
/// [`crate::GaussLayer::resolved_kernel`] reports what runs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistanceKernel {
    /// Pick by parameterization, shape and a cheap conditioning check.
    #[default]
    Auto,
    /// One GEMM of the inputs against the stacked factors (needs a factor `P = F Fᵀ`).
    Projected,
    /// `<x⊗x, P> - 2 x·(P c) + cᵀ P c` over the d(d+1)/2 distinct products (centered, clamped).
    ///
    /// Forced, it loses digits by cancellation when the centers are far apart or `P` is ill
    /// conditioned (in f32 with centers 1e3 apart, `g` was off by up to 0.7): `Auto` takes it
    /// only where its conditioning check allows.
    Expanded,
    /// The (B, Z, d) broadcast form. Slow and memory hungry: a test oracle.
    Naive,
}

/// Initialization of a freshly created layer (FGN defaults).
///
/// Deserialization is strict (see [`GaussLayerConfig`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// Standard deviation of the centers, drawn from N(0, std²). FGN: 0.1.
    pub center_std: f64,
    /// Initial precision `P ≈ precision_scale · I`; `None` means `1 / in_features`. The forms
    /// that store `ln P` (diag, sphere, lowrank, expm) need `|ln precision_scale| ≤ ½ ln M` of
    /// the dtype: in f16 ±5.5449, so the default fits up to 255 inputs.
    #[serde(deserialize_with = "required_option")]
    pub precision_scale: Option<f64>,
    /// Size of the tiny symmetric random perturbation added to the initial precision
    /// (relative to `precision_scale`), so that neurons are not exactly alike.
    pub perturbation: f64,
    /// Seed of every random draw of the initialization (weights, bias, centers, precision
    /// perturbation). `Some`: the values come from a seeded host generator (see
    /// [`crate::layer_seed`]) and are moved to the layer's device and dtype, so a seed gives
    /// bit-identical layers on every run and device. `None` (the default): Candle's generator
    /// on the layer's device, which cannot be seeded on the CPU. A [`crate::GaussNet`] gives
    /// layer `i` the seed [`crate::init::layer_seed`]`(seed, i)`.
    #[serde(deserialize_with = "required_option")]
    pub seed: Option<u64>,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            center_std: 0.1,
            precision_scale: None,
            perturbation: 1e-3,
            seed: None,
        }
    }
}

/// How a layer's precision is stored and where it is computed: the map from the raw
/// precision tensor to the precision matrices, which a [`crate::Precision`] carries and a
/// [`GaussLayerConfig`] holds as its `precision`.
///
/// Deserialization is strict (see [`GaussLayerConfig`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecisionConfig {
    /// How the precision is stored. Default: [`Parameterization::Cholesky`].
    pub parameterization: Parameterization,
    /// Positive map of the Cholesky diagonal. Default: softplus.
    pub positive_map: PositiveMap,
    /// Added to the mapped Cholesky diagonal (`L_ii = map(raw_ii) + floor`), so `P` stays
    /// positive definite with a margin. Must be `>= 0`. Default `1e-6`.
    pub factor_diag_floor: f64,
    /// Smallest width (standard deviation) the Gaussian may take, or `None`. A floor keeps a
    /// neuron's gradient alive so it can always grow back. Must be `> 0` when set.
    #[serde(deserialize_with = "required_option")]
    pub width_floor: Option<f64>,
    /// Run the portable tensor-op forms of the kernels (what CUDA and Metal run) even on the
    /// CPU, instead of the fused CPU ops. The full forms (cholesky, direct, expm) agree with
    /// the fused ops to rounding; the diagonal forms (diag, sphere and lowrank's diagonal)
    /// expand `|x|² − 2x·c + |c|²` as `torch.cdist` does, which loses digits when the centers
    /// are spread far from each other (f32, P = I/2, one center 1e4 away among centers near 0.5: `m2` off by
    /// up to 0.63; `kernels/diagonal.rs` states the bound; [`DistanceKernel::Naive`] is
    /// exact). The fused ops are faster. Default `false`. Useful to test the GPU path on a
    /// machine without a GPU.
    pub portable: bool,
}

impl Default for PrecisionConfig {
    fn default() -> Self {
        Self {
            parameterization: Parameterization::Cholesky,
            positive_map: PositiveMap::Softplus,
            factor_diag_floor: 1e-6,
            width_floor: None,
            portable: false,
        }
    }
}

/// A layer config's precision part, so the [`crate::Precision`] constructors take either.
impl From<&GaussLayerConfig> for PrecisionConfig {
    fn from(config: &GaussLayerConfig) -> Self {
        config.precision
    }
}

impl PrecisionConfig {
    /// The default config with another parameterization: the common case in one call.
    pub fn with_parameterization(parameterization: Parameterization) -> Self {
        Self {
            parameterization,
            ..Self::default()
        }
    }

    /// Checks that the precision can work. Fields are named as in a [`GaussLayerConfig`]
    /// (`precision.width_floor`).
    ///
    /// # Errors
    /// [`GaussError::InvalidConfig`] naming the field: a negative or non-finite
    /// `factor_diag_floor`, a non-positive or non-finite `width_floor`, a lowrank rank of 0,
    /// a width floor with lowrank.
    pub fn validate(&self) -> Result<()> {
        check_finite_non_negative("precision.factor_diag_floor", self.factor_diag_floor)?;
        if let Some(width) = self.width_floor {
            check_finite_positive("precision.width_floor", width)?;
        }
        if let Parameterization::LowRank { rank } = self.parameterization {
            if rank == 0 {
                return Err(GaussError::config(
                    "precision.parameterization",
                    "lowrank needs rank >= 1, got 0",
                ));
            }
            if self.width_floor.is_some() {
                return Err(GaussError::config(
                    "precision.width_floor",
                    "is not supported with the lowrank parameterization (its effective precision would not stay diagonal plus low rank); leave it None",
                ));
            }
        }
        Ok(())
    }
}

/// The most elements one tensor of a layer may have: its f64 storage (8 bytes an element, the
/// widest float dtype) must stay within `isize::MAX` bytes, the limit of one allocation.
pub(crate) const MAX_TENSOR_ELEMENTS: usize = isize::MAX as usize / 8;

/// Configuration of one [`crate::GaussLayer`].
///
/// Deserialization is strict: every field must be present (an `Option` as `null` or a value)
/// and an unknown field is an error naming it, so a damaged or hand-edited config never
/// loads a different network with defaults in place of what was written. In Rust, start from
/// [`Default`] and set the fields you need; checkpoints written by older versions are upgraded
/// by [`crate::checkpoint`] (its table of added and moved fields).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GaussLayerConfig {
    /// How the precision is stored and where it is computed. Default: Cholesky factor,
    /// softplus diagonal, fused CPU ops.
    pub precision: PrecisionConfig,
    /// `tanh` on the linear part: `y = tanh(Wx + b) · g`.
    pub tanh: bool,
    /// Tied bias `b = -W·c`: the linear part's zero line passes through the center.
    pub tied_bias: bool,
    /// Gaussian-only output `y = g` (an RBF layer, no linear part).
    pub gaussian_only: bool,
    /// Which distance kernel to use. Default: automatic.
    pub kernel: DistanceKernel,
    /// Initialization of a freshly created layer.
    pub init: InitConfig,
}

/// Deserializes an `Option` field that must be present, as `null` or a value. Serde takes a
/// missing `Option` field for `None`; with `deserialize_with` it is an error like any missing
/// field, which strict configs need (a dropped `width_floor` must not load a network without
/// its floor).
pub(crate) fn required_option<'de, D, T>(
    deserializer: D,
) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer)
}

fn check_finite_non_negative(field: &'static str, value: f64) -> Result<()> {
    if !value.is_finite() || value < 0.0 {
        return Err(GaussError::config(
            field,
            format!("must be finite and >= 0, got {value}"),
        ));
    }
    Ok(())
}

fn check_finite_positive(field: &'static str, value: f64) -> Result<()> {
    if !value.is_finite() || value <= 0.0 {
        return Err(GaussError::config(
            field,
            format!("must be finite and > 0, got {value}"),
        ));
    }
    Ok(())
}

impl GaussLayerConfig {
    /// The default config with another parameterization: the common case in one call.
    pub fn with_parameterization(parameterization: Parameterization) -> Self {
        Self {
            precision: PrecisionConfig::with_parameterization(parameterization),
            ..Self::default()
        }
    }

    /// Checks that the config can work; called once by the constructors.
    ///
    /// # Errors
    /// [`GaussError::InvalidConfig`] naming the first field that cannot work.
    pub fn validate(&self) -> Result<()> {
        self.precision.validate()?;
        check_finite_non_negative("init.center_std", self.init.center_std)?;
        check_finite_non_negative("init.perturbation", self.init.perturbation)?;
        if let Some(scale) = self.init.precision_scale {
            check_finite_positive("init.precision_scale", scale)?;
        }
        if self.gaussian_only && (self.tanh || self.tied_bias) {
            return Err(GaussError::config(
                "gaussian_only",
                "has no linear part, so `tanh` and `tied_bias` must be false",
            ));
        }
        if self.kernel == DistanceKernel::Projected
            && matches!(
                self.precision.parameterization,
                Parameterization::Direct | Parameterization::LowRank { .. }
            )
        {
            return Err(GaussError::config(
                "kernel",
                format!(
                    "`projected` needs a square factor P = F Fᵀ, which the `{}` parameterization does not keep; use `auto`, `expanded` or `naive`",
                    self.precision.parameterization.name()
                ),
            ));
        }
        Ok(())
    }

    /// Checks the layer sizes together with the config.
    ///
    /// # Errors
    /// As [`GaussLayerConfig::validate`]; also zero `in_features` or `out_features`, and
    /// (field `size`) sizes whose weight, center or precision tensor has more elements than
    /// one allocation can hold in f64 (`isize::MAX / 8`), counted in checked arithmetic
    /// instead of overflowing.
    pub fn validate_sizes(&self, in_features: usize, out_features: usize) -> Result<()> {
        if in_features == 0 {
            return Err(GaussError::config("in_features", "must be >= 1, got 0"));
        }
        if out_features == 0 {
            return Err(GaussError::config("out_features", "must be >= 1, got 0"));
        }
        self.check_rank(in_features)?;
        self.validate()?;
        self.check_tensor_sizes(in_features, out_features)
    }

    /// Every tensor of a layer of `in_features` → `out_features` (weight and center (Z, d),
    /// the precision's raw tensor) has at most [`MAX_TENSOR_ELEMENTS`] elements, in checked
    /// arithmetic (Candle's shape products would overflow, and a `Vec` of more bytes than
    /// `isize::MAX` cannot be allocated).
    pub(crate) fn check_tensor_sizes(&self, in_features: usize, out_features: usize) -> Result<()> {
        let (z, d) = (out_features, in_features);
        let raw: Option<usize> = match self.precision.parameterization {
            Parameterization::Cholesky | Parameterization::Direct | Parameterization::Expm => {
                z.checked_mul(d).and_then(|n| n.checked_mul(d))
            }
            Parameterization::Diag => z.checked_mul(d),
            Parameterization::Sphere => Some(z),
            Parameterization::LowRank { rank } => rank
                .checked_add(1)
                .and_then(|columns| z.checked_mul(d)?.checked_mul(columns)),
        };
        let largest = z.checked_mul(d).zip(raw).map(|(zd, raw)| zd.max(raw));
        let layer = || {
            format!(
                "a {} layer of {in_features} inputs and {out_features} neurons",
                self.precision.parameterization
            )
        };
        match largest {
            Some(n) if n <= MAX_TENSOR_ELEMENTS => Ok(()),
            Some(n) => Err(GaussError::config(
                "size",
                format!(
                    "{} has a tensor of {n} elements, more than the {MAX_TENSOR_ELEMENTS} one allocation holds in f64; choose smaller sizes",
                    layer()
                ),
            )),
            None => Err(GaussError::config(
                "size",
                format!(
                    "{}: the element count of its tensors overflows; choose smaller sizes",
                    layer()
                ),
            )),
        }
    }

    /// lowrank's `U` has at most as many columns as the layer has inputs (R ≤ d): more add
    /// nothing a full-rank `U` does not give and cost O(d·R) memory per neuron.
    pub(crate) fn check_rank(&self, in_features: usize) -> Result<()> {
        if let Parameterization::LowRank { rank } = self.precision.parameterization {
            if rank > in_features {
                return Err(GaussError::config(
                    "precision.parameterization",
                    format!(
                        "lowrank needs rank <= the layer's {in_features} inputs, got rank {rank}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `from_name` with a rank: an unknown name is reported as unknown (it said "a rank is
    /// only meaningful for lowrank"), a rank given twice as such.
    #[test]
    fn from_name_reports_an_unknown_name_before_the_rank() {
        let unknown = Parameterization::from_name("low-rank", Some(2))
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("must be one of") && unknown.contains("low-rank"),
            "{unknown}"
        );
        let twice = Parameterization::from_name("lowrank:3", Some(2))
            .unwrap_err()
            .to_string();
        assert!(twice.contains("twice"), "{twice}");
        let diag = Parameterization::from_name("diag", Some(2))
            .unwrap_err()
            .to_string();
        assert!(
            diag.contains("only meaningful for lowrank") && diag.contains("`diag`"),
            "{diag}"
        );
    }

    #[test]
    fn init_seed_round_trips() {
        let seeded = GaussLayerConfig {
            init: InitConfig {
                seed: Some(u64::MAX),
                ..Default::default()
            },
            ..Default::default()
        };
        let json = serde_json::to_string(&seeded).unwrap();
        assert_eq!(
            serde_json::from_str::<GaussLayerConfig>(&json).unwrap(),
            seeded
        );
    }

    fn parse_edited(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut value = serde_json::to_value(GaussLayerConfig::default()).unwrap();
        edit(&mut value);
        match serde_json::from_value::<GaussLayerConfig>(value) {
            Ok(config) => panic!("parsed {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parsing_is_strict_about_missing_and_unknown_fields() {
        // A missing plain field, a missing `Option` field (serde's default would be `None`), a
        // missing nested field, and an unknown field (a byte flip of `tanh`).
        let e = parse_edited(|v| {
            drop(
                v["precision"]
                    .as_object_mut()
                    .unwrap()
                    .remove("positive_map"),
            )
        });
        assert!(e.contains("missing field `positive_map`"), "{e}");
        let e = parse_edited(|v| {
            drop(
                v["precision"]
                    .as_object_mut()
                    .unwrap()
                    .remove("width_floor"),
            )
        });
        assert!(e.contains("missing field `width_floor`"), "{e}");
        let e = parse_edited(|v| drop(v["init"].as_object_mut().unwrap().remove("seed")));
        assert!(e.contains("missing field `seed`"), "{e}");
        let e = parse_edited(|v| {
            let tanh = v.as_object_mut().unwrap().remove("tanh").unwrap();
            v.as_object_mut().unwrap().insert("tanx".into(), tanh);
        });
        assert!(e.contains("unknown field `tanx`"), "{e}");
        // `null` is an explicit `None`.
        let mut value = serde_json::to_value(GaussLayerConfig::default()).unwrap();
        value["precision"]["width_floor"] = serde_json::Value::Null;
        let parsed: GaussLayerConfig = serde_json::from_value(value).unwrap();
        assert_eq!(parsed.precision.width_floor, None);
        // A precision field at the layer's level (where format version 2 had it) is unknown.
        let e = parse_edited(|v| {
            let map = v["precision"]
                .as_object_mut()
                .unwrap()
                .remove("positive_map")
                .unwrap();
            v.as_object_mut()
                .unwrap()
                .insert("positive_map".into(), map);
        });
        assert!(e.contains("unknown field `positive_map`"), "{e}");
    }
}
