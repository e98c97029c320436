//! Reference-vector conformance: every `*.safetensors` in `GAUSS_REFERENCE_DIR` (default: the
//! copy in `tests/data/reference`) is checked against this workspace, dispatching on the
//! file's metadata `kind`, in f64 (relative error ≤ 1e-9) and f32 (≤ 1e-4), on every device
//! the build enables, through the default path and the portable one (the tensor-op forms
//! CUDA and Metal run, forced on the CPU by `portable: true`; tests named `*_portable`).
//! Unknown kinds and an empty directory are failures, never skips.
//!
//! Run another reference set of the same format with
//! `GAUSS_REFERENCE_DIR=<dir> cargo test -p gauss-tests conformance`.

mod conformance {
    pub mod common;
    pub mod lambda;
    pub mod layer;
    pub mod nll;
}

use candle_core::{DType, Device};
use conformance::common::{self, Case, Report};

/// Checks every reference file in `dtype` on `device`, through the default path (fused CPU
/// ops where they apply) or the portable one (tensor ops only: what CUDA and Metal run),
/// reporting all failures at once.
fn run_reference_files(dtype: DType, device: &Device, portable: bool) -> anyhow::Result<()> {
    let dir = common::reference_dir();
    let files = common::load_reference_files(&dir)?;
    let mut report = Report::new(dtype, portable);
    for file in &files {
        let mut case = Case {
            file,
            dtype,
            device,
            portable,
            report: &mut report,
        };
        let outcome = match file.kind.as_str() {
            "layer" => conformance::layer::check(&mut case),
            "nll" => conformance::nll::check(&mut case),
            "lambda" => conformance::lambda::check(&mut case),
            other => Err(anyhow::anyhow!(
                "unknown kind {other:?} (known: layer, nll, lambda)"
            )),
        };
        if let Err(err) = outcome {
            report.fail(&file.name, "(file)", format!("{err:#}"));
        }
    }
    report.finish(&dir, files.len())
}

fn conformance_reference_files_f64(device: &Device) -> anyhow::Result<()> {
    run_reference_files(DType::F64, device, false)
}
gauss_layer::test_device!(conformance_reference_files_f64);

fn conformance_reference_files_f32(device: &Device) -> anyhow::Result<()> {
    run_reference_files(DType::F32, device, false)
}
gauss_layer::test_device!(conformance_reference_files_f32);

fn conformance_reference_files_f64_portable(device: &Device) -> anyhow::Result<()> {
    run_reference_files(DType::F64, device, true)
}
gauss_layer::test_device!(conformance_reference_files_f64_portable);

fn conformance_reference_files_f32_portable(device: &Device) -> anyhow::Result<()> {
    run_reference_files(DType::F32, device, true)
}
gauss_layer::test_device!(conformance_reference_files_f32_portable);
