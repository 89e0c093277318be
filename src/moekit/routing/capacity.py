"""Expert capacity and drop policies (Switch / GShard, METHODS.md T3).

Legend: T tokens, E experts, K experts per token, N kept pairs, C capacity.

Capacity ``C = ceil(cf · K · T / E)``: an expert takes at most C (token, expert) pairs of a
routing group. Who is dropped when more arrive is the drop policy:

- ``"position"``: first choices before second choices (slot-major), and within a slot earlier
  tokens first — the GShard / Switch rule.
- ``"probability"``: slot-major as well, but within a slot the pairs with the larger combine
  weight go first — batch-prioritised routing (V-MoE BPR).
- ``"reroute"``: overflow goes to the token's next-best expert that still has room, in rounds
  over the token's preference order (round r offers every token that still needs a slot its
  r-th preferred expert not yet used; earlier tokens first within a round). A pair is
  dropped only when every one of the E experts in the token's list was full when offered.
  The re-routed pair's weight comes from the router's `fallback_weights`.

A dropped pair contributes exactly 0; a token dropped from all its experts gets MoE output 0
(the residual stream carries it).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["DROP_POLICIES", "capacity_for", "apply_capacity", "rank_within_expert"]

DROP_POLICIES = ("position", "probability", "reroute")


def capacity_for(capacity_factor: float, top_k: int, num_tokens: int, num_experts: int) -> int:
    """``ceil(capacity_factor · top_k · num_tokens / num_experts)``, at least 1 when tokens exist."""
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    if num_tokens == 0:
        return 0
    return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


def rank_within_expert(expert_ids_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N,) position of each pair among the earlier pairs of the same expert (0-based).

    O(N log N) with a stable sort, no (N, E) one-hot.
    """
    N = expert_ids_N.numel()
    order = torch.argsort(expert_ids_N, stable=True)
    counts_E = torch.bincount(expert_ids_N, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    ranks_sorted = torch.arange(N, device=expert_ids_N.device) - starts_E[expert_ids_N[order]]
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def apply_capacity(topk_ids_TK: torch.Tensor, weights_TK: torch.Tensor, *, num_experts: int,
                   capacity: int, policy: str = "position", mask_T: Optional[torch.Tensor] = None,
                   fallback=None):
    """Keep at most `capacity` pairs per expert.

    Args:
        topk_ids_TK: (T, K) chosen experts in preference order.
        weights_TK: (T, K) their combine weights.
        capacity: C, pairs per expert.
        policy: one of `DROP_POLICIES`.
        mask_T: (T,) bool, False for padding tokens (never routed).
        fallback: for ``"reroute"``, ``(preference_TE, weights_TE)``.

    Returns:
        ``(token_ids_N, expert_ids_N, weights_N, dropped)`` with pairs in token-major order and
        ``dropped`` a 0-d int64 tensor counting the valid pairs that were not kept.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop policy must be one of {DROP_POLICIES}, got {policy!r}")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if policy == "reroute":
        if fallback is None:
            raise ValueError("drop policy 'reroute' needs fallback=(preference_TE, weights_TE)")
        return _reroute(topk_ids_TK, weights_TK, num_experts, capacity, mask_T, *fallback)

    T, K = topk_ids_TK.shape
    device = topk_ids_TK.device
    # Slot-major flattening: index p = k·T + t, so every first choice precedes every second one.
    expert_P = topk_ids_TK.t().reshape(-1)
    weight_P = weights_TK.t().reshape(-1)
    token_P = torch.arange(T, device=device).repeat(K)
    valid_P = torch.ones_like(expert_P, dtype=torch.bool) if mask_T is None else mask_T.repeat(K)

    if policy == "probability":
        # Within each slot, larger weights first; the slot stays the major key.
        slot_P = torch.arange(K, device=device).repeat_interleave(T)
        order = torch.argsort(-weight_P.detach(), stable=True)
        order = order[torch.argsort(slot_P[order], stable=True)]
    else:
        order = torch.arange(T * K, device=device)
    order = order[valid_P[order]]

    ranks = rank_within_expert(expert_P[order], num_experts)
    keep_ordered = ranks < capacity
    kept_P = order[keep_ordered]
    dropped = (~keep_ordered).sum()
    # Back to token-major order: (t, k) ↦ t·K + k.
    kept_P = kept_P[torch.argsort(token_P[kept_P] * K + kept_P // T)]
    return token_P[kept_P], expert_P[kept_P], weight_P[kept_P], dropped


def _reroute(topk_ids_TK, weights_TK, num_experts, capacity, mask_T, preference_TE, fallback_weights_TE):
    T, K = topk_ids_TK.shape
    E = num_experts
    device = topk_ids_TK.device
    # Weight lookup: the router's own weights for its K choices, fallback weights elsewhere.
    weight_TE = fallback_weights_TE.scatter(1, topk_ids_TK, weights_TK)
    # Preference order over all experts, the K choices first (in their order), then the rest.
    rest_TE = preference_TE.detach().scatter(1, topk_ids_TK, float("inf"))
    rest_order = torch.argsort(rest_TE, dim=1, descending=True, stable=True)[:, K:]
    order_TE = torch.cat([topk_ids_TK, rest_order], dim=1)

    need_T = torch.full((T,), K, dtype=torch.long, device=device)
    if mask_T is not None:
        need_T = need_T * mask_T.long()
    room_E = torch.full((E,), capacity, dtype=torch.long, device=device)
    arange_T = torch.arange(T, device=device)
    kept_t, kept_e, kept_r = [], [], []
    for r in range(E):
        cand_T = need_T > 0
        if not bool(cand_T.any()) or not bool((room_E > 0).any()):
            break
        tok = arange_T[cand_T]
        exp = order_TE[tok, r]
        accept = rank_within_expert(exp, E) < room_E[exp]
        tok, exp = tok[accept], exp[accept]
        room_E -= torch.bincount(exp, minlength=E)
        need_T[tok] -= 1
        kept_t.append(tok)
        kept_e.append(exp)
        kept_r.append(torch.full_like(tok, r))
    if kept_t:
        tok, exp, rnk = torch.cat(kept_t), torch.cat(kept_e), torch.cat(kept_r)
    else:
        tok = exp = rnk = torch.zeros(0, dtype=torch.long, device=device)
    o = torch.argsort(tok * E + rnk)
    tok, exp = tok[o], exp[o]
    return tok, exp, weight_TE[tok, exp], need_T.sum()
