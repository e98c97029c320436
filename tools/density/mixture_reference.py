"""Small Gaussian-mixture data sets with scikit-learn's scores, for the mixture tests
(tests/data/density/mixture_*.safetensors).

Each file holds `x` (N, d) f64, drawn from a mixture (the same generator as
`tools/density/mixtures.py`), and for every covariance type t in full, diag, spherical two
one-element f64 tensors:
- `sklearn_score_<t>`: `GaussianMixture(K, covariance_type=t, random_state=0).fit(x).score(x)`
  with scikit-learn's defaults (tol 1e-3, reg_covar 1e-6, k-means start): the target;
- `sklearn_best_<t>`: the best score of a tightly converged fit (tol 1e-10, n_init 10):
  the optimum EM can reach.
Metadata: kind = density_mixture, components (K), the scikit-learn version.

Not run in CI: `python tools/density/mixture_reference.py tests/data/density`.
"""

import sys
from pathlib import Path

import numpy as np
import sklearn
from safetensors.numpy import save_file
from sklearn.mixture import GaussianMixture

sys.path.insert(0, str(Path(__file__).parent))
from mixtures import make_mixture  # noqa: E402

CASES = [
    # name, d, K, smallest distance between means, seed, N
    ("mixture_d2_k3_separated", 2, 3, 10.0, 0, 600),
    ("mixture_d2_k3_overlapping", 2, 3, 2.0, 1, 600),
    ("mixture_d10_k4_overlapping", 10, 4, 2.0, 2, 1200),
]


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/density")
    out.mkdir(parents=True, exist_ok=True)
    for name, d, k, distance, seed, n in CASES:
        x = make_mixture(d, k, distance, seed)[:n]
        tensors = {"x": np.ascontiguousarray(x)}
        for t in ["full", "diag", "spherical"]:
            gm = GaussianMixture(k, covariance_type=t, random_state=0).fit(x)
            best = GaussianMixture(
                k, covariance_type=t, random_state=0, tol=1e-10, max_iter=100000, n_init=10
            ).fit(x)
            tensors[f"sklearn_score_{t}"] = np.array([gm.score(x)])
            tensors[f"sklearn_best_{t}"] = np.array([best.score(x)])
            print(name, t, gm.score(x), best.score(x))
        metadata = {
            "kind": "density_mixture",
            "components": str(k),
            "sklearn": sklearn.__version__,
        }
        save_file(tensors, str(out / f"{name}.safetensors"), metadata=metadata)


if __name__ == "__main__":
    main()
