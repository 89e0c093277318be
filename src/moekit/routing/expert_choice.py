"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing") —
METHODS.md G5.

Legend: T tokens, D model dim, E experts, C tokens per expert, K experts per token.

``S = softmax(x W_rᵀ)`` over experts; every expert takes its C best tokens,
``G_EC, I_EC = TopK(Sᵀ, C)`` along the token axis with ``C = ceil(c · T / E)`` (capped at T),
and token t's output is ``Σ_{e : t ∈ I_e} S[t, e] · f_e(x_t)``. A token may get 0 experts or
many; the mean is c. Balance is perfect by construction, so there is no balancing loss. With
c = E every expert takes every token and the layer is the dense mixture ``Σ_e p_e f_e``.

Causality. Whether expert e picks token t depends on every other token's score, so expert
choice is not usable for autoregressive decoding. ``causal=True`` keeps expert choice in
training and switches eval/inference to token-choice top-k over the same softmax (weights the
raw probabilities, as expert choice uses them), so generation never looks at other tokens. We
chose this over per-prefix expert choice (which re-ranks all earlier tokens at every position:
O(T²) work and still a different rule than training) because it is cheap and is the usual
practice when an expert-choice model is decoded; its cost is a train/inference mismatch, so
set ``top_k`` near c. Training is still non-causal (a token's selection depends on later
tokens of the batch), like capacity-limited token choice.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.ops.topk import topk_stable
from moekit.routing.base import Router, Routing, router_float
from moekit.routing.capacity import capacity_for
from moekit.routing.pairs import no_drops, pairs_from_selection
from moekit.routing.topk import init_router_weight
from moekit.validate import check_bool, check_int, check_number

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(Router):
    """Experts pick their top-C tokens.

    Args:
        capacity_factor: c, the mean experts per token (default 2; ``C = ceil(c·T/E)``).
        eval_capacity_factor: c in eval (``"same"``: as in training).
        top_k: experts per token of the eval fallback when ``causal=True`` (default 2); without
            ``causal`` the count is the experts' choice, and an explicit top_k is refused.
        causal: token-choice top-k in eval so autoregressive decoding is possible.
        group_size: experts choose within groups of this many consecutive tokens (e.g. the
            sequence length, so one image or sequence never competes with another); ``None``:
            the whole batch is one group. Each group has its own ``C = ceil(c · S / E)``.
    """

    default_balance_loss = "none"
    causal_safe = False

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None, *,
                 capacity_factor: Optional[float] = 2.0, eval_capacity_factor="same", drop_policy: str = "position",
                 causal: bool = False, group_size: Optional[int] = None):
        if not causal and top_k is not None:
            raise ValueError(f"router 'expert_choice' lets experts choose tokens, so a token gets a variable "
                             f"number of experts; top_k only sets the causal=True eval fallback (got top_k={top_k})")
        if causal and top_k is None:
            top_k = 2
        super().__init__(d_model, num_experts, top_k)
        check_int("group_size", group_size, min=1, allow_none=True)
        check_bool("causal", causal)
        self.group_size = group_size
        if capacity_factor is None:
            raise ValueError("expert choice needs a capacity factor c (mean experts per token), got None")
        if drop_policy != "position":
            raise ValueError(f"expert choice has no drop policy (experts pick tokens), got {drop_policy!r}")
        if eval_capacity_factor == "same":
            eval_capacity_factor = capacity_factor
        for name, v in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            check_number(name, v, min=0, min_open=True)
            if v > num_experts:            # c is the mean number of experts per token
                raise ValueError(f"{name} must be in (0, num_experts={num_experts}], got {v!r}")
        self.capacity_factor, self.eval_capacity_factor = float(capacity_factor), float(eval_capacity_factor)
        self.causal = bool(causal)
        # Instance override: with the fallback, eval routing of a token looks at that token only.
        self.causal_safe = self.causal
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        init_router_weight(self.weight.data)

    def tokens_per_expert_for(self, num_tokens: int) -> int:
        """C for a group of `num_tokens` real tokens."""
        c = self.capacity_factor if self.training else self.eval_capacity_factor
        return min(num_tokens, capacity_for(c, 1, num_tokens, self.num_experts))

    def select_by_group_reference(self, scores_ET: torch.Tensor, group_size: int,
                                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(E, T) bool: each expert's top-C tokens of every group of `group_size` consecutive
        tokens (the last group may be shorter; masked tokens never chosen) — one group at a time."""
        E, T = scores_ET.shape
        valid_T = torch.ones(T, dtype=torch.bool, device=scores_ET.device) if mask is None else mask
        selected_ET = torch.zeros(E, T, dtype=torch.bool, device=scores_ET.device)
        for start in range(0, T, group_size):
            C = self.tokens_per_expert_for(int(valid_T[start:start + group_size].sum()))
            if C > 0:
                _, tok_EC = topk_stable(scores_ET[:, start:start + group_size], C)   # ties to the earlier token
                selected_ET[:, start:start + group_size].scatter_(1, tok_EC, True)
        return selected_ET

    def select_full_groups(self, scores_ET: torch.Tensor, group_size: int) -> torch.Tensor:
        """`select_by_group_reference` when every group is full (no mask, T a multiple of the
        group size): one batched top-C over (E, G, S) instead of a loop over the G groups."""
        E, T = scores_ET.shape
        C = self.tokens_per_expert_for(group_size)
        _, tok_EGC = topk_stable(scores_ET.reshape(E, T // group_size, group_size), C)
        selected_EGS = torch.zeros(E, T // group_size, group_size, dtype=torch.bool, device=scores_ET.device)
        return selected_EGS.scatter_(2, tok_EGC, True).view(E, T)

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        logits_TE = F.linear(router_float(x_TD), router_float(self.weight))
        probs_TE = torch.softmax(logits_TE, dim=-1)
        T, E = probs_TE.shape
        if self.causal and not self.training:
            _, topk_ids_TK = topk_stable(probs_TE, self.top_k)
            selected_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device).scatter(1, topk_ids_TK, True)
        else:
            scores_ET = probs_TE.detach().t()
            if mask is not None:
                # Padding can never be picked: it sorts below every real token.
                scores_ET = scores_ET.masked_fill(~mask.unsqueeze(0), -1.0)
            S = T if self.group_size is None else self.group_size
            if mask is None and T > 0 and T % S == 0:
                selected_ET = self.select_full_groups(scores_ET, S)
            else:
                selected_ET = self.select_by_group_reference(scores_ET, S, mask)
            selected_TE = selected_ET.t()
        token_ids, expert_ids, weights = pairs_from_selection(selected_TE, probs_TE, mask)
        return Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights, logits=logits_TE,
                       dropped=no_drops(x_TD.device), num_experts=E, probs=probs_TE)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, causal={self.causal}, top_k={self.top_k}, "
                f"group_size={self.group_size}")
