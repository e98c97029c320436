//! Conformance of kind `nll` (owned by the losses work; placeholder until it lands).

use candle_core::{DType, Device};

use super::common::{ReferenceFile, Report};

/// Checks one `nll` reference file.
pub fn check(
    file: &ReferenceFile,
    dtype: DType,
    device: &Device,
    report: &mut Report,
) -> anyhow::Result<()> {
    let _ = (dtype, device, report);
    anyhow::bail!("{}: kind `nll` is not implemented yet", file.name)
}
