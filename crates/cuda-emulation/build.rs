//! Compiles `src/emulate.cpp`, which includes gauss-layer's CUDA kernel sources as plain C++
//! (see that file), into a static library for the tests.
//!
//! `-ffp-contract=off`: GCC and Clang contract `a * b + c` into a fused multiply-add wherever
//! the target has one (aarch64 always; x86-64 with `-march=haswell` or newer, e.g. from
//! `CXXFLAGS`), ISO `-std=c++17` or not, and one rounding fewer would break the tests
//! that compare the kernels with Candle's ops bit for bit (`tests/adamw.rs`). The CUDA build
//! gets the same from the `_rn` intrinsics (`gauss-layer/cuda/common.cuh`).

fn main() {
    println!("cargo::rerun-if-changed=src/emulate.cpp");
    println!("cargo::rerun-if-changed=../gauss-layer/cuda");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        // A compiler that does not take the flag (MSVC) builds without it.
        .flag_if_supported("-ffp-contract=off")
        .include("../gauss-layer/cuda")
        .file("src/emulate.cpp")
        .compile("cuda_emulation");
}
