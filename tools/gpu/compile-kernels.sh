#!/usr/bin/env bash
# Compiles this project's CUDA kernels (crates/gauss-layer/cuda/*.cu) with a real nvcc, through
# ptxas to machine code for every listed architecture, as CI's proof that they build without a
# GPU. nvcc comes from PATH (e.g. `source target/cuda13/env.sh` after tools/gpu/toolkit.sh).
#   tools/gpu/compile-kernels.sh [SM ...]        (default: 75 80 90)
set -euo pipefail
cd "$(dirname "$0")/../.."
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(75 80 90)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for src in crates/gauss-layer/cuda/*.cu; do
  for sm in "${archs[@]}"; do
    # The same flags as build.rs, then ptxas (-cubin) so resource errors show too.
    nvcc -cubin -O3 -std=c++17 -arch="sm_$sm" -Xptxas -warn-spills -o "$out/k.cubin" "$src"
    nvcc --ptx -O3 -std=c++17 -arch="compute_$sm" -o "$out/k.ptx" "$src"
  done
  echo "compiled $src for sm ${archs[*]}"
done
