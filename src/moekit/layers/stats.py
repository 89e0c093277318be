"""Detached per-forward statistics of an MoE layer (METHODS.md contract 10).

Legend: E experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moekit.layers.protocol import LayerStats

__all__ = ["MoEStats", "compute_stats"]


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
def compute_stats(routing, mask: Optional[torch.Tensor], num_tokens: int) -> MoEStats:
    from moekit.losses import router_entropy

    counts = routing.tokens_per_expert()
    kept = counts.sum()
    dropped = routing.dropped.detach() if torch.is_tensor(routing.dropped) else torch.tensor(routing.dropped)
    selected = kept + dropped
    n = num_tokens
    probs = routing.probs
    return MoEStats(
        tokens_per_expert=counts,
        dropped=dropped,
        drop_fraction=dropped.float() / selected.clamp_min(1).float(),
        router_entropy=None if probs is None else router_entropy(probs.detach(), mask=mask),
        experts_per_token=kept.float() / max(n, 1),
        load_imbalance=counts.max().float() / counts.float().mean().clamp_min(1e-9),
        fraction_per_expert=counts.float() / kept.clamp_min(1).float(),
        mean_prob_per_expert=None if probs is None else (
            probs.detach().mean(0) if mask is None else probs.detach()[mask].mean(0)),
        num_tokens=n,
    )
