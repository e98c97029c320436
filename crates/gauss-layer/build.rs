//! With the `cuda` feature, compiles the project's CUDA kernels (`cuda/*.cu`) to PTX with
//! `nvcc` (the same toolkit candle-kernels needs), for the compute capability in
//! `CUDA_COMPUTE_CAP` (default 80; PTX is compiled on for newer GPUs by the driver). A build
//! without the feature runs no CUDA tool.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["tril_inverse", "adamw"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|cap| cap.trim().parse::<u32>().ok())
        .unwrap_or(80);
    let sources: Vec<String> = KERNELS.iter().map(|k| format!("cuda/{k}.cu")).collect();
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{compute_cap}"))
        .arg("--output-directory")
        .arg(&out_dir)
        .args(&sources)
        .status()
        .unwrap_or_else(|e| {
            panic!("the `cuda` feature needs nvcc (set NVCC or put it on PATH): running `{nvcc}` failed: {e}")
        });
    assert!(status.success(), "nvcc failed on {sources:?} ({status})");
    for kernel in KERNELS {
        let ptx = out_dir.join(format!("{kernel}.ptx"));
        assert!(ptx.exists(), "nvcc wrote no {}", ptx.display());
    }
}
