//! Size checks before work: the elements a network holds (checked arithmetic, no tensor
//! allocated) and the memory this process may use, so a command line asking for a network or
//! a data set that cannot fit is refused at once with one line, instead of panicking on
//! "capacity overflow" or being aborted by a failed allocation after minutes of work.
//!
//! ```
//! use gauss_layer::{memory, GaussNetConfig};
//! let config = GaussNetConfig { in_features: 64, hidden: vec![32], out_features: 10, ..Default::default() };
//! // Per layer: weight, bias, center and the (Z, d, d) Cholesky factor.
//! let expected = 32 * (64 + 1 + 64 + 64 * 64) + 10 * (32 + 1 + 32 + 32 * 32);
//! assert_eq!(memory::network_elements(&config)?, expected);
//! // A width whose sizes overflow is an error, not a panic.
//! let huge = GaussNetConfig { hidden: vec![1 << 62], ..config };
//! assert!(memory::network_elements(&huge).is_err());
//! assert!(memory::check_fits("a network", None).is_err());
//! assert!(memory::check_fits("a network", Some(u64::MAX)).is_err());
//! memory::check_fits("a network", Some(1 << 20))?;
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use crate::checkpoint::schema;
use crate::config::Parameterization;
use crate::error::{GaussError, Result};
use crate::net::GaussNetConfig;

/// The number of scalars the network of `config` holds (every tensor of
/// [`crate::GaussNet::named_tensors`]), in checked arithmetic.
///
/// # Errors
/// [`GaussError::InvalidConfig`] (field `hidden`) when a size overflows (field
/// `precision.parameterization` for a lowrank rank whose `rank + 1` overflows).
pub fn network_elements(config: &GaussNetConfig) -> Result<u64> {
    // lowrank's raw shape (Z, d, rank + 1) saturates there (`Precision::raw_shape`): say why
    // here, before the element count fails on it.
    for layer in std::iter::once(&config.layer).chain(&config.output_layer) {
        if let Parameterization::LowRank { rank } = layer.precision.parameterization {
            if rank.checked_add(1).is_none() {
                return Err(GaussError::config(
                    "precision.parameterization",
                    format!(
                        "lowrank rank {rank}: the size of its (Z, d, rank + 1) tensor overflows"
                    ),
                ));
            }
        }
    }
    let mut total: u64 = 0;
    schema::visit_expected(config, &mut |tensor| {
        total = u64::try_from(tensor.numel)
            .ok()
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| "the number of parameters overflows".to_string())?;
        Ok(())
    })
    // Any width can be the one at fault (the reason names the tensor that overflows).
    .map_err(|reason| GaussError::config("in_features, hidden, out_features", reason))?;
    Ok(total)
}

/// A number in bytes as people read it (`3.2 GB`).
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e12 {
        format!("{:.3e} bytes", b)
    } else if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

/// A `/proc` value in kB of the line starting with `key` (`MemTotal:`), in bytes.
fn proc_kb(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The soft address-space limit (`ulimit -v`) in bytes, from `/proc/self/limits`.
fn address_space_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max address space"))?;
    // "Max address space  <soft> <hard> bytes"; "unlimited" parses to None.
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The most memory this process can use, where the system says: the smaller of the
/// machine's memory (`MemTotal`) and the address-space limit (`ulimit -v`); `None` where
/// neither is known (then only overflow is refused).
pub fn available_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| proc_kb(&t, "MemTotal:"));
    match (total, address_space_limit()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Checks that `estimate` bytes (`None`: the estimate itself overflowed) fit in
/// [`available_bytes`]; `what` names the work in the error.
///
/// # Errors
/// [`GaussError::InvalidConfig`] (field `size`) naming `what`, the estimate and the limit.
pub fn check_fits(what: &str, estimate: Option<u64>) -> Result<()> {
    let Some(bytes) = estimate else {
        return Err(GaussError::config(
            "size",
            format!("{what} is too large: its size in bytes overflows"),
        ));
    };
    // Without a known limit, an estimate beyond half the address space cannot be allocated.
    let limit = available_bytes().unwrap_or(u64::MAX / 2);
    if bytes > limit {
        return Err(GaussError::config(
            "size",
            format!(
                "{what} needs about {} but at most {} can be used here (machine memory or ulimit -v); choose smaller sizes",
                human(bytes),
                human(limit)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GaussLayerConfig;

    /// lowrank's raw tensor is (Z, d, rank + 1): a rank of `usize::MAX` overflowed that
    /// `rank + 1` (a panic, "attempt to add with overflow", in a build with overflow checks;
    /// 0 elements without) instead of the documented error.
    #[test]
    fn a_lowrank_rank_whose_raw_shape_overflows_is_an_error() {
        let lowrank =
            |rank| GaussLayerConfig::with_parameterization(Parameterization::LowRank { rank });
        for (layer, output_layer) in [
            (lowrank(usize::MAX), None),
            (GaussLayerConfig::default(), Some(lowrank(usize::MAX))),
        ] {
            let config = GaussNetConfig {
                in_features: 4,
                hidden: vec![3],
                out_features: 2,
                layer,
                output_layer,
                ..Default::default()
            };
            let err = network_elements(&config).unwrap_err();
            assert!(matches!(err, GaussError::InvalidConfig { .. }), "{err}");
            assert!(err.to_string().contains("overflows"), "{err}");
        }
        // Rank 2 on 4 → 3 → 2 (every layer lowrank): per layer weight, bias, center and the
        // (Z, d, 3) raw tensor: 3·(4 + 1 + 4 + 4·3) + 2·(3 + 1 + 3 + 3·3).
        let config = GaussNetConfig {
            in_features: 4,
            hidden: vec![3],
            out_features: 2,
            layer: lowrank(2),
            ..Default::default()
        };
        assert_eq!(network_elements(&config).unwrap(), 3 * 21 + 2 * 16);
    }
}
