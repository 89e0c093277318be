"""Synthetic continual linear regression of METHODS.md §15 R2 (our parameters; the paper's own
settings were not retrieved).

N ground-truth vectors ``w_n`` (unit norm) in R^d; task t draws a cluster ``n_t`` uniformly and
s < d samples: the columns of ``X_t`` (d, s) are N(0, I/d) except one, which carries the
cluster's feature ``β · v_{n_t}`` (``v_n`` orthonormal); ``y_t = X_tᵀ w_{n_t}`` (no noise).
"""
from __future__ import annotations

import torch

from moekit.validate import check_int, check_number


def make_tasks(*, num_clusters: int = 4, d: int = 50, num_tasks: int = 2000, samples: int = 20,
               beta: float = 2.0, seed: int = 0):
    """``(tasks, w_true, clusters)``: tasks a list of (X (d, s), y (s,)) float64, w_true (N, d),
    clusters (T,) the cluster of each task."""
    N = check_int("num_clusters", num_clusters, min=1)
    d = check_int("d", d, min=2 * N)
    T = check_int("num_tasks", num_tasks, min=1)
    s = check_int("samples", samples, min=1, max=d - 1)
    beta = check_number("beta", beta, min=0)
    g = torch.Generator().manual_seed(check_int("seed", seed))
    w_true = torch.randn(N, d, generator=g, dtype=torch.float64)
    w_true /= w_true.norm(dim=1, keepdim=True)
    v, _ = torch.linalg.qr(torch.randn(d, N, generator=g, dtype=torch.float64))    # (d, N) orthonormal columns
    clusters = torch.randint(N, (T,), generator=g)
    tasks = []
    for n in clusters.tolist():
        X = torch.randn(d, s, generator=g, dtype=torch.float64) / d ** 0.5
        X[:, torch.randint(s, (1,), generator=g).item()] = beta * v[:, n]
        tasks.append((X, X.T @ w_true[n]))
    return tasks, w_true, clusters
