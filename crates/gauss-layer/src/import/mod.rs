//! Import of networks trained with the original PyTorch FGN code (F. Grezes, public repository
//! grezesf/FGN---Research, `Finite_Gaussian_Network_lib/`: `FGN_layer.py`,
//! `Feedforward_FGN_net.py`), reproducing what that code computes **at its current HEAD**
//! (commit 2399b1d; older versions differ in the gating and the final layer's `tanh`).
//!
//! ```
//! use std::collections::HashMap;
//! use candle_core::{DType, Device, Tensor};
//! use gauss_layer::import::{fgn_layer_from_tensors, FgnCovarType, FgnImportOptions};
//!
//! // One FGN_layer(2, 1, covar_type='diag') state dict: keys as PyTorch names them.
//! let dev = Device::Cpu;
//! let mut state = HashMap::new();
//! state.insert("weights".to_string(), Tensor::new(&[[1.0f32, -1.0]], &dev)?);
//! state.insert("biases".to_string(), Tensor::new(&[0.5f32], &dev)?);
//! state.insert("centers".to_string(), Tensor::new(&[[0.0f32, 0.0]], &dev)?);
//! state.insert("inv_covars".to_string(), Tensor::new(&[[0.5f32, 0.5]], &dev)?);
//! let options = FgnImportOptions { covar_type: Some(FgnCovarType::Diag), ..Default::default() };
//! let layer = fgn_layer_from_tensors(&state, "", &options)?;
//! // At x = (1, 0): l = 1.5 and the original's g = exp(-(1·0.5²)) = exp(-0.25).
//! let (y, g) = layer.forward_with_gaussian(&Tensor::new(&[[1.0f32, 0.0]], &dev)?, None)?;
//! let g = g.to_vec2::<f32>()?[0][0];
//! assert!((g - (-0.25f32).exp()).abs() < 1e-6);
//! assert!((y.to_vec2::<f32>()?[0][0] - 1.5 * g).abs() < 1e-6);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```
//!
//! # Exporting from PyTorch
//! `torch.save` writes a pickle, which this crate does not read (a pickle can run code). Save
//! the state dict with safetensors instead:
//! ```python
//! # pip install safetensors
//! from safetensors.torch import save_file
//! save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "model.safetensors")
//! ```
//! A `Feedforward_FGN_net` has the keys `ib.*` (input batch norm), `hidden_layers.{k}.*` and
//! `fl.*` (final layer); a single `FGN_layer` has `weights`, `biases`, `centers`,
//! `inv_covars`. A `module.` prefix on every key (a model wrapped in `nn.DataParallel`) is
//! ignored. Integer buffers (`num_batches_tracked`) are ignored; every parameter must be a
//! floating-point tensor (f16, bf16, f32 or f64) and finite.
//!
//! # Conventions: the original's formula beside ours
//! One layer of the original (`FGN_layer.forward`), with `δ = x − c_z`, `A = inv_covars[z]`
//! and `clamp` its `torch.clamp(inv_covars, max = 1/eps)`, `eps = 1e-8`, computes
//! `l = x Wᵀ + b` (`tanh(l)` when `non_lin`), `g = exp(−q)` (no ½) and `y = l · g`. Ours
//! computes `g = exp(−m²/2)` with `m² = δᵀ P δ` (`docs/design.md` §2), so each neuron's `P` is `2q`
//! read as a quadratic form:
//!
//! | `covar_type` | `inv_covars` | original `q` (HEAD) | `P` here | stored as |
//! |---|---|---|---|---|
//! | `sphere` | (Z) | `Σ_i δ_i² · clamp(A)²` | `2·clamp(A)²·I` | sphere, `θ = ln P` |
//! | `diag` | (Z, d) | `Σ_i (abs(δ_i) · (clamp(A_i)²)^{1/2})²` | `diag(2·clamp(A)²)` | diag, `θ = ln P` |
//! | `full` | (Z, d, d) | `einsum('lzi,zik,lzk->lz', δ, A, δ) = δᵀ A δ` | `A + Aᵀ` | direct, raw `2A` |
//! | `chol` | (Z, d, d) | `einsum('xzi,zij,zkj,xzk->xz', δ, L, L, δ) = δᵀ L Lᵀ δ`, `L = tril(A)` | `2·L·Lᵀ` | cholesky (its factor, positive diagonal) |
//!
//! (The exponents `(·)^{1/2}` and `(·)^2` in `diag` are `1/ordinal` and `ordinal`.) Note
//! that sphere and diag *square* `inv_covars`, so its sign does not matter; `chol` ignores
//! everything above the diagonal and the signs of `L`'s columns (`L Lᵀ` is the same). A
//! [`FgnImportOptions::parameterization`] other than the one in the last column goes through
//! [`crate::Precision::from_precision_matrix`] and fails if it cannot hold that `P`.
//!
//! Options a state dict does not record, and the original's defaults (the defaults here):
//!
//! | original | here | default |
//! |---|---|---|
//! | `covar_type` (`FGN_layer` keyword) | [`FgnImportOptions::covar_type`] | sphere (Z) and diag (Z, d) follow from the shape; `full` and `chol` are both (Z, d, d) and must be named, never guessed |
//! | `non_lin=True`: `l = tanh(x Wᵀ + b)` | [`crate::GaussLayerConfig::tanh`] of the hidden layers (and of a lone layer) | off (`non_lin=False`) |
//! | `Feedforward_FGN_net` removes `non_lin` for `fl` (`kwargs2.pop('non_lin')`) | the output layer never gets `tanh` | always |
//! | `free_biases=False`: `b = −Σ_i W_zi c_zi` recomputed on every forward (`update_biases_from_centers`) | [`crate::GaussLayerConfig::tied_bias`] `b = −W·c`; the stored `biases` are ignored | free (`free_biases=True`) |
//! | `ordinal=p`: `Σ_i abs(δ_i)^p` | only `p = 2` is a Gaussian; anything else is an error | 2 |
//! | net forward: `g ← g · max_k prev_g[k]` (`FGN_layer.forward`, "apply prev_g gate"; passed between layers since September 2020) | [`crate::GaussNetConfig::gate`] | on |
//! | `drop_p > 0`: a `Dropout` at `hidden_layers.0` and after every hidden batch norm | [`FgnNetLayout::dropout`] (module indices shift; dropout has no tensors, is the identity in eval, and its `p` is not stored: the imported net has `dropout = 0`) | inferred from the indices |
//! | `BatchNorm1d` (`eps = 1e-5`) after every hidden FGN layer, `ib` on the input | batch norms, read when their tensors are present (an `nn.Identity` in their place has none) | `eps = 1e-5` ([`FgnNetLayout::batch_norm_eps`]) |
//! | `random_eval` (noise where `g ≤ 1e-32`, eval only, off by default) | not reproduced | — |
//!
//! [`import_fgn_model`] reads a whole network or a lone layer, whichever the file holds, and
//! returns an [`FgnImportReport`] with what it found and assumed; [`import_fgn_net`] and
//! [`import_fgn_layer`] read one kind only. Every error from a file names the file.

mod layer;
mod net;
mod state_dict;

use serde::Serialize;

use crate::config::Parameterization;
use crate::error::{GaussError, Result};

pub use layer::fgn_layer_from_tensors;
pub use net::{
    fgn_model_from_tensors, fgn_net_from_tensors, import_fgn_layer, import_fgn_model,
    import_fgn_net,
};
pub use state_dict::{load_state_dict, state_dict_from_bytes};

// What conversion (`crate::convert`) shares: the state dict reader and the network assembly.
pub(crate) use net::{assemble_feedforward, net_from_file, net_from_tensors, NetKind};
pub(crate) use state_dict::{join, StateDict};

/// The largest `inv_covars` value the original uses (`clamp(max = 1/eps)`, `eps = 1e-8`).
pub const FGN_INV_COVAR_MAX: f64 = 1e8;

/// The original's `covar_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FgnCovarType {
    /// `inv_covars` (Z): one scale per neuron.
    Sphere,
    /// `inv_covars` (Z, d).
    Diag,
    /// `inv_covars` (Z, d, d), used as the quadratic form itself.
    Full,
    /// `inv_covars` (Z, d, d), a factor: `tril` of it times its transpose.
    Chol,
}

impl FgnCovarType {
    /// All covariance types, in the original's order.
    pub const ALL: [FgnCovarType; 4] = [
        FgnCovarType::Sphere,
        FgnCovarType::Diag,
        FgnCovarType::Full,
        FgnCovarType::Chol,
    ];

    /// The original's name: `sphere`, `diag`, `full`, `chol`.
    pub fn name(self) -> &'static str {
        match self {
            FgnCovarType::Sphere => "sphere",
            FgnCovarType::Diag => "diag",
            FgnCovarType::Full => "full",
            FgnCovarType::Chol => "chol",
        }
    }

    /// The parameterization that holds this type's `P` exactly (see the module docs).
    pub fn parameterization(self) -> Parameterization {
        match self {
            FgnCovarType::Sphere => Parameterization::Sphere,
            FgnCovarType::Diag => Parameterization::Diag,
            FgnCovarType::Full => Parameterization::Direct,
            FgnCovarType::Chol => Parameterization::Cholesky,
        }
    }
}

impl std::fmt::Display for FgnCovarType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for FgnCovarType {
    type Err = GaussError;
    fn from_str(s: &str) -> Result<Self> {
        FgnCovarType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                GaussError::config(
                    "covar_type",
                    format!("must be one of sphere, diag, full, chol; got {s:?}"),
                )
            })
    }
}

/// How to read an original FGN state dict: the constructor flags it does not record. The
/// defaults are the original's defaults (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct FgnImportOptions {
    /// The layers' `covar_type`. `None` infers sphere (Z) and diag (Z, d) from the shape; a
    /// (Z, d, d) `inv_covars` needs `Some(Full)` or `Some(Chol)`. Default `None`.
    pub covar_type: Option<FgnCovarType>,
    /// The original's `non_lin` (`tanh` on the linear part) of the hidden layers, or of a lone
    /// layer; a network's final layer never has it. Default `false`.
    pub non_lin: bool,
    /// The original's `free_biases`; `false` imports tied-bias layers (`b = −W·c`). Default
    /// `true`.
    pub free_biases: bool,
    /// The original's `ordinal`; only 2 can be imported (any other value is an error, since
    /// the distance is then not a quadratic form). Default 2.
    pub ordinal: f64,
    /// Target parameterization; `None` takes the exact one of [`FgnCovarType::parameterization`].
    /// Default `None`.
    pub parameterization: Option<Parameterization>,
    /// Gate each layer by the previous layer's Gaussians, as the original's network forward
    /// does. Default `true`. A lone layer has nothing before it, so it imports ungated (its
    /// report and checkpoint say `gate: false`) whatever this says.
    pub gate: bool,
}

impl Default for FgnImportOptions {
    fn default() -> Self {
        Self {
            covar_type: None,
            non_lin: false,
            free_biases: true,
            ordinal: 2.0,
            parameterization: None,
            gate: true,
        }
    }
}

impl FgnImportOptions {
    /// Checks the options that no state dict can satisfy (an `ordinal` other than 2).
    ///
    /// # Errors
    /// [`GaussError::InvalidConfig`] naming `ordinal`.
    pub fn validate(&self) -> Result<()> {
        if self.ordinal != 2.0 {
            return Err(GaussError::config(
                "ordinal",
                format!(
                    "is {}: the original's distance Σ_i |x_i − c_i|^ordinal is a Gaussian exponent only for ordinal 2, so a model trained with another ordinal cannot be imported (the state dict does not record it; 2 is the original's default)",
                    self.ordinal
                ),
            ));
        }
        Ok(())
    }
}

/// Module names and layout of a `Feedforward_FGN_net` (or `Feedforward_Classic_net`) state
/// dict.
#[derive(Clone, Debug, PartialEq)]
pub struct FgnNetLayout {
    /// The input batch norm (`ib`); read when its tensors are present.
    pub input_norm: String,
    /// The list of hidden modules (`hidden_layers`), indexed `{hidden}.{k}`.
    pub hidden: String,
    /// The final layer (`fl`).
    pub final_layer: String,
    /// Whether the original net was built with `drop_p > 0`: then `hidden_layers.0` is a
    /// `Dropout` and each hidden layer is followed by its batch norm and a `Dropout`, so the
    /// layers sit at indices 1, 4, 7, … instead of 0, 2, 4, …. `None` (the default) infers it
    /// from the index of the first hidden layer and checks every other index against it.
    pub dropout: Option<bool>,
    /// Epsilon of the batch norms (`BatchNorm1d`'s default 1e-5; not in the state dict).
    pub batch_norm_eps: f64,
}

impl Default for FgnNetLayout {
    fn default() -> Self {
        Self {
            input_norm: "ib".into(),
            hidden: "hidden_layers".into(),
            final_layer: "fl".into(),
            dropout: None,
            batch_norm_eps: 1e-5,
        }
    }
}

/// Whether a file held a whole network or a lone layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FgnModelKind {
    /// A `Feedforward_FGN_net` (`fl.*`, `hidden_layers.*`, `ib.*`).
    Net,
    /// A lone `FGN_layer` (keys `weights`, `biases`, `centers`, `inv_covars`), imported as a
    /// network with no hidden layer.
    Layer,
}

/// One imported layer, as reported by [`import_fgn_model`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FgnLayerReport {
    /// The module prefix in the state dict (`""` for a lone layer).
    pub prefix: String,
    /// d.
    pub in_features: usize,
    /// Z.
    pub out_features: usize,
    /// The parameterization it was stored in.
    pub parameterization: Parameterization,
    /// `tanh` on its linear part.
    pub tanh: bool,
    /// Tied bias.
    pub tied_bias: bool,
}

/// What [`import_fgn_model`] found in a state dict and what it assumed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FgnImportReport {
    /// A network or a lone layer.
    pub kind: FgnModelKind,
    /// The covariance type read (given, or inferred from the shape for sphere and diag).
    pub covar_type: FgnCovarType,
    /// The Gaussian layers, in order.
    pub layers: Vec<FgnLayerReport>,
    /// An input batch norm was read.
    pub input_batch_norm: bool,
    /// A batch norm after every hidden layer was read.
    pub batch_norm: bool,
    /// The module indices showed the `drop_p > 0` layout.
    pub dropout: bool,
    /// Layers gate by the previous layer's Gaussians (always `false` for a lone layer).
    pub gate: bool,
    /// Every key carried this prefix, which was ignored (`module.` of `nn.DataParallel`).
    pub stripped_prefix: Option<String>,
    /// Observations worth a look (e.g. biases that equal `−W·c` although free biases were
    /// assumed).
    pub notes: Vec<String>,
}
