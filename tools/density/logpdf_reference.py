"""Reference log-densities for `GaussLayer::log_prob` (tests/data/density/logpdf_d*.safetensors).

Each file holds Z = 2 normals in d dimensions (d = 2, 16, 64): neuron 0 a random, well
conditioned covariance (condition number about 10), neuron 1 a covariance with condition
number exactly 1e6 (eigenvalues log-spaced over [1e-3, 1e3] in a random basis). The inputs `x`
are draws from each neuron, points between them and a few far away. `log_prob_scipy[b, z]` is
`scipy.stats.multivariate_normal(mean[z], covariance[z]).logpdf(x[b])`; `log_prob[b, z]` is the
same formula evaluated with 50-digit mpmath from the f64 inputs (exact to f64 rounding). The
script stops if they differ by more than 1e-10 relative (scipy's eigendecomposition is about
1e-11 off at condition number 1e6), so both are far inside the test's 1e-9.

Tensors (f64): mean (Z, d), covariance (Z, d, d), precision (Z, d, d) (the 50-digit inverse
rounded to f64), x (B, d), log_prob (B, Z), log_prob_scipy (B, Z). Metadata: kind = density_logpdf, the seed, the
condition numbers, the scipy version.

Not run in CI: `python tools/density/logpdf_reference.py tests/data/density`.
"""

import sys
from pathlib import Path

import mpmath
import numpy as np
import scipy
from safetensors.numpy import save_file
from scipy.stats import multivariate_normal

mpmath.mp.dps = 50


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def covariance_with_spectrum(rng, eigenvalues):
    q = random_orthogonal(rng, len(eigenvalues))
    cov = (q * eigenvalues) @ q.T
    return 0.5 * (cov + cov.T)


def logpdf_mp(x, mean, cov):
    """-(d/2) log 2pi - 1/2 log det S - 1/2 (x-m)^T S^-1 (x-m) in 50 digits."""
    d = len(mean)
    s = mpmath.matrix(cov.tolist())
    delta = mpmath.matrix([mpmath.mpf(float(a)) - mpmath.mpf(float(b)) for a, b in zip(x, mean)])
    sol = mpmath.lu_solve(s, delta)
    m2 = sum(delta[i] * sol[i] for i in range(d))
    return -0.5 * d * mpmath.log(2 * mpmath.pi) - 0.5 * mpmath.log(mpmath.det(s)) - 0.5 * m2


def precision_mp(cov):
    inv = mpmath.matrix(cov.tolist()) ** -1
    d = cov.shape[0]
    p = np.array([[float(inv[i, j]) for j in range(d)] for i in range(d)])
    return 0.5 * (p + p.T)


def make(d, seed):
    rng = np.random.default_rng(seed)
    means = rng.uniform(-3.0, 3.0, size=(2, d))
    well = covariance_with_spectrum(rng, rng.uniform(0.3, 3.0, size=d))
    ill = covariance_with_spectrum(rng, np.logspace(-3.0, 3.0, d))
    covs = np.stack([well, ill])
    points = []
    for z in range(2):
        points.append(rng.multivariate_normal(means[z], covs[z], size=12))
    t = rng.uniform(0.0, 1.0, size=(4, 1))
    points.append(means[0] + t * (means[1] - means[0]))
    points.append(rng.standard_normal((4, d)) * 20.0)
    x = np.concatenate(points)
    log_prob = np.stack(
        [multivariate_normal(means[z], covs[z]).logpdf(x) for z in range(2)], axis=1
    )
    exact = np.zeros_like(log_prob)
    for b in range(x.shape[0]):
        for z in range(2):
            exact[b, z] = float(logpdf_mp(x[b], means[z], covs[z]))
    worst = float(np.max(np.abs((log_prob - exact) / exact)))
    if worst > 1e-10:
        raise SystemExit(f"d={d}: scipy differs from mpmath by {worst:.2e} relative")
    precision = np.stack([precision_mp(c) for c in covs])
    conds = [float(np.linalg.cond(c)) for c in covs]
    return (
        {
            "mean": means,
            "covariance": covs,
            "precision": precision,
            "x": x,
            "log_prob": exact,
            "log_prob_scipy": log_prob,
        },
        {
            "kind": "density_logpdf",
            "seed": str(seed),
            "condition_numbers": ",".join(f"{c:.6e}" for c in conds),
            "scipy": scipy.__version__,
            "max_rel_err_scipy_vs_mpmath": f"{worst:.3e}",
        },
    )


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/density")
    out.mkdir(parents=True, exist_ok=True)
    for d, seed in [(2, 2), (16, 16), (64, 64)]:
        tensors, metadata = make(d, seed)
        tensors = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}
        save_file(tensors, str(out / f"logpdf_d{d}.safetensors"), metadata=metadata)
        print(f"d={d}: {metadata}")


if __name__ == "__main__":
    main()
