"""The five fits of R3 and their metrics, all on `moekit.layers.HierarchicalMoE`.

Legend: N samples, P input dim, E = I·J leaves (experts).

A flat mixture of E linear experts is the depth-1 tree ``branching=(E, 1)`` (tests/test_hme.py
checks it equals ``(1, E)`` under EM). Fits:

- ``em_flat``: EM with IRLS gate updates (Jordan & Jacobs 1994) on the flat mixture of 4;
- ``gd_competitive``: gradient descent on Jacobs et al.'s (1991) competitive loss
  ``−log Σ_i g_i exp(−‖y − μ_i‖² / 2σ²)`` with σ = 1 as in the paper,
  `moekit.routing.dense.competitive_loss`; ``gd_competitive_s01``: the same with σ = 0.1
  (twice the noise std), our variant;
- ``gd_cooperative``: gradient descent on ``‖y − Σ_i g_i μ_i‖²`` (the experts are coupled);
- ``em_hme``: the depth-2 tree (2 × 2) by EM;
- ``linear``: one least-squares line (plane).

EM keeps the best of ``restarts`` initialisations by training log-likelihood (`fit_em`'s
``n_init``); gradient descent likewise keeps the restart with the lowest training loss, so
every method gets the same number of starts.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from moekit.layers import HierarchicalMoE
from moekit.optim import UpdateStep, build_optimizer
from moekit.routing.dense import competitive_loss
from projects.piecewise_linear_moe.data import BREAKPOINTS, Regression

__all__ = ["METHODS", "BRANCHING", "gd_loss", "fit_em", "fit_gd", "fit_linear", "leaf_purity",
           "gate_breakpoints", "evaluate"]

METHODS = ("em_flat", "gd_competitive", "gd_competitive_s01", "gd_cooperative", "em_hme", "linear")
BRANCHING = {"em_flat": (4, 1), "gd_competitive": (4, 1), "gd_competitive_s01": (4, 1), "gd_cooperative": (4, 1),
             "em_hme": (2, 2)}


def _model(dim: int, branching, generator: torch.Generator) -> HierarchicalMoE:
    m = HierarchicalMoE(d_model=dim, d_out=1, branching=branching).double()
    m.reset_parameters(generator=generator)
    return m


def gd_loss(model: HierarchicalMoE, x_NP: torch.Tensor, y_N1: torch.Tensor, kind: str, *,
            sigma: float = 1.0) -> torch.Tensor:
    """The training loss of ``gd_competitive`` (kind ``"competitive"``) or ``gd_cooperative``."""
    if kind == "competitive":
        log_top, log_nested = model.log_gates(x_NP)
        logits_NE = (log_top.unsqueeze(-1) + log_nested).flatten(1)      # log g_i g_{j|i}: a valid logit
        means_NE1 = model.leaf_means(x_NP).flatten(1, 2)
        return competitive_loss(logits_NE, means_NE1, y_N1, sigma=sigma)
    if kind == "cooperative":
        return (model(x_NP) - y_N1).square().sum(-1).mean()
    raise ValueError(f"kind must be 'competitive' or 'cooperative', got {kind!r}")


def fit_em(train: Regression, branching, *, generator: torch.Generator, iters: int = 200, restarts: int = 5,
           init_iters: int = 25) -> tuple[HierarchicalMoE, list[float]]:
    """EM (IRLS gate M-steps) from the best of `restarts` starts; returns the model and the
    mean log-likelihood of the chosen start at its initialisation and after every EM iteration
    (its screening iterations included)."""
    m = _model(train.x.shape[1], branching, generator)
    history = m.fit_em(train.x, train.y, iters=iters, tol=1e-10, n_init=restarts, init_iters=init_iters,
                       generator=generator)
    return m, history


def fit_gd(train: Regression, kind: str, *, generator: torch.Generator, steps: int = 1500, lr: float = 0.2,
           restarts: int = 3, sigma: float = 1.0) -> tuple[HierarchicalMoE, list[float]]:
    """Full-batch Adam (cosine schedule to 0) on `gd_loss`; the restart with the lowest final
    training loss and its loss curve."""
    best: Optional[tuple[float, HierarchicalMoE, list[float]]] = None
    for _ in range(restarts):
        m = _model(train.x.shape[1], (4, 1), generator)
        update = UpdateStep(m, build_optimizer(m, name="adam", lr=lr), lr=lr, total_steps=steps, schedule="cosine")
        curve = [update(gd_loss(m, train.x, train.y, kind, sigma=sigma))["loss"] for _ in range(steps)]
        with torch.no_grad():
            final = float(gd_loss(m, train.x, train.y, kind, sigma=sigma))
        if best is None or final < best[0]:
            best = (final, m, curve)
    return best[1], best[2]


def fit_linear(train: Regression) -> torch.Tensor:
    """(P + 1, 1) least-squares weights of ``[x, 1]``."""
    X = torch.cat([train.x, torch.ones_like(train.x[:, :1])], 1)
    return torch.linalg.lstsq(X, train.y).solution


def leaf_purity(leaf_N: torch.Tensor, regime_N: torch.Tensor, num_leaves: int) -> float:
    """Fraction of samples whose leaf is their regime's leaf under the best one-to-one matching of
    regimes to leaves (so two regimes merged into one leaf count once, not twice)."""
    R = int(regime_N.max()) + 1
    counts_RL = torch.zeros(R, num_leaves, dtype=torch.long)
    counts_RL.index_put_((regime_N, leaf_N), torch.ones_like(leaf_N), accumulate=True)
    best = max(sum(int(counts_RL[r, leaf]) for r, leaf in enumerate(perm))
               for perm in itertools.permutations(range(num_leaves), R))
    return best / leaf_N.numel()


def gate_breakpoints(model: HierarchicalMoE, *, points: int = 4001) -> list[float]:
    """1-D: where the argmax leaf changes on a grid of [−1, 1] (midpoints of the grid cells)."""
    grid = torch.linspace(-1, 1, points, dtype=torch.float64).unsqueeze(-1)
    with torch.no_grad():
        leaf = model.leaf_assignment(grid)
    change = (leaf[1:] != leaf[:-1]).nonzero().flatten()
    return ((grid[change, 0] + grid[change + 1, 0]) / 2).tolist()


def evaluate(fit, test: Regression) -> dict:
    """Test MSE; for mixtures also the MSE of the argmax leaf's line alone (``mse_hard``: the
    partition's quality without the gate's softness), regime purity of the argmax partition,
    leaves used and (1-D) the gate breakpoints with the largest distance to the true ones (NaN
    unless exactly three were found)."""
    if isinstance(fit, torch.Tensor):
        X = torch.cat([test.x, torch.ones_like(test.x[:, :1])], 1)
        return {"mse": float((X @ fit - test.y).square().mean())}
    with torch.no_grad():
        out = {"mse": float((fit(test.x) - test.y).square().mean())}
        leaf = fit.leaf_assignment(test.x)
        hard_N1 = fit.leaf_means(test.x).flatten(1, 2)[torch.arange(leaf.numel()), leaf]
        out["mse_hard"] = float((hard_N1 - test.y).square().mean())
    out["purity"] = leaf_purity(leaf, test.regime, fit.branching[0] * fit.branching[1])
    out["leaves_used"] = int(leaf.unique().numel())
    if test.x.shape[1] == 1:
        breaks = gate_breakpoints(fit)
        out["breakpoints"] = breaks
        out["break_err"] = (max(abs(b - t) for b, t in zip(breaks, BREAKPOINTS)) if len(breaks) == len(BREAKPOINTS)
                            else math.nan)
    return out
