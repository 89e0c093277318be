"""Top-p (dynamic) routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing
in MoE Models") — METHODS.md G11.

Legend: T tokens, D model dim, E experts.

``P = softmax(x W_rᵀ)``; sort each token's experts by descending P and keep the shortest
prefix whose cumulative probability exceeds p (the expert that crosses p is kept; an expert is
kept iff the experts ranked above it sum to ≤ p). So ``|S| ≥ 1``, ``sum(top |S|−1) ≤ p <
sum(top |S|)``; p below the largest probability gives one expert and p = 1 gives all E.
Combine weights are the raw probabilities ``P_i`` (the released code does not renormalise).

Because a flat router would select many experts, the dynamic loss
``L_d = β · mean_t(−Σ_i P_i log P_i)`` (routing entropy, β = 1e-4) is added to
``routing.aux_losses["dynamic"]``; the MoE layer adds it to ``aux_loss``. The Switch balance
loss counts f over all kept experts. ``MoE.last_stats.experts_per_token`` reports the mean
number of experts per token.

``top_k`` is not used (the threshold decides the count); an explicit ``top_k`` other than its own count is refused.
``max_experts`` optionally caps the count (``None``: the paper's uncapped rule).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.losses import router_entropy
from moekit.routing.base import Router, Routing, check_no_top_k, router_float
from moekit.routing.pairs import no_drops, pairs_from_selection
from moekit.routing.topk import init_router_weight
from moekit.validate import check_int, check_number, check_probability

__all__ = ["TopPRouter", "top_p_selection"]


def top_p_selection(probs_TE: torch.Tensor, p: float, max_experts: Optional[int] = None) -> torch.Tensor:
    """(T, E) bool: the smallest set of most probable experts whose probability sum exceeds p.

    Ties in probability go to the lower expert index (stable sort).
    """
    sorted_TE, order_TE = torch.sort(probs_TE.detach(), dim=-1, descending=True, stable=True)
    # Mass ranked above each expert, as a shifted cumsum: ``cumsum − P`` can round a prefix
    # that exceeds p down to ≤ p and keep one expert too many.
    before_TE = torch.cat([torch.zeros_like(sorted_TE[:, :1]), torch.cumsum(sorted_TE, -1)[:, :-1]], dim=-1)
    keep_sorted = before_TE <= p
    if max_experts is not None:
        keep_sorted[:, max_experts:] = False
    return torch.zeros_like(keep_sorted).scatter(1, order_TE, keep_sorted)


class TopPRouter(Router):
    """Threshold routing: each token takes experts until their probability mass exceeds p."""

    default_balance_loss = "switch"

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None, *, p: float = 0.4,
                 dynamic_loss_coef: float = 1e-4, max_experts: Optional[int] = None):
        check_no_top_k("top_p", top_k, None)
        super().__init__(d_model, num_experts, None)
        check_probability("p", p, open_low=True)
        check_number("dynamic_loss_coef", dynamic_loss_coef, min=0)
        check_int("max_experts", max_experts, min=1, max=num_experts, allow_none=True)
        self.p, self.dynamic_loss_coef, self.max_experts = float(p), float(dynamic_loss_coef), max_experts
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        init_router_weight(self.weight.data)

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        logits_TE = F.linear(router_float(x_TD), router_float(self.weight))
        probs_TE = torch.softmax(logits_TE, dim=-1)
        selected_TE = top_p_selection(probs_TE, self.p, self.max_experts)
        token_ids, expert_ids, weights = pairs_from_selection(selected_TE, probs_TE, mask)
        aux = {}
        if self.dynamic_loss_coef > 0:
            aux["dynamic"] = self.dynamic_loss_coef * router_entropy(probs_TE, mask=mask)
        return Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights, logits=logits_TE,
                       dropped=no_drops(x_TD.device), num_experts=self.num_experts, probs=probs_TE,
                       aux_losses=aux)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, p={self.p}, "
                f"dynamic_loss_coef={self.dynamic_loss_coef}, max_experts={self.max_experts}")
