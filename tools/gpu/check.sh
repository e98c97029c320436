#!/usr/bin/env bash
# On the GPU machine (CUDA driver + libraries, python3 with torch; no Rust needed): unpacks the
# bundle of tools/gpu/build.sh and runs, in about 6 minutes on an H200,
#   1. every test binary (the CUDA variants of `test_device!` tests, f32 and f64, and the rest);
#   2. the README's main job with --device cuda;
#   3. side by side with the PyTorch peers (tools/*_peer.py, PEER_DEVICE=cuda): the layer
#      forward + backward at six shapes, cholesky digits 20 epochs, and with the MNIST digits in
#      the bundle diag 5 epochs and cholesky 784 → 64 3 epochs; the equal-FLOP matmul with
#      CUDA's memory pool kept and at the driver's default (GAUSS_CUDA_DEFAULT_POOL=1).
# Prints one JSON summary (also $OUT/summary.json; logs in $OUT/logs.tar.xz).
#
#   tools/gpu/check.sh [BUNDLE]          (default target/gpu-bundle/bundle.tar.xz)
# With the device tool: run(command="bash tools/gpu/check.sh", carry=["target/gpu-bundle"]).
# CHECK_ONLY=tests|main|bench runs one part.
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
bundle=${1:-target/gpu-bundle/bundle.tar.xz}
out=${OUT:-/tmp/gauss-gpu-out}
work=/tmp/gauss-gpu
logs=$work/logs
rm -rf "$work" && mkdir -p "$work/b" "$logs" "$out"
xz -dc "$bundle" | tar xf - -C "$work/b" || { echo "cannot unpack $bundle" >&2; exit 1; }
manifest=$work/b/manifest.json
field() { python3 -c "import json,sys; print(json.load(open('$manifest'))['$1'])"; }
build_root=$(field root)
build_target=$(field target)

# CUDA libraries (cuBLAS, cuRAND, NVRTC) of the machine: candle loads them at run time.
for dir in /usr/local/cuda-13.0/targets/x86_64-linux/lib /usr/local/cuda/lib64; do
  [ -e "$dir/libcublas.so.13" ] && export LD_LIBRARY_PATH=$dir:${LD_LIBRARY_PATH:-}
done
if ! ldconfig -p | grep -q libcublas.so.13 && [[ ":${LD_LIBRARY_PATH:-}:" != *cuda* ]]; then
  lib=$(find / -xdev -name libcublas.so.13 2>/dev/null | head -1)
  [ -n "$lib" ] && export LD_LIBRARY_PATH=$(dirname "$lib"):${LD_LIBRARY_PATH:-}
fi
# The test binaries read data under the checkout they were built in, and the CLI tests run
# the example binaries from the build's target dir: recreate both paths.
if [ "$build_root" != "$repo" ] && [ ! -e "$build_root" ]; then
  mkdir -p "$(dirname "$build_root")" && ln -s "$repo" "$build_root"
fi
mkdir -p "$build_target/release" && cp "$work"/b/bin/* "$build_target/release/"
bin=$work/b/bin
mnist=$work/b/mnist
part() { [ -z "${CHECK_ONLY:-}" ] || [ "$CHECK_ONLY" = "$1" ]; }
# Runs a command with a time limit, its output to logs/NAME.log; prints the log's last line.
run() {
  local name=$1 limit=$2; shift 2
  local start
  start=$(date +%s%N)
  timeout "$limit" "$@" > "$logs/$name.log" 2> "$logs/$name.err"
  local rc=$?
  echo "{\"name\": \"$name\", \"rc\": $rc, \"wall_ms\": $(( ($(date +%s%N) - start) / 1000000 ))}" >> "$logs/runs.jsonl"
  return $rc
}

if part tests; then
  for t in $(python3 -c "import json; print(' '.join(json.load(open('$manifest'))['tests']))"); do
    run "test--$t" 150 "$work/b/tests/$t" --test-threads 8
  done
fi
if part main; then
  run main-cuda 240 "$bin/fgn-classifier" train --device cuda --out "$work/fgn-digits.safetensors"
  run main-cuda-eval 60 "$bin/fgn-classifier" eval "$work/fgn-digits.safetensors" --device cuda
fi
if part bench; then
  export PEER_DEVICE=cuda
  for shape in "256 32 64" "512 64 128" "256 128 32" "1024 128 256" "4096 64 512" "512 784 64"; do
    set -- $shape
    run "layer-$1-$2-$3" 60 "$bin/bench" --batch "$1" --in "$2" --out "$3" --param cholesky --backward --device cuda --iters 30
    run "torch-layer-$1-$2-$3" 90 python3 tools/torch_peer.py "$1" "$2" "$3"
  done
  GAUSS_CUDA_DEFAULT_POOL=1 run "layer-default-pool-512-784-64" 60 "$bin/bench" --batch 512 --in 784 --out 64 --param cholesky --backward --device cuda --iters 30
  run train-cholesky-digits 120 "$bin/fgn-classifier" train --fgn-only --param cholesky --epochs 20 --device cuda --out "$work/c.safetensors"
  run torch-train-cholesky-digits 120 python3 tools/train_peer.py data/digits.safetensors cholesky 20
  if [ -d "$mnist" ]; then
    run train-diag-mnist 120 "$bin/fgn-classifier" train --fgn-only --mnist "$mnist" --param diag --epochs 5 --device cuda --out "$work/d.safetensors"
    run torch-train-diag-mnist 120 python3 tools/train_peer.py "$mnist" diag 5
    run train-cholesky-mnist 180 "$bin/fgn-classifier" train --fgn-only --mnist "$mnist" --param cholesky --epochs 3 --device cuda --out "$work/m.safetensors"
    run torch-train-cholesky-mnist 120 python3 tools/train_peer.py "$mnist" cholesky 3
  fi
fi
python3 tools/gpu/summarize.py "$manifest" "$logs" | tee "$out/summary.json"
tar cf - -C "$work" logs | xz -T0 > "$out/logs.tar.xz"
