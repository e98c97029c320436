#!/usr/bin/env python3
"""Recomputes a checkpoint's OOD numbers outside the project: reads the IDX test images
with numpy, runs `fgn-classifier predict` on them, and scores its `output` and last `g{i}`
with scikit-learn (roc_auc_score, roc_curve) and a numpy ECE. Prints JSON.

    python3 tools/ood/from_predict.py CKPT --data-dir IN_DIR --ood OUT_DIR [--binary PATH] [--mirror]

With --mirror it mirrors the images itself (numpy), runs `predict` on both views of a
checkpoint that does not record test-time mirroring, and averages the two views' outputs
and g: an outside check of `eval --test-time-mirror`.

Needs numpy, scikit-learn and safetensors (pip install numpy scikit-learn safetensors).
"""

import argparse
import gzip
import json
import os
import subprocess
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.metrics import roc_auc_score, roc_curve


def read_idx(path):
    opener = gzip.open if open(path, "rb").read(2) == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        data = f.read()
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data[4 + 4 * rank:], dtype=np.uint8).reshape(dims)


def find(dir_, stem):
    for name in sorted(os.listdir(dir_)):
        bare = name[:-3] if name.endswith(".gz") else name
        if bare.endswith(stem) or bare.endswith(stem.replace("-idx", ".idx")):
            return os.path.join(dir_, name)
    raise SystemExit(f"{dir_}: no {stem}")


def predict(binary, ckpt, images):
    with tempfile.TemporaryDirectory() as tmp:
        x, out = os.path.join(tmp, "x.safetensors"), os.path.join(tmp, "out.safetensors")
        # Integer pixels: predict divides them by the checkpoint's recorded input_scale.
        save_file({"x": images.reshape(len(images), -1).astype(np.uint8)}, x)
        subprocess.run([binary, "predict", ckpt, "--input", x, "--output", out], check=True,
                       stdout=subprocess.DEVNULL)
        t = load_file(out)
    last = max((k for k in t if k.startswith("g")), key=lambda k: int(k[1:]))
    return t["output"].astype(np.float64), t[last].astype(np.float64)


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def ece(conf, correct, bins=15):
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--ood", required=True)
    p.add_argument("--binary", default="target/release/fgn-classifier")
    p.add_argument("--mirror", action="store_true",
                   help="average each image's outputs with its left-right mirror's")
    a = p.parse_args()
    x_in = read_idx(find(a.data_dir, "t10k-images-idx3-ubyte"))
    y_in = read_idx(find(a.data_dir, "t10k-labels-idx1-ubyte"))
    x_out = read_idx(find(a.ood, "t10k-images-idx3-ubyte"))
    def views(images):
        logits, g = predict(a.binary, a.checkpoint, images)
        if not a.mirror:
            return logits, g
        logits_m, g_m = predict(a.binary, a.checkpoint, images[:, :, ::-1].copy())
        return (logits + logits_m) / 2, (g + g_m) / 2

    logits_in, g_in = views(x_in)
    logits_out, g_out = views(x_out)
    p_in, p_out = softmax(logits_in), softmax(logits_out)
    correct = (p_in.argmax(1) == y_in).astype(np.float64)
    labels = np.r_[np.ones(len(p_in)), np.zeros(len(p_out))]

    def entropy(pr):
        return -(pr * np.log(np.clip(pr, 1e-300, None))).sum(1)

    result = {
        "accuracy": correct.mean(),
        "nll": -np.log(p_in[np.arange(len(y_in)), y_in]).mean(),
        "ece_15": ece(p_in.max(1), correct),
    }
    for name, s_in, s_out in [
        ("max_softmax", p_in.max(1), p_out.max(1)),
        ("entropy", -entropy(p_in), -entropy(p_out)),
        ("fgn", g_in.max(1), g_out.max(1)),
    ]:
        s = np.r_[s_in, s_out]
        fpr, tpr, _ = roc_curve(labels, s, drop_intermediate=False)
        result[name] = {"auroc": roc_auc_score(labels, s), "fpr_at_95_tpr": fpr[np.argmax(tpr >= 0.95)]}
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
