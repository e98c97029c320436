#!/usr/bin/env bash
# A CUDA 13.0 toolkit for BUILDING (not running) CUDA code on a machine without a GPU, made from
# the NVIDIA wheels of the Python package index (no system install, no root).
#
#   tools/gpu/toolkit.sh [--compiler-only] [DIR]      (default DIR: target/cuda13)
#   source DIR/env.sh
#
# Full (default): nvcc, ptxas, cicc, the headers, the cuBLAS/cuRAND/NVRTC/cudart libraries and a
# link-time stub of the driver library libcuda.so.1 (the real one comes with the driver on the
# GPU machine): enough for `cargo build --features cuda`. About 700 MB of wheels.
# --compiler-only: nvcc, ptxas, cicc and the runtime headers (about 100 MB): enough to compile
# this project's kernels (crates/gauss-layer/cuda/*.cu), which is what CI checks.
# Running twice reuses the downloaded wheels.
set -euo pipefail
compiler_only=0
if [ "${1:-}" = "--compiler-only" ]; then compiler_only=1; shift; fi
DIR=$(mkdir -p "${1:-target/cuda13}" && cd "${1:-target/cuda13}" && pwd)
mkdir -p "$DIR/wheels" "$DIR/unpacked"
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-nvvm==13.0.88)
if [ "$compiler_only" = 0 ]; then
  wheels+=(nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.5.25 nvidia-cublas==13.0.2.14)
fi
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR/wheels" "${wheels[@]}"
for w in "$DIR"/wheels/*.whl; do unzip -q -o "$w" -d "$DIR/unpacked"; done
R="$DIR/unpacked/nvidia/cu13"
if [ "$compiler_only" = 0 ]; then
  (cd "$R/lib" && for l in cublas cublasLt nvrtc cudart; do ln -sf "lib$l.so.13" "lib$l.so"; done && ln -sf libcurand.so.10 libcurand.so)
  # Link stub for the driver API: every CUresult entry point of cuda.h, soname libcuda.so.1.
  gcc -E -I"$R/include" "$R/include/cuda.h" | tr '\n' ' ' \
    | grep -oE "CUresult +(__attribute__\(\([^)]*\)\) +)?cu[A-Z][A-Za-z0-9_]* *\(" \
    | grep -oE "cu[A-Z][A-Za-z0-9_]*" | sort -u | sed 's/.*/int &(void) { return 999; }/' > "$DIR/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$R/lib/libcuda.so" "$DIR/libcuda_stub.c"
fi
cat > "$DIR/env.sh" <<ENV
export CUDA_ROOT=$R CUDA_PATH=$R CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export PATH=$R/bin:\$PATH
ENV
"$R/bin/nvcc" --version | tail -2
echo "toolkit ready: source $DIR/env.sh"
