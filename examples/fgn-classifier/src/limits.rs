//! Sizes checked before any work: the networks `train` would build are counted in checked
//! arithmetic and their memory estimated, so `--hidden 4611686018427387904` or
//! `--param cholesky --hidden 300000` end at once with one line (instead of a "capacity
//! overflow" panic or an allocation failure that aborts after minutes), and the FGN config
//! (e.g. lowrank's R ≤ d) is validated before the classical network trains.

use anyhow::Result;
use gauss_layer::{memory, GaussLayerConfig, GaussNetConfig, Parameterization};

/// Bytes per f32 parameter, and the copies training keeps of each: the value, its
/// gradient, Adam's two moments.
pub(crate) const BYTES: u64 = 4;
pub(crate) const COPIES: u64 = 4;
/// Evaluation batch rows (`evaluate::BATCH`) and the (rows, width) tensors kept per layer
/// while evaluating and attacking (pre-activation, distance, Gaussian, output, gradients).
const EVAL_ROWS: u64 = 2048;
const PER_LAYER: u64 = 8;

/// What `train` is about to build.
pub struct TrainSize<'a> {
    pub features: usize,
    pub classes: usize,
    pub hidden: &'a [usize],
    pub parameterization: Parameterization,
    pub mlp: bool,
    pub fgn: bool,
}

/// Refuses sizes that overflow, an FGN config that does not validate, and networks whose
/// estimated training memory exceeds what this process can use.
pub fn check_train(size: &TrainSize) -> Result<()> {
    let overflow = || anyhow::anyhow!("--hidden {:?}: the network's size overflows", size.hidden);
    let mut elements: u64 = 0;
    if size.fgn {
        let layer = GaussLayerConfig::with_parameterization(size.parameterization);
        let config = GaussNetConfig {
            in_features: size.features,
            hidden: size.hidden.to_vec(),
            out_features: size.classes,
            layer: layer.clone(),
            output_layer: Some(layer),
            gate: true,
            ..Default::default()
        };
        config.validate()?;
        elements = memory::network_elements(&config)?;
    }
    if size.mlp {
        let mut widths = vec![size.features];
        widths.extend(size.hidden);
        widths.push(size.classes);
        for w in widths.windows(2) {
            let layer = (w[0] as u64)
                .checked_add(1)
                .and_then(|i| i.checked_mul(w[1] as u64))
                .ok_or_else(overflow)?;
            elements = elements.checked_add(layer).ok_or_else(overflow)?;
        }
    }
    let widths = size
        .hidden
        .iter()
        .try_fold(size.classes as u64, |acc, &w| acc.checked_add(w as u64))
        .ok_or_else(overflow)?;
    let estimate = elements.checked_mul(BYTES * COPIES).and_then(|params| {
        widths
            .checked_mul(EVAL_ROWS * PER_LAYER * BYTES)
            .and_then(|activations| params.checked_add(activations))
    });
    memory::check_fits(
        &format!(
            "training networks of hidden widths {:?} ({}) on {} inputs",
            size.hidden, size.parameterization, size.features
        ),
        estimate,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(hidden: &[usize], parameterization: Parameterization) -> TrainSize<'_> {
        TrainSize {
            features: 64,
            classes: 10,
            hidden,
            parameterization,
            mlp: true,
            fgn: true,
        }
    }

    #[test]
    fn sizes_that_overflow_or_cannot_fit_are_refused() {
        check_train(&size(&[64], Parameterization::Diag)).unwrap();
        check_train(&size(&[64], Parameterization::Cholesky)).unwrap();
        for hidden in [4611686018427387904usize, 1099511627776, 1_000_000_000] {
            let e = check_train(&size(&[hidden], Parameterization::Diag))
                .unwrap_err()
                .to_string();
            assert!(e.contains("overflow") || e.contains("needs about"), "{e}");
        }
        // 300,000 Cholesky neurons over 64 inputs: 1.2e9 factor entries, ~20 GB to train.
        // (This machine's memory is smaller; the figure is checked, not the machine.)
        let e = check_train(&size(&[300_000], Parameterization::Cholesky));
        if memory::available_bytes().is_some_and(|b| b < 19_000_000_000) {
            assert!(e.unwrap_err().to_string().contains("needs about"));
        }
        // lowrank's R <= d, checked before anything trains.
        let e = check_train(&size(&[64], Parameterization::LowRank { rank: 1000 }))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank"), "{e}");
    }
}
