"""Detached per-forward statistics of an MoE layer (METHODS.md contract 10).

Legend: E experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moekit.layers.protocol import LayerStats
from moekit.losses import BalanceStats, balance_stats

__all__ = ["MoEStats", "compute_stats", "moe_stats"]


@dataclass
class MoEStats(LayerStats):
    """What one forward pass did. Tensors are detached; read them with ``.item()`` or ``[...]``.

    tokens_per_expert: (E,) kept pairs per expert.
    dropped: pairs dropped by capacity.
    drop_fraction: dropped / selected pairs.
    router_entropy: mean over tokens of the routing distribution's entropy (nats).
    experts_per_token: mean kept experts per (unmasked) token.
    load_imbalance: max / mean of tokens_per_expert (1 = perfect balance).
    fraction_per_expert: (E,) f, share of kept pairs per expert.
    mean_prob_per_expert: (E,) P, mean router probability per expert (None without probs).
    num_tokens: unmasked tokens routed.
    """

    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor
    drop_fraction: torch.Tensor
    router_entropy: Optional[torch.Tensor]
    experts_per_token: torch.Tensor
    load_imbalance: torch.Tensor
    fraction_per_expert: torch.Tensor
    mean_prob_per_expert: Optional[torch.Tensor]
    num_tokens: int



@torch.no_grad()
def moe_stats(s: BalanceStats) -> MoEStats:
    """`MoEStats` from the sufficient statistics of one forward pass (`balance_stats(...,
    statistics=True)`, summed over ranks or not). Means over no valid token are 0, not NaN;
    reading ``num_tokens`` (an int) waits for the device."""
    if not s.has_statistics:
        raise ValueError("moe_stats needs BalanceStats computed with statistics=True")
    # Counts may come back from a float64 all-reduce: round them to integers again.
    counts = s.kept_counts.round().long() if s.kept_counts.is_floating_point() else s.kept_counts
    dropped = s.dropped.round().long() if s.dropped.is_floating_point() else s.dropped
    kept = counts.sum()
    n = s.n_valid.clamp_min(1)
    has_probs = s.entropy_sum is not None
    return MoEStats(
        tokens_per_expert=counts,
        dropped=dropped,
        drop_fraction=dropped.float() / (kept + dropped).clamp_min(1).float(),
        router_entropy=(s.entropy_sum / n).float() if has_probs else None,
        experts_per_token=(kept / n).float(),
        load_imbalance=counts.max().float() / counts.float().mean().clamp_min(1e-9),
        fraction_per_expert=counts.float() / kept.clamp_min(1).float(),
        mean_prob_per_expert=(s.prob_sum.detach() / n).float() if has_probs else None,
        num_tokens=int(round(float(s.n_valid))),
    )


def compute_stats(routing, mask: Optional[torch.Tensor] = None, *, num_tokens: Optional[int] = None) -> MoEStats:
    """`MoEStats` of one `Routing` (padding excluded by `mask`)."""
    return moe_stats(balance_stats(routing, mask, statistics=True, num_tokens=num_tokens))
