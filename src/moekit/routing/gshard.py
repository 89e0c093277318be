"""GShard top-2 gating with random second expert and local groups (Lepikhin et al. 2020,
"GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding") — METHODS.md G3.

Legend: T tokens, D model dim, E experts, S tokens per group, G groups, C capacity.

``p = softmax(x W_rᵀ)``; first choice ``e1 = argmax p``, second ``e2 = argmax`` over the rest;
gates ``g1 = p_e1 / (p_e1 + p_e2)``, ``g2 = p_e2 / (p_e1 + p_e2)``.

- The token always goes to e1 (if e1 has room in its group).
- In training it goes to e2 only with probability ``min(1, 2·g2)`` ("random routing": a weak
  second expert is often skipped, saving capacity). A skipped second choice takes no slot and
  is not counted as dropped; the token keeps ``g1`` (weights are not renormalised again).
- In eval the draw is off: every token goes to both experts (deterministic top-2 renorm).

Tokens are split into groups of ``group_size`` consecutive tokens (``None``: one group), each
with its own capacity ``C = ceil(cf · 2 · S / E)`` (GShard: cf = 1 per slot). First choices
claim slots before second choices, earlier tokens first (the "position" policy); overflow is
dropped. ``capacity_factor=None`` is dropless.

Balancing: the library's Switch form ``E · Σ_e f_e P_e`` over both choices (f counted over the
2·T selections, equal to 1 at balance); GShard's own loss counts first choices only.
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.routing.base import Routing
from moekit.routing.capacity import capacity_for, rank_within_expert
from moekit.routing.topk import TopKRouter
from moekit.validate import check_bool, check_int

__all__ = ["GShardRouter"]


class GShardRouter(TopKRouter):
    supports_sync_free = False      # its per-group capacity sizes groups on the host
    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, group_size: Optional[int] = None,
                 random_routing: bool = True, capacity_factor=None, eval_capacity_factor="same",
                 drop_policy: str = "position"):
        if top_k != 2:
            raise ValueError(f"GShard gating is top-2, got top_k={top_k}")
        if num_experts < 2:
            raise ValueError(f"GShard gating needs num_experts >= 2, got {num_experts}")
        check_int("group_size", group_size, min=1, allow_none=True)
        check_bool("random_routing", random_routing)
        super().__init__(d_model, num_experts, 2, norm="renorm", capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy)
        self.group_size = group_size
        self.random_routing = bool(random_routing)

    def set_capacity(self, capacity_factor, eval_capacity_factor="same", drop_policy: str = "position") -> None:
        if drop_policy != "position":
            raise ValueError(f"GShard routing drops by position only, got drop_policy={drop_policy!r}")
        super().set_capacity(capacity_factor, eval_capacity_factor, drop_policy)

    def second_keep_prob(self, weights_TK: torch.Tensor) -> torch.Tensor:
        """(T,) probability of dispatching each token to its second expert: ``min(1, 2·g2)``."""
        return (2.0 * weights_TK[:, 1].detach()).clamp(max=1.0)

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        logits_TE = self.logits(x_TD)
        topk_ids_TK, weights_TK, probs_TE = self.select(logits_TE)
        T, E = logits_TE.shape
        device = logits_TE.device
        valid_T = torch.ones(T, dtype=torch.bool, device=device) if mask is None else mask
        second_T = valid_T
        if self.training and self.random_routing:
            second_T = valid_T & (torch.rand(T, device=device) < self.second_keep_prob(weights_TK))

        # Candidate pairs, slot-major: every first choice before every second choice.
        arange_T = torch.arange(T, device=device)
        token_P = torch.cat([arange_T[valid_T], arange_T[second_T]])
        slot_P = torch.cat([torch.zeros_like(arange_T[valid_T]), torch.ones_like(arange_T[second_T])])
        expert_P = topk_ids_TK[token_P, slot_P]
        dropped = torch.zeros((), dtype=torch.long, device=device)
        cf = self.current_capacity_factor()
        if cf is not None:
            S = T if self.group_size is None else self.group_size
            group_P = token_P // S
            # Capacity per group counts that group's real tokens (a short last group gets less).
            n_valid_G = torch.bincount(arange_T[valid_T] // S, minlength=(T + S - 1) // S)
            cap_G = torch.tensor([capacity_for(cf, 2, int(n), E) for n in n_valid_G.tolist()],
                                 dtype=torch.long, device=device)
            # (group, expert) pairs become virtual experts, so one ranking serves every group.
            rank_P = rank_within_expert(group_P * E + expert_P, cap_G.numel() * E)
            keep_P = rank_P < cap_G[group_P]
            dropped = (~keep_P).sum()
            token_P, slot_P, expert_P = token_P[keep_P], slot_P[keep_P], expert_P[keep_P]
        order = torch.argsort(token_P * 2 + slot_P)
        token_P, slot_P, expert_P = token_P[order], slot_P[order], expert_P[order]
        return Routing(token_ids=token_P, expert_ids=expert_P, weights=weights_TK[token_P, slot_P],
                       logits=logits_TE, dropped=dropped, num_experts=E, probs=probs_TE,
                       topk_ids=topk_ids_TK,
                       extras={"second_dispatched": second_T.detach()})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, random_routing={self.random_routing}"
