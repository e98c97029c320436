"""Gaussian-mixture benchmark against scikit-learn for `fit-gaussian --components K`.

    python tools/density/mixtures.py generate OUT_DIR
        Writes mixtures of 2-D K = 3, 10-D K = 4 and 32-D K = 5 normals, each well separated
        and overlapping, seeds 0, 1, 2 (N = 3000 points; `x` (N, d) f64 in
        OUT_DIR/<name>.safetensors) and fits each with scikit-learn's GaussianMixture for
        covariance_type full, diag and spherical (defaults; random_state = seed). Records the
        score (mean log-likelihood, nats per sample), the median wall time of 3 fits, and the
        score of a tightly converged best-of-5 fit (tol 1e-10) in OUT_DIR/sklearn.jsonl.

    python tools/density/mixtures.py compare OUT_DIR BIN [PARAM ...]
        Runs `BIN --data <file> --components K --param PARAM --seed <seed>` (BIN: the
        fit-gaussian release binary) on every mixture, for PARAM in cholesky, expm, direct,
        diag, sphere by default, and prints one row per run: our mean log-likelihood, sklearn's
        score for the matching covariance type (full for cholesky/expm/direct), the difference,
        the gap to the converged best, both wall times and their ratio. The times are
        re-measured here, interleaved (3 sklearn fits, then 3 of ours, per row; medians; ours is
        the `seconds` the binary reports: the fit alone, as sklearn's `fit`), so that load on a
        shared machine affects both alike. Exit status 1 if any run falls more than 1e-3 nats
        per sample below sklearn or takes more than 10x its time.

Not run in CI. Timings on a shared machine are indicative only.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.mixture import GaussianMixture

SHAPES = [(2, 3), (10, 4), (32, 5)]
SEEDS = [0, 1, 2]
SEPARATIONS = {"separated": 10.0, "overlapping": 2.0}
N = 3000
SKLEARN_TYPE = {
    "cholesky": "full",
    "expm": "full",
    "direct": "full",
    "diag": "diag",
    "sphere": "spherical",
}


def make_mixture(d, k, min_distance, seed):
    rng = np.random.default_rng(1000 * d + 100 * k + seed + int(min_distance))
    weights = rng.dirichlet(np.full(k, 5.0))
    covs = []
    for _ in range(k):
        a = rng.standard_normal((d, d))
        cov = a @ a.T / d + 0.1 * np.eye(d)
        covs.append(cov * rng.uniform(0.5, 2.0))
    means = rng.standard_normal((k, d))
    dists = [np.linalg.norm(means[i] - means[j]) for i in range(k) for j in range(i)]
    means *= min_distance / min(dists)
    counts = rng.multinomial(N, weights)
    x = np.concatenate(
        [rng.multivariate_normal(means[i], covs[i], size=counts[i]) for i in range(k)]
    )
    return x[rng.permutation(N)]


def datasets():
    for d, k in SHAPES:
        for separation, min_distance in SEPARATIONS.items():
            for seed in SEEDS:
                yield f"mix_d{d}_k{k}_{separation}_s{seed}", d, k, min_distance, seed


def generate(out):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sklearn.jsonl", "w") as log:
        for name, d, k, min_distance, seed in datasets():
            x = make_mixture(d, k, min_distance, seed)
            save_file({"x": np.ascontiguousarray(x)}, str(out / f"{name}.safetensors"))
            for cov_type in ["full", "diag", "spherical"]:
                times, score = [], None
                for _ in range(3):
                    gm = GaussianMixture(k, covariance_type=cov_type, random_state=seed)
                    t = time.perf_counter()
                    gm.fit(x)
                    times.append(time.perf_counter() - t)
                    score = gm.score(x)
                best = GaussianMixture(
                    k, covariance_type=cov_type, random_state=seed, tol=1e-10,
                    max_iter=100000, n_init=5,
                ).fit(x)
                row = {
                    "name": name, "d": d, "k": k, "seed": seed,
                    "covariance_type": cov_type, "score": score,
                    "seconds": statistics.median(times), "n_iter": int(gm.n_iter_),
                    "best_score": best.score(x),
                }
                log.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


def compare(out, binary, params):
    rows = {}
    for line in open(out / "sklearn.jsonl"):
        r = json.loads(line)
        rows[(r["name"], r["covariance_type"])] = r
    failures = 0
    print(f"{'mixture':34} {'param':8} {'ours':>12} {'sklearn':>12} {'ours-skl':>10} "
          f"{'best-ours':>10} {'t_ours':>7} {'t_skl':>7} {'ratio':>6} steps")
    for name, d, k, _, seed in datasets():
        x = load_file(str(out / f"{name}.safetensors"))["x"]
        for param in params:
            ref = rows[(name, SKLEARN_TYPE[param])]
            skl_times = []
            for _ in range(3):
                gm = GaussianMixture(k, covariance_type=SKLEARN_TYPE[param], random_state=seed)
                t = time.perf_counter()
                gm.fit(x)
                skl_times.append(time.perf_counter() - t)
            skl_seconds = statistics.median(skl_times)
            cmd = [binary, "--data", str(out / f"{name}.safetensors"), "--components",
                   str(k), "--param", param, "--seed", str(seed)]
            runs = []
            for _ in range(3):
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    break
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if len(runs) < 3:
                print(f"{name} {param}: failed: {done.stderr.strip()}")
                failures += 1
                continue
            ours = dict(runs[0], seconds=statistics.median(r["seconds"] for r in runs))
            diff = ours["mean_log_likelihood"] - ref["score"]
            ratio = ours["seconds"] / skl_seconds
            ok = diff >= -1e-3 and ratio <= 10.0
            failures += 0 if ok else 1
            print(f"{name:34} {param:8} {ours['mean_log_likelihood']:12.6f} {ref['score']:12.6f} "
                  f"{diff:10.2e} {ref['best_score'] - ours['mean_log_likelihood']:10.2e} "
                  f"{ours['seconds']:7.3f} {skl_seconds:7.3f} {ratio:6.2f} {ours['steps']}"
                  f"{'' if ok else '  <-- FAIL'}", flush=True)
    print(f"{failures} run(s) outside the targets")
    return 1 if failures else 0


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "generate":
        generate(Path(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare":
        params = sys.argv[4:] or list(SKLEARN_TYPE)
        sys.exit(compare(Path(sys.argv[2]), sys.argv[3], params))
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
