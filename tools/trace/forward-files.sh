#!/usr/bin/env bash
# Which of gauss-layer's source files one layer forward runs code from, counted by callgrind:
# the cross-check of docs/design.md's "One forward, file by file". Collects only inside
# `<GaussLayer as Module>::forward` of the `bench` binary (the dev profile with line tables,
# so inlined code is charged to the file it was written in) and prints one JSON line from
# tools/trace/callgrind_files.py: the files, each with its instructions.
#
# Usage: bash tools/trace/forward-files.sh [bench options]
#   default options: the traced case, a default cholesky layer 64 → 64, f32, batch 64.
# Needs valgrind (Debian: apt install valgrind) and python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || { echo "error: needs valgrind (Debian: apt install valgrind)" >&2; exit 1; }

export CARGO_PROFILE_DEV_DEBUG=line-tables-only
cargo build --quiet -p bench
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

if [ "$#" -eq 0 ]; then
  set -- --batch 64 --in 64 --out 64 --param cholesky --dtype f32
fi
profile=$(mktemp)
trap 'rm -f "$profile"' EXIT
# One timed forward and no warm-up: the trace is of what one call runs, not of its speed.
valgrind --tool=callgrind --callgrind-out-file="$profile" --compress-pos=no \
  --toggle-collect='<gauss_layer::layer::GaussLayer as candle_core::Module>::forward' \
  "$target_dir/debug/bench" --iters 1 --warmup 0 "$@" >/dev/null 2>"$profile.log" \
  || { cat "$profile.log" >&2; rm -f "$profile.log"; exit 1; }
rm -f "$profile.log"
python3 tools/trace/callgrind_files.py "$profile" "$PWD/crates/gauss-layer/src"
