"""Writes seed inputs for the fuzz targets (see README.md): small valid checkpoints of
several shapes for `checkpoint_load`, the small PyTorch FGN state dicts of
../../shared/interop for `import_state_dict`, and small data files for `data_file`. Needs numpy and safetensors (Python)."""
import json
import pathlib
import shutil

import numpy as np
from safetensors.numpy import save

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent

PRECISION = {"parameterization": "cholesky", "positive_map": "softplus", "factor_diag_floor": 1e-06,
             "width_floor": None, "portable": False}
LAYER = {"precision": PRECISION, "tanh": False, "tied_bias": False, "gaussian_only": False,
         "kernel": "auto",
         "init": {"center_std": 0.1, "precision_scale": None, "perturbation": 0.001, "seed": None}}
RAW = {"cholesky": ("precision_factor", 3), "direct": ("precision", 3), "expm": ("precision_log", 3),
       "diag": ("precision_log_diag", 2), "sphere": ("precision_log_scale", 1)}


def checkpoint(d, hidden, out, param, dtype, batch_norm=False, tied=False, only=False):
    layer = dict(LAYER, precision=dict(PRECISION, parameterization=param), tied_bias=tied,
                 gaussian_only=only)
    config = {"in_features": d, "hidden": hidden, "out_features": out, "layer": layer,
              "output_layer": None, "input_batch_norm": batch_norm, "batch_norm": batch_norm,
              "batch_norm_eps": 1e-05, "dropout": 0.0, "gate": True}
    rng = np.random.default_rng(0)
    tensors = {}

    def norm(prefix, width):
        tensors[f"{prefix}.running_mean"] = np.zeros(width, dtype)
        tensors[f"{prefix}.running_var"] = np.ones(width, dtype)
        tensors[f"{prefix}.weight"] = np.ones(width, dtype)
        tensors[f"{prefix}.bias"] = np.zeros(width, dtype)

    if batch_norm:
        norm("input_norm", d)
    width = d
    for i, z in enumerate(hidden + [out]):
        p = f"layers.{i}"
        if not only:
            tensors[f"{p}.weight"] = rng.normal(size=(z, width)).astype(dtype)
            if not tied:
                tensors[f"{p}.bias"] = rng.normal(size=z).astype(dtype)
        tensors[f"{p}.center"] = rng.normal(size=(z, width)).astype(dtype)
        name, rank = RAW[param]
        shape = [(z,), (z, width), (z, width, width)][rank - 1]
        raw = np.zeros(shape, dtype)
        if rank == 3:
            raw += np.eye(width, dtype=dtype)
        tensors[f"{p}.{name}"] = raw
        if i < len(hidden) and batch_norm:
            norm(f"norms.{i}", z)
        width = z
    meta = {"format": "gauss-layer.gauss-net", "format_version": "3", "config": json.dumps(config),
            "dtype": {np.float32: "f32", np.float64: "f64", np.float16: "f16"}[dtype]}
    return save(tensors, metadata=meta)


seeds = HERE / "corpus" / "checkpoint_load"
seeds.mkdir(parents=True, exist_ok=True)
cases = [
    (2, [], 2, "diag", np.float32, {}),
    (3, [4], 2, "cholesky", np.float32, {"batch_norm": True}),
    (2, [2], 3, "expm", np.float64, {"tied": True}),
    (3, [], 2, "direct", np.float32, {}),
    (2, [3, 2], 2, "sphere", np.float16, {"only": True}),
]
for i, (d, hidden, out, param, dtype, kw) in enumerate(cases):
    (seeds / f"seed-{i}-{param}").write_bytes(checkpoint(d, hidden, out, param, dtype, **kw))

imports = HERE / "corpus" / "import_state_dict"
imports.mkdir(parents=True, exist_ok=True)
interop = ROOT.parent / "shared" / "interop"
for model in sorted(interop.glob("*/model.safetensors")):
    if model.stat().st_size <= 32_000:
        for selector in range(5):
            # The first byte picks the import options (see the target).
            (imports / f"{model.parent.name}-{selector}").write_bytes(
                bytes([selector]) + model.read_bytes())
data = HERE / "corpus" / "data_file"
data.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(1)
files = {
    "x-f64": {"x": rng.normal(size=(6, 3))},
    "x-f32": {"x": rng.normal(size=(4, 2)).astype(np.float32)},
    "digits-u8": {"images": rng.integers(0, 17, size=(3, 8), dtype=np.uint8),
                  "labels": np.array([0, 9, 3], dtype=np.int64)},
    "images-f16": {"images": rng.random((2, 4)).astype(np.float16),
                   "labels": np.array([1, 2], dtype=np.uint8)},
}
for name, tensors in files.items():
    for selector in range(6):
        # The first byte picks the divisor (see the target).
        (data / f"{name}-{selector}").write_bytes(bytes([selector]) + save(tensors))
print("seeds:", len(list(seeds.iterdir())), "checkpoints,", len(list(imports.iterdir())),
      "state dicts,", len(list(data.iterdir())), "data files")
