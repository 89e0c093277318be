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

`apply_capacity_static` decides with shapes fixed by (T, K) alone — a keep mask over the
token-major slots, the capacity itself a device scalar when a padding mask makes it
data-dependent — so a layer with capacity can be captured in a CUDA graph. `apply_capacity`
returns the kept pairs only (their number depends on the data: a host sync on a GPU): the
same decisions compacted, where re-routing may also stop early once nothing is left to place.
tests/test_capacity.py checks `apply_capacity` against plain-Python references and
tests/test_sync_free.py checks that both functions keep exactly the same pairs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from moekit.ops.counting import count_ids

__all__ = ["DROP_POLICIES", "capacity_for", "capacity_tensor", "apply_capacity", "apply_capacity_static",
           "rank_within_expert"]

DROP_POLICIES = ("position", "probability", "reroute")


def capacity_for(capacity_factor: float, top_k: int, num_tokens: int, num_experts: int) -> int:
    """``ceil(capacity_factor · top_k · num_tokens / num_experts)``, at least 1 when tokens exist."""
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    if num_tokens == 0:
        return 0
    return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


def capacity_tensor(capacity_factor: float, top_k: int, num_tokens_0d: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`capacity_for` with the token count a 0-d device tensor (no host sync); int64 0-d.

    Computed in float64 in the same operation order as `capacity_for`, so both round alike.
    """
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    n = num_tokens_0d.to(torch.float64)
    c = torch.ceil(capacity_factor * top_k * n / num_experts).clamp_min(1)
    return torch.where(n > 0, c, torch.zeros_like(c)).to(torch.int64)


def rank_within_expert(expert_ids_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N,) position of each pair among the earlier pairs of the same expert (0-based).

    O(N log N) with a stable sort, no (N, E) one-hot.
    """
    N = expert_ids_N.numel()
    order = torch.argsort(expert_ids_N, stable=True)
    counts_E = count_ids(expert_ids_N, num_experts)
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
    # The static layout's decisions (re-routing may stop once nothing is left to place:
    # a host read per round), compacted to the kept pairs in token-major order.
    expert_TK, w_TK, keep_TK, dropped = _decide(topk_ids_TK, weights_TK, num_experts, capacity, policy, mask_T,
                                                fallback, stop_early=True)
    keep = keep_TK.reshape(-1)
    token_N = torch.arange(topk_ids_TK.shape[0], device=topk_ids_TK.device).repeat_interleave(topk_ids_TK.shape[1])
    return token_N[keep], expert_TK.reshape(-1)[keep], w_TK.reshape(-1)[keep], dropped


def _reroute_setup(topk_ids_TK, weights_TK, mask_T, preference_TE, fallback_weights_TE):
    """``(weight_TE, order_TE, need_T)``: each (token, expert)'s combine weight (the router's
    own for its K choices, the fallback elsewhere), each token's preference order over all
    experts (its K choices first, in their order), and the pairs each token still needs."""
    T, K = topk_ids_TK.shape
    weight_TE = fallback_weights_TE.scatter(1, topk_ids_TK, weights_TK)
    rest_TE = preference_TE.detach().scatter(1, topk_ids_TK, float("inf"))
    rest_order = torch.argsort(rest_TE, dim=1, descending=True, stable=True)[:, K:]
    order_TE = torch.cat([topk_ids_TK, rest_order], dim=1)
    need_T = torch.full((T,), K, dtype=torch.long, device=topk_ids_TK.device)
    if mask_T is not None:
        need_T = need_T * mask_T.long()
    return weight_TE, order_TE, need_T


def apply_capacity_static(topk_ids_TK: torch.Tensor, weights_TK: torch.Tensor, *, num_experts: int,
                          capacity, policy: str = "position", mask_T: Optional[torch.Tensor] = None,
                          fallback=None):
    """`apply_capacity` in the static layout: same decisions, shapes fixed by (T, K).

    `capacity` is an int or a 0-d int64 tensor (see `capacity_tensor`).

    Returns:
        ``(expert_ids_TK, weights_TK, keep_TK, dropped)``: every token's K slots in
        preference order, ``keep_TK`` True for the kept pairs. ``expert_ids_TK`` and the
        weights differ from the inputs only under ``"reroute"`` (slot j of a token holds its
        j-th accepted pair, as `apply_capacity` lists them). Dropped slots keep weight 0.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop policy must be one of {DROP_POLICIES}, got {policy!r}")
    return _decide(topk_ids_TK, weights_TK, num_experts, capacity, policy, mask_T, fallback, stop_early=False)


def _decide(topk_ids_TK, weights_TK, num_experts, capacity, policy, mask_T, fallback, *, stop_early: bool):
    if policy == "reroute":
        if fallback is None:
            raise ValueError("drop policy 'reroute' needs fallback=(preference_TE, weights_TE)")
        return _reroute(topk_ids_TK, weights_TK, num_experts, capacity, mask_T, *fallback, stop_early=stop_early)
    T, K = topk_ids_TK.shape
    device = topk_ids_TK.device
    # Slot-major flattening: index p = k·T + t, so every first choice precedes every second one.
    expert_P = topk_ids_TK.t().reshape(-1)
    valid_P = torch.ones(T * K, dtype=torch.bool, device=device) if mask_T is None else mask_T.repeat(K)
    if policy == "probability":
        # Within each slot, larger weights first; the slot stays the major key.
        slot_P = torch.arange(K, device=device).repeat_interleave(T)
        order = torch.argsort(-weights_TK.t().reshape(-1).detach(), stable=True)
        order = order[torch.argsort(slot_P[order], stable=True)]
    else:
        order = torch.arange(T * K, device=device)
    # Padding goes last, so it takes no room (the dynamic version removes it).
    order = order[torch.argsort((~valid_P[order]).to(torch.int8), stable=True)]
    keep_ordered = (rank_within_expert(expert_P[order], num_experts) < capacity) & valid_P[order]
    keep_P = torch.zeros(T * K, dtype=torch.bool, device=device).scatter(0, order, keep_ordered)
    keep_TK = keep_P.view(K, T).t()
    dropped = (valid_P.sum() - keep_P.sum()).to(torch.int64)
    return topk_ids_TK, torch.where(keep_TK, weights_TK, torch.zeros_like(weights_TK)), keep_TK, dropped


def _reroute(topk_ids_TK, weights_TK, num_experts, capacity, mask_T, preference_TE, fallback_weights_TE, *,
             stop_early: bool):
    """Re-routing in rounds: round r offers every token that still needs a slot its r-th
    preferred expert; candidates sorted first (in token order) so non-candidates take no room.
    Without `stop_early` all E rounds run (no data-dependent control flow); with it the loop
    stops once no token needs a slot or no expert has room (a host read per round)."""
    T, K = topk_ids_TK.shape
    E = num_experts
    device = topk_ids_TK.device
    weight_TE, order_TE, need_T = _reroute_setup(topk_ids_TK, weights_TK, mask_T, preference_TE, fallback_weights_TE)
    room_E = torch.full((E,), 1, dtype=torch.long, device=device) * capacity
    arange_T = torch.arange(T, device=device)
    expert_TK = torch.zeros_like(topk_ids_TK)
    keep_TK = torch.zeros(T, K, dtype=torch.bool, device=device)
    for r in range(E):
        cand_T = need_T > 0
        if stop_early and not (bool(cand_T.any()) and bool((room_E > 0).any())):
            break
        exp_T = order_TE[:, r]
        by_cand = torch.argsort((~cand_T).to(torch.int8), stable=True)      # candidates first, in token order
        rank_T = torch.empty_like(arange_T).scatter(0, by_cand, rank_within_expert(exp_T[by_cand], E))
        accept_T = cand_T & (rank_T < room_E[exp_T])
        room_E = room_E - count_ids(exp_T, E, accept_T)
        # The accepted pair fills the token's next free slot.
        slot_T = (K - need_T).clamp(max=K - 1)
        hit_TK = accept_T.unsqueeze(1) & (torch.arange(K, device=device) == slot_T.unsqueeze(1))
        expert_TK = torch.where(hit_TK, exp_T.unsqueeze(1), expert_TK)
        keep_TK = keep_TK | hit_TK
        need_T = need_T - accept_T.long()
    w_TK = weight_TE.gather(1, expert_TK)
    return expert_TK, torch.where(keep_TK, w_TK, torch.zeros_like(w_TK)), keep_TK, need_T.sum()
