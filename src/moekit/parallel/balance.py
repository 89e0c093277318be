"""Balancing losses and routing statistics over the global batch of all data-parallel ranks.

Legend: T tokens (this rank), E experts, K experts per token.

Global-batch balancing (Qiu et al. 2025, "Demons in the Detail", Qwen; METHODS.md T1 (f)):
the load fractions f and mean probabilities P of the Switch loss ``E · Σ_e f_e · P_e`` are
summed over every rank before the loss is formed, so N ranks compute exactly the loss one
process computes on the concatenated batch. Means over tokens or sequences (z-loss, the
sequence-wise loss) become ``Σ_ranks sum / Σ_ranks count``. Counts travel without gradient;
the probability sums through a differentiable all-reduce whose backward sums the gradients
over ranks, so with gradients averaged over ranks (`moekit.parallel.grad_sync`) the router
gradient equals the single-process one.

Scope is one micro-batch step of all ranks: under gradient accumulation each micro-step's
loss is global over the ranks of that micro-step, exactly like one process running the
same micro-steps on the concatenated micro-batches.
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.layers.stats import MoEStats
from moekit.losses import cv_squared, selection_counts, sequence_balance_loss, z_loss
from moekit.parallel.comm import all_reduce_sum

__all__ = ["global_balance_loss", "global_aux_loss", "global_mean", "reduce_stats", "BALANCE_SCOPES"]

BALANCE_SCOPES = ("global", "local")


def _n_valid(T: int, mask: Optional[torch.Tensor], device) -> torch.Tensor:
    return torch.tensor(float(T), device=device) if mask is None else mask.sum().float()


def global_mean(local_mean: torch.Tensor, local_count: torch.Tensor, group=None) -> torch.Tensor:
    """``Σ_ranks local_mean · local_count / Σ_ranks local_count`` (differentiable)."""
    packed = torch.stack([local_mean.float() * local_count.float(), local_count.float().detach()]).double()
    total = all_reduce_sum(packed, group)
    return (total[0] / total[1].clamp_min(1)).float()


def _masked_sum_rows(x_TE: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    x = x_TE.float()
    return x.sum(0) if mask is None else (x * mask.unsqueeze(-1).to(x.dtype)).sum(0)


def global_balance_loss(kind: str, routing, *, mask: Optional[torch.Tensor] = None,
                        seq_len: Optional[int] = None, group=None) -> torch.Tensor:
    """`moekit.losses.balance_loss` over the global batch of `group` (same kinds, unweighted)."""
    from moekit.losses import BALANCE_LOSSES

    if kind not in BALANCE_LOSSES:
        raise ValueError(f"balance loss must be one of {BALANCE_LOSSES}, got {kind!r}")
    probs, topk = routing.probs, routing.topk_ids
    device = routing.weights.device
    if kind == "none" or probs is None:
        return torch.zeros((), device=device)
    E = routing.num_experts
    T = probs.shape[0]
    if kind == "switch":
        counts_E = routing.tokens_per_expert() if topk is None else selection_counts(topk, E, mask)
        # One reduction: [Σ_t p_te (E) | counts (E) | valid tokens (1)], float64 so counts stay exact.
        packed = torch.cat([_masked_sum_rows(probs, mask), counts_E.float().detach(),
                            _n_valid(T, mask, device).reshape(1).detach()]).double()
        total = all_reduce_sum(packed, group)
        P_E = (total[:E] / total[2 * E].clamp_min(1)).float()
        f_E = (total[E:2 * E] / total[E:2 * E].sum().clamp_min(1)).float()
        return E * (f_E * P_E).sum()
    if kind == "importance_load":
        gates = routing.extras.get("gates")
        if gates is None:
            raise ValueError("balance loss 'importance_load' needs routing.extras['gates'] (noisy_topk router)")
        load = routing.extras.get("load_probs")
        load_E = _masked_sum_rows(load, mask) if load is not None else \
            selection_counts(topk, E, mask).float()
        total = all_reduce_sum(torch.cat([_masked_sum_rows(gates, mask), load_E]).double(), group).float()
        return cv_squared(total[:E]) + cv_squared(total[E:])
    # "sequence": a mean over sequences that hold at least one valid token.
    if topk is None:
        raise ValueError("balance loss 'sequence' needs a token-choice router (routing.topk_ids)")
    S = seq_len or T
    local = sequence_balance_loss(probs, topk, seq_len=S, mask=mask)
    n_seq = torch.tensor(float(T // S), device=device) if mask is None else \
        (mask.view(-1, S).sum(1) > 0).sum().float()
    return global_mean(local, n_seq, group)


def global_aux_loss(layer, routing, mask_T: Optional[torch.Tensor], seq_len: int, group=None) -> torch.Tensor:
    """The MoE layer's ``aux_loss`` (`MoE.compute_aux_loss`) with every term over the global batch.

    Router-specific terms in ``routing.aux_losses`` are taken as per-token means and averaged
    with the valid-token counts as weights.
    """
    device = routing.weights.device
    T = routing.logits.shape[0] if routing.logits is not None else (
        routing.probs.shape[0] if routing.probs is not None else None)
    total = torch.zeros((), device=device)
    if layer.aux_loss_coef > 0 and layer.balance_loss != "none":
        total = total + layer.aux_loss_coef * global_balance_loss(layer.balance_loss, routing, mask=mask_T,
                                                                  seq_len=seq_len, group=group)
    if layer.z_loss_coef > 0 and routing.logits is not None:
        local = z_loss(routing.logits, mask=mask_T)
        total = total + layer.z_loss_coef * global_mean(local, _n_valid(T, mask_T, device), group)
    if routing.aux_losses:
        n = _n_valid(T, mask_T, device) if T is not None else torch.ones((), device=device)
        for v in routing.aux_losses.values():
            total = total + global_mean(v, n, group)
    return total


@torch.no_grad()
def reduce_stats(stats: MoEStats, group=None) -> MoEStats:
    """`MoEStats` of the global batch from each rank's own (sums and token-weighted means)."""
    E = stats.tokens_per_expert.numel()
    device = stats.tokens_per_expert.device
    n = float(stats.num_tokens)
    has_probs = stats.mean_prob_per_expert is not None
    ent = stats.router_entropy if stats.router_entropy is not None else torch.zeros((), device=device)
    mp = stats.mean_prob_per_expert if has_probs else torch.zeros(E, device=device)
    packed = torch.cat([stats.tokens_per_expert.double(), stats.dropped.double().reshape(1),
                        torch.tensor([n], dtype=torch.float64, device=device),
                        (ent.double() * n).reshape(1), mp.double() * n])
    total = all_reduce_sum(packed, group, differentiable=False)
    counts = total[:E].round().long()
    dropped = total[E].round().long()
    N = total[E + 1]
    kept = counts.sum()
    selected = kept + dropped
    return MoEStats(
        tokens_per_expert=counts,
        dropped=dropped,
        drop_fraction=dropped.float() / selected.clamp_min(1).float(),
        router_entropy=(total[E + 2] / N.clamp_min(1)).float() if stats.router_entropy is not None else None,
        experts_per_token=kept.float() / max(float(N), 1.0),
        load_imbalance=counts.max().float() / counts.float().mean().clamp_min(1e-9),
        fraction_per_expert=counts.float() / kept.clamp_min(1).float(),
        mean_prob_per_expert=(total[E + 3:] / N.clamp_min(1)).float() if has_probs else None,
        num_tokens=int(round(float(N))),
    )
