"""scikit-learn's `covariance_type='tied'` on fixed data, for the tied-mixture tests
(tests/tests/density/mixture_tied.rs records what this prints).

1. EM from a fixed start: X (30, 2) below, K = 3, `weights_init`, `means_init` and
   `precisions_init` given (so scikit-learn's k-means start is not used), `tol=0` and
   `max_iter=STEPS` (exactly STEPS EM iterations), `reg_covar=1e-6`. Printed: the fitted
   `weights_`, `means_`, `covariances_`, and `score`, `bic`, `aic`, `predict`,
   `predict_proba[:, 1]`, `score_samples` on X. The test sets the same start through
   `set_parameters` and runs `fit` with `warm_start` and `max_em_steps = STEPS`.
2. The mixture files of tests/data/density: `score` of
   `GaussianMixture(K, covariance_type='tied', random_state=0)` with its defaults (the target)
   and the best of 10 tightly converged starts (tol 1e-10; the optimum EM reaches).

Not run in CI: `python3 tools/density/tied_reference.py`.
"""

import numpy as np
import sklearn
from safetensors.numpy import load_file
from sklearn.mixture import GaussianMixture

X = np.array(
    [
        [0.1, 0.2], [0.9, -0.4], [-0.6, 0.5], [0.3, 1.1], [-0.2, -0.8],
        [1.4, 0.3], [0.7, 0.9], [-1.1, -0.2], [0.05, -0.35], [0.6, 0.15],
        [1.3, 1.0], [2.1, 0.3], [0.7, 1.8], [1.9, 2.3], [2.6, 1.2],
        [1.0, 0.1], [1.5, 1.5], [2.3, 0.8], [1.1, 2.7], [1.7, 0.6],
        [-1.1, 1.5], [-1.8, 0.6], [-0.4, 2.3], [-1.5, 2.7], [-0.8, 0.8],
        [-2.2, 2.0], [-0.2, 1.2], [-1.3, 1.4], [-0.6, 3.0], [-2.0, 0.3],
    ]
)
WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0]])
COVARIANCE = np.array([[1.5, 0.4], [0.4, 1.0]])
STEPS = 5


def fixed_start():
    gm = GaussianMixture(
        3,
        covariance_type="tied",
        weights_init=WEIGHTS,
        means_init=MEANS,
        precisions_init=np.linalg.inv(COVARIANCE),
        tol=0.0,
        max_iter=STEPS,
        reg_covar=1e-6,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X)
    assert gm.n_iter_ == STEPS
    print("sklearn", sklearn.__version__)
    print("weights", repr(gm.weights_.tolist()))
    print("means", repr(gm.means_.tolist()))
    print("covariance", repr(gm.covariances_.tolist()))
    print("score", repr(gm.score(X)))
    print("bic", repr(gm.bic(X)))
    print("aic", repr(gm.aic(X)))
    print("predict", gm.predict(X).tolist())
    print("proba_1", repr(gm.predict_proba(X)[:, 1].tolist()))
    print("score_samples", repr(gm.score_samples(X).tolist()))


def files():
    for name, k in [
        ("mixture_d2_k3_separated", 3),
        ("mixture_d2_k3_overlapping", 3),
        ("mixture_d10_k4_overlapping", 4),
    ]:
        x = load_file(f"tests/data/density/{name}.safetensors")["x"]
        gm = GaussianMixture(k, covariance_type="tied", random_state=0).fit(x)
        best = GaussianMixture(
            k, covariance_type="tied", random_state=0, tol=1e-10, max_iter=100000, n_init=10
        ).fit(x)
        print(name, repr(gm.score(x)), repr(best.score(x)))


if __name__ == "__main__":
    fixed_start()
    files()
