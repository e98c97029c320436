"""The distribution view's expected values (tests/tests/density/distribution.rs) recomputed
with `torch.distributions.MultivariateNormal` in float64: log_prob on X, entropy and
`kl_divergence`, for the full and diagonal p and q of that file. Prints each torch value beside
the constant recorded in the test (parsed from the .rs file, computed there with SciPy and the
closed-form KL) and the largest relative difference; exits non-zero above 1e-12.

Not run in CI (needs torch): `python3 tools/density/torch_reference.py`.
"""

import pathlib
import re
import sys

import torch
from torch.distributions import MultivariateNormal, kl_divergence

TEST = pathlib.Path(__file__).resolve().parents[2] / "tests/tests/density/distribution.rs"
SOURCE = TEST.read_text()


def constant(name):
    match = re.search(rf"const {name}: [^=]+= ([^;]+);", SOURCE, re.S)
    if match is None:
        sys.exit(f"{name} not found in {TEST}")
    numbers = re.findall(r"-?\d+\.\d+(?:e-?\d+)?", match.group(1))
    return torch.tensor([float(n) for n in numbers], dtype=torch.float64)


torch.set_default_dtype(torch.float64)
mean_p, mean_q = constant("MEAN_P"), constant("MEAN_Q")
full_p, full_q = constant("COV_P").reshape(3, 3), constant("COV_Q").reshape(3, 3)
diag_p = torch.diag(torch.tensor([2.0, 0.5, 1.5]))  # as the test file's comment says
diag_q = torch.diag(torch.tensor([1.0, 1.0, 3.0]))
x = constant("X").reshape(4, 3)

rows = []
for prefix, cov_p, cov_q in [("", full_p, full_q), ("DIAG_", diag_p, diag_q)]:
    p = MultivariateNormal(mean_p, covariance_matrix=cov_p)
    q = MultivariateNormal(mean_q, covariance_matrix=cov_q)
    candidates = {
        "LOG_PROB_P": p.log_prob(x),
        "LOG_PROB_Q": q.log_prob(x),
        "ENTROPY_P": p.entropy().reshape(1),
        "ENTROPY_Q": q.entropy().reshape(1),
        "KL_PQ": kl_divergence(p, q).reshape(1),
        "KL_QP": kl_divergence(q, p).reshape(1),
    }
    for name, value in candidates.items():
        if re.search(rf"const {prefix}{name}:", SOURCE):
            recorded = constant(prefix + name)
            error = ((value - recorded).abs() / recorded.abs().clamp(min=1.0)).max().item()
            rows.append((prefix + name, value.tolist(), error))

worst = 0.0
for name, value, error in rows:
    print(f"{name:18} torch {value}  rel. diff vs recorded {error:.1e}")
    worst = max(worst, error)
print(f"torch {torch.__version__}: {len(rows)} recorded constants, largest rel. diff {worst:.1e}")
sys.exit(0 if worst <= 1e-12 else 1)
