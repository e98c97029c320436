#!/usr/bin/env python3
"""Reads the logs of tools/gpu/check.sh and prints one JSON summary.

usage: summarize.py MANIFEST LOG_DIR
"""
import glob
import json
import os
import re
import sys


def last_json(path):
    """The last line of a log that parses as a JSON object (None if there is none)."""
    if not os.path.exists(path):
        return None
    found = None
    for line in open(path, errors="replace"):
        line = line.strip()
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except ValueError:
                pass
    return found


def tests(logs):
    out = dict(binaries=0, passed=0, failed=0, ignored=0, cuda_passed=0, failures=[], crashed=[])
    for path in sorted(glob.glob(os.path.join(logs, "test--*.log"))):
        out["binaries"] += 1
        text = open(path, errors="replace").read()
        results = re.findall(r"test result: (?:ok|FAILED)\. (\d+) passed; (\d+) failed; (\d+) ignored", text)
        if not results:
            out["crashed"].append(os.path.basename(path)[6:-4])
        for passed, failed, ignored in results:
            out["passed"] += int(passed)
            out["failed"] += int(failed)
            out["ignored"] += int(ignored)
        out["cuda_passed"] += len(re.findall(r"^test \S*cuda\S* \.\.\. ok$", text, re.M))
        out["failures"] += re.findall(r"^test (\S+) \.\.\. FAILED$", text, re.M)
    return out


def ratio(ours, theirs):
    if ours is None or theirs in (None, 0):
        return None
    return round(ours / theirs, 3)


def main():
    manifest, logs = sys.argv[1:]
    manifest = json.load(open(manifest))
    runs = {}
    runs_path = os.path.join(logs, "runs.jsonl")
    if os.path.exists(runs_path):
        for line in open(runs_path):
            run = json.loads(line)
            runs[run["name"]] = run
    summary = dict(commit=manifest["commit"], dirty=manifest["dirty"], tests=tests(logs))
    summary["nonzero_exits"] = {n: r["rc"] for n, r in runs.items() if r["rc"] != 0}
    main_job = last_json(os.path.join(logs, "main-cuda.log"))
    if main_job is not None:
        summary["main_job"] = {k: main_job.get(k) for k in ("test_accuracy", "noise_mean_max_softmax", "fit_seconds")}
        summary["main_job"]["wall_ms"] = runs.get("main-cuda", {}).get("wall_ms")
    layers = []
    for path in sorted(glob.glob(os.path.join(logs, "layer-[0-9]*.log"))):
        ours = last_json(path)
        theirs = last_json(path.replace("layer-", "torch-layer-"))
        if ours is None:
            continue
        row = dict(shape=[ours["batch"], ours["in_features"], ours["out_features"]], kernel=ours["kernel"],
                   fwd_bwd_ms=ours.get("forward_backward_ms"), matmul_equal_flops_ms=ours.get("matmul_equal_flops_ms"))
        if theirs is not None:
            row["torch_grouped_fwd_bwd_ms"] = theirs.get("grouped_fwd_bwd_ms")
            row["torch_gemm_equal_flops_ms"] = theirs.get("gemm_equal_flops_ms")
            row["ratio_fwd_bwd"] = ratio(row["fwd_bwd_ms"], row["torch_grouped_fwd_bwd_ms"])
            row["ratio_matmul"] = ratio(row["matmul_equal_flops_ms"], row["torch_gemm_equal_flops_ms"])
        layers.append(row)
    summary["layer"] = layers
    default_pool = last_json(os.path.join(logs, "layer-default-pool-512-784-64.log"))
    if default_pool is not None:
        summary["default_pool_512_784_64"] = {k: default_pool.get(k) for k in ("forward_backward_ms", "matmul_equal_flops_ms")}
    training = {}
    for name in ("cholesky-digits", "diag-mnist", "cholesky-mnist"):
        ours = last_json(os.path.join(logs, f"train-{name}.log"))
        theirs = last_json(os.path.join(logs, f"torch-train-{name}.log"))
        if ours is None and theirs is None:
            continue
        row = {}
        if ours is not None:
            row.update(fit_seconds=ours.get("fit_seconds"), test_accuracy=ours.get("test_accuracy"))
        if theirs is not None:
            row.update(torch_train_seconds=theirs.get("train_seconds"), torch_test_accuracy=theirs.get("test_accuracy"))
        row["ratio"] = ratio(row.get("fit_seconds"), row.get("torch_train_seconds"))
        training[name] = row
    summary["training"] = training
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
