"""Expected values of the batch distribution view (tests/tests/density/distribution.rs,
`MultivariateNormalBatch`): SciPy's `multivariate_normal(mean, cov).logpdf` / `.entropy()`
and the closed-form KL `½[tr(Σq⁻¹Σp) + (μq − μp)ᵀΣq⁻¹(μq − μp) − d + ln det Σq − ln det Σp]`
(the formula of `torch.distributions.kl_divergence` for two MultivariateNormals), in f64,
for the normals p and q of that test file (full, and diagonal covariances).

Not run in CI: `python3 tools/density/batch_reference.py`.
"""

import numpy as np
import scipy
from scipy.stats import multivariate_normal

MEAN_P = np.array([0.5, -1.0, 2.0])
COV_P = np.array([[2.0, 0.3, -0.4], [0.3, 1.0, 0.2], [-0.4, 0.2, 0.5]])
MEAN_Q = np.array([-0.25, 0.75, 1.5])
COV_Q = np.array([[1.0, -0.2, 0.1], [-0.2, 3.0, 0.6], [0.1, 0.6, 0.8]])
X = np.array([[0.0, 0.0, 0.0], [0.5, -1.0, 2.0], [3.0, -2.0, 1.0], [-1.5, 0.25, 2.5]])


def kl(mp, cp, mq, cq):
    pq = np.linalg.inv(cq)
    delta = mq - mp
    d = len(mp)
    return 0.5 * (
        np.trace(pq @ cp)
        + delta @ pq @ delta
        - d
        + np.linalg.slogdet(cq)[1]
        - np.linalg.slogdet(cp)[1]
    )


def report(tag, cov_p, cov_q):
    p = multivariate_normal(MEAN_P, cov_p)
    q = multivariate_normal(MEAN_Q, cov_q)
    print(tag, "log_prob q on X", repr(q.logpdf(X).tolist()))
    # torch's batch semantics: x (N, 2, d); member 0 (p) scores X[i], member 1 (q) X[3 - i].
    print(tag, "paired q on X reversed", repr(q.logpdf(X[::-1]).tolist()))
    print(tag, "entropy q", repr(float(q.entropy())))
    print(tag, "kl qp", repr(float(kl(MEAN_Q, cov_q, MEAN_P, cov_p))))


if __name__ == "__main__":
    print("scipy", scipy.__version__)
    report("full", COV_P, COV_Q)
    report("diag", np.diag([2.0, 0.5, 1.5]), np.diag([1.0, 1.0, 3.0]))
    p = multivariate_normal(MEAN_P, COV_P)
    print("check: log_prob p on X", repr(p.logpdf(X).tolist()), repr(float(p.entropy())))
