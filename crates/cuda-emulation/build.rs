//! Compiles `src/emulate.cpp`, which includes gauss-layer's CUDA kernel sources as plain C++
//! (see that file), into a static library for the tests.

fn main() {
    println!("cargo::rerun-if-changed=src/emulate.cpp");
    println!("cargo::rerun-if-changed=../gauss-layer/cuda");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .include("../gauss-layer/cuda")
        .file("src/emulate.cpp")
        .compile("cuda_emulation");
}
