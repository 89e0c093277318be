"""Load-balance and routing-structure analytics: MaxVio, group × expert routing tables and
expert co-activation — numpy functions on counts, shared by the run report and the projects.

Legend: B batches, L MoE layers, E experts, G groups (domains, tasks), N routed pairs, K slots.

- `max_violation(counts)`: Wang et al. (2024)'s ``MaxVio = max_e c_e / mean_e c_e − 1`` over the
  last axis (METHODS.md G13): 0 under perfect balance, ``E − 1`` when one expert takes all.
- `max_vio(batch_counts_BLE)`: per layer, **global** MaxVio (the counts summed over all batches
  of a dataset, then MaxVio) and **per batch** MaxVio (MaxVio of each batch, averaged; and its
  maximum). Global ≤ mean per-batch, since imbalances of different batches can cancel.
- `group_counts(expert_ids_N, group_ids_N, ...)` and `group_routing_table(counts_GE, names)`:
  which experts each domain or task uses — the share matrix, ``I(group; expert)`` and its
  normalisation by ``H(group)``, each expert's top group and purity.
- `expert_coactivation(topk_ids_TK, E)`: within one layer, how often experts i and j serve the
  same token, with the lift over independence ``P(i, j) / (P(i) P(j))``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["max_violation", "max_vio", "group_counts", "group_routing_table", "expert_coactivation", "mean_sd"]


def max_violation(counts) -> np.ndarray:
    """``max_e c / mean_e c − 1`` over the last axis (float64; 0 where no pair was routed)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim == 0 or c.shape[-1] == 0:
        raise ValueError(f"counts must have an expert axis (last) of size >= 1, got shape {c.shape}")
    mean = c.mean(-1)
    return np.where(mean > 0, c.max(-1) / np.where(mean > 0, mean, 1.0) - 1.0, 0.0)


def max_vio(batch_counts) -> dict:
    """Per-layer MaxVio of routed counts ``(B, L, E)`` (B batches, L layers):
    ``{"global": [L], "batch": [L] (mean over batches), "batch_max": [L]}``."""
    c = np.asarray(batch_counts, dtype=np.float64)
    if c.ndim != 3 or c.shape[0] == 0:
        raise ValueError(f"batch_counts must have shape (B, L, E) with B >= 1, got {c.shape}")
    per_batch = max_violation(c)                                     # (B, L)
    return {"global": max_violation(c.sum(0)).tolist(), "batch": per_batch.mean(0).tolist(),
            "batch_max": per_batch.max(0).tolist()}


def group_counts(expert_ids, group_ids, *, num_experts: int, num_groups: int) -> np.ndarray:
    """(G, E) int64 counts of routed pairs by (group of the pair's token, expert)."""
    e = np.asarray(expert_ids, dtype=np.int64).reshape(-1)
    g = np.asarray(group_ids, dtype=np.int64).reshape(-1)
    if e.shape != g.shape:
        raise ValueError(f"expert_ids and group_ids must have one entry per pair, got {e.shape} and {g.shape}")
    for name, v, n in (("expert_ids", e, num_experts), ("group_ids", g, num_groups)):
        if v.size and (v.min() < 0 or v.max() >= n):
            raise ValueError(f"{name} must lie in [0, {n}), got values in [{v.min()}, {v.max()}]")
    out = np.zeros((num_groups, num_experts), dtype=np.int64)
    np.add.at(out, (g, e), 1)
    return out


def group_routing_table(counts_GE, group_names: Sequence[str]) -> dict:
    """Routing by group (domain or task) from ``(G, E)`` pair counts:

    ``share`` (G, E) rows summing to 1; ``mi`` = ``I(group; expert)`` (nats) and ``nmi`` =
    ``I / H(group)`` (0: experts say nothing about the group; 1: each expert serves one group);
    ``top_group`` / ``purity_expert`` (E,): each expert's most frequent group and its share of the
    expert's load; ``purity``: load-weighted mean purity, against ``chance_purity`` (the largest
    group's share of all pairs).
    """
    from moekit.analysis.routing import mutual_information

    c = np.asarray(counts_GE, dtype=np.int64)
    if c.ndim != 2 or c.shape[0] != len(group_names):
        raise ValueError(f"counts_GE must have shape ({len(group_names)}, E) (one row per group name), got {c.shape}")
    mi, nmi = mutual_information(c)
    load_E = c.sum(0)
    purity_E = c.max(0) / np.maximum(load_E, 1)
    g_tot = c.sum(1)
    return {"groups": list(group_names), "counts": c.tolist(),
            "share": (c / np.maximum(g_tot[:, None], 1)).tolist(), "mi": mi, "nmi": nmi,
            "top_group": [group_names[g] for g in c.argmax(0).tolist()], "purity_expert": purity_E.tolist(),
            "purity": float((purity_E * load_E).sum() / max(load_E.sum(), 1)),
            "chance_purity": float(g_tot.max() / max(g_tot.sum(), 1))}


def expert_coactivation(topk_ids, num_experts: int, mask: Optional[np.ndarray] = None) -> dict:
    """Within one layer: ``counts`` (E, E), tokens that selected both i and j (the diagonal:
    tokens that selected i); ``lift`` (E, E) ``P(i, j) / (P(i) P(j))`` off the diagonal (1:
    independent, 0 where an expert was never selected); ``topk_ids`` (T, K) (slots with id < 0
    are empty), ``mask`` (T,) bool of the tokens to count."""
    ids = np.asarray(topk_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"topk_ids must have shape (T, K), got {ids.shape}")
    if mask is not None:
        ids = ids[np.asarray(mask, dtype=bool)]
    T = ids.shape[0]
    onehot = np.zeros((T, num_experts), dtype=np.int64)
    rows, cols = np.nonzero(ids >= 0)
    onehot[rows, ids[rows, cols]] = 1
    counts = onehot.T @ onehot
    p = np.diag(counts) / max(T, 1)
    expected = np.outer(p, p) * max(T, 1)
    lift = np.where(expected > 0, counts / np.where(expected > 0, expected, 1.0), 0.0)
    np.fill_diagonal(lift, 1.0)
    return {"counts": counts.tolist(), "lift": lift.tolist(), "tokens": int(T)}


def mean_sd(values, *, skip_nan: bool = False) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of run results over seeds; the sd is 0 for
    one value, both are NaN for none. With `skip_nan`, NaN values (runs that produced no number)
    are left out first."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if skip_nan:
        v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
