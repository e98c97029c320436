//! Seeded initialization on the host ([`crate::InitConfig::seed`]).
//!
//! Candle's CPU generator cannot be seeded, so a seeded layer draws its initial values here,
//! from [`rand::rngs::StdRng`], in f64, converts them to the layer's dtype on the CPU and only
//! then moves them to the layer's device: one seed gives bit-identical layers on every run and
//! every device. The distributions are those of the unseeded path (Candle's
//! [`candle_nn::Init`]).
//!
//! Each initialized tensor has its own stream ([`InitStream`]), derived from the seed, so the
//! values of one tensor do not depend on which other tensors the config creates (a tied-bias
//! layer has the same weights and centers as an untied one with the same seed).
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use gauss_layer::{gauss_layer, GaussLayerConfig, InitConfig};
//!
//! let config = GaussLayerConfig {
//!     init: InitConfig { seed: Some(7), ..Default::default() },
//!     ..Default::default()
//! };
//! let build = || -> gauss_layer::Result<Vec<f32>> {
//!     let varmap = VarMap::new();
//!     let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//!     let layer = gauss_layer(3, 2, config.clone(), vb)?;
//!     Ok(layer.center().flatten_all()?.to_vec1::<f32>()?)
//! };
//! assert_eq!(build()?, build()?);
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use candle_core::Shape;
use candle_nn::init::NormalOrUniform;
use candle_nn::Init;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};

use crate::error::{GaussError, Result};

/// The independent random streams of one seeded layer, one per initialized tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum InitStream {
    /// The linear weights (Kaiming uniform).
    Weight,
    /// The stored bias (uniform ±1/√d).
    Bias,
    /// The centers, N(0, `center_std`²).
    Center,
    /// The standard normal noise of the precision perturbation.
    Precision,
}

impl InitStream {
    fn index(self) -> usize {
        match self {
            InitStream::Weight => 0,
            InitStream::Bias => 1,
            InitStream::Center => 2,
            InitStream::Precision => 3,
        }
    }
}

/// The generator of one stream of a layer seeded with `seed`: the stream's child seed is the
/// `index + 1`-th draw of `StdRng::seed_from_u64(seed)`.
pub(crate) fn stream_rng(seed: u64, stream: InitStream) -> StdRng {
    let mut master = StdRng::seed_from_u64(seed);
    let mut child = master.next_u64();
    for _ in 0..stream.index() {
        child = master.next_u64();
    }
    StdRng::seed_from_u64(child)
}

/// The seed of layer `layer` in a network seeded with `seed` (what [`crate::GaussNet::new`]
/// gives each layer).
///
/// Layer 0 keeps `seed`, so a one-layer network equals the layer built alone. Deeper layers
/// step by the 64-bit golden ratio (SplitMix's increment) rather than by 1, so that layer 1 of
/// seed `s` is not layer 0 of seed `s + 1` in a sweep over consecutive seeds.
pub fn layer_seed(seed: u64, layer: usize) -> u64 {
    const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    seed.wrapping_add((layer as u64).wrapping_mul(GOLDEN_GAMMA))
}

fn draw_error(reason: impl std::fmt::Display) -> GaussError {
    GaussError::config(
        "init",
        format!("cannot sample the initial values: {reason}"),
    )
}

fn uniform(rng: &mut StdRng, n: usize, lo: f64, up: f64) -> Result<Vec<f64>> {
    let dist = Uniform::new(lo, up).map_err(draw_error)?;
    Ok((0..n).map(|_| dist.sample(rng)).collect())
}

/// `n` draws of N(mean, stdev²) in f64.
pub(crate) fn normal(rng: &mut StdRng, n: usize, mean: f64, stdev: f64) -> Result<Vec<f64>> {
    let dist = Normal::new(mean, stdev).map_err(draw_error)?;
    Ok((0..n).map(|_| dist.sample(rng)).collect())
}

/// Host values of a Candle `Init` for `shape`, drawn from `rng` with the distribution Candle
/// would use.
pub(crate) fn sample(init: Init, shape: &Shape, rng: &mut StdRng) -> Result<Vec<f64>> {
    let n = shape.elem_count();
    match init {
        Init::Const(value) => Ok(vec![value; n]),
        Init::Uniform { lo, up } => uniform(rng, n, lo, up),
        Init::Randn { mean, stdev } => normal(rng, n, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, n, -bound, bound)
                }
                NormalOrUniform::Normal => normal(rng, n, 0.0, std),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::init::DEFAULT_KAIMING_UNIFORM;

    #[test]
    fn streams_are_distinct_and_repeatable() {
        let first = |stream| stream_rng(5, stream).next_u64();
        assert_eq!(first(InitStream::Center), first(InitStream::Center));
        assert_ne!(first(InitStream::Weight), first(InitStream::Bias));
        assert_ne!(first(InitStream::Center), first(InitStream::Precision));
        assert_ne!(
            stream_rng(5, InitStream::Weight).next_u64(),
            stream_rng(6, InitStream::Weight).next_u64()
        );
    }

    #[test]
    fn layer_zero_keeps_the_seed_and_layers_differ() {
        assert_eq!(layer_seed(42, 0), 42);
        assert_ne!(layer_seed(42, 1), 42);
        assert_ne!(layer_seed(42, 1), layer_seed(43, 0));
    }

    #[test]
    fn kaiming_uniform_stays_inside_its_bound() -> Result<()> {
        // Candle's DEFAULT_KAIMING_UNIFORM: ReLU gain √2, fan-in d → bound √3·√2/√d = √(6/d).
        let shape = Shape::from((16, 6));
        let values = sample(
            DEFAULT_KAIMING_UNIFORM,
            &shape,
            &mut stream_rng(1, InitStream::Weight),
        )?;
        let bound = (6.0f64 / 6.0).sqrt();
        assert_eq!(values.len(), 96);
        assert!(values.iter().all(|v| v.abs() <= bound), "{values:?}");
        assert!(values.iter().any(|v| v.abs() > 0.5 * bound));
        Ok(())
    }

    fn centers(net: &crate::GaussNet) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for layer in net.layers() {
            out.push(layer.center().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    #[test]
    fn seeded_nets_repeat_and_their_layers_differ() -> Result<()> {
        use crate::{gauss_layer, GaussLayerConfig, GaussNet, GaussNetConfig, InitConfig};
        use candle_nn::{VarBuilder, VarMap};
        let layer = GaussLayerConfig {
            init: InitConfig {
                seed: Some(9),
                ..Default::default()
            },
            ..Default::default()
        };
        // Three equally shaped layers: only their seeds tell them apart.
        let config = GaussNetConfig {
            in_features: 4,
            hidden: vec![4, 4],
            out_features: 4,
            layer: layer.clone(),
            ..Default::default()
        };
        let build = |config: &GaussNetConfig| {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            GaussNet::new(config.clone(), vb)
        };
        let net = centers(&build(&config)?)?;
        assert_eq!(net, centers(&build(&config)?)?);
        assert_ne!(net[0], net[1]);
        assert_ne!(net[1], net[2]);

        // Layer 0 of a net is the layer built alone with the net's seed.
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let alone = gauss_layer(4, 4, layer, vb)?;
        assert_eq!(net[0], alone.center().flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
