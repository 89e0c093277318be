"""Adaptive k with null experts, AdaMoE (Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with
Null Experts for Mixture-of-Experts Language Models") — METHODS.md G16.

Legend: T tokens, D model dim, E real experts, M null experts, K experts per token.

The router scores ``E + M`` experts, ``p = softmax(x W_rᵀ)`` over all of them, and each token
takes its top-K, with weights renormalised over the K (null ones included). A null expert
outputs zero at no cost, so its pairs are simply not dispatched: a token runs between 0 and K
real experts, and its real weights sum to at most 1. The balancing loss spans all ``E + M``
(``(E+M) · Σ f P``, f over the T·K selections), so null experts absorb load; it is added to
``routing.aux_losses["balance"]`` with ``balance_coef`` (the layer's own balance loss is off
by default). With M = 0 the router is plain top-k renorm.

``Routing.logits``/``probs`` hold the real experts' columns; the full (T, E + M) ones and the
(T, K) selection are in ``extras`` (``"logits_all"``, ``"probs_all"``, ``"topk_ids_all"``).
Dropless only: capacity is a property of real experts and null pairs take none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.losses import load_balancing_loss, selection_counts
from moekit.ops.topk import topk_stable
from moekit.routing.base import Router, Routing, router_float
from moekit.routing.pairs import no_drops
from moekit.routing.topk import init_router_weight
from moekit.validate import check_int, check_number

__all__ = ["NullExpertsRouter"]


class NullExpertsRouter(Router):
    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, num_null_experts: int = 1,
                 balance_coef: float = 1e-2):
        super().__init__(d_model, num_experts, top_k)
        check_int("num_null_experts", num_null_experts, min=0)
        check_number("balance_coef", balance_coef, min=0)
        self.num_null_experts, self.balance_coef = num_null_experts, float(balance_coef)
        self.weight = nn.Parameter(torch.empty(num_experts + num_null_experts, d_model))
        init_router_weight(self.weight.data)

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        E = self.num_experts
        logits_TA = F.linear(router_float(x_TD), router_float(self.weight))            # A = E + M
        probs_TA = torch.softmax(logits_TA, dim=-1)
        top_p_TK, topk_ids_TK = topk_stable(probs_TA, self.top_k)
        weights_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True)
        real_TK = topk_ids_TK < E
        if mask is not None:
            real_TK = real_TK & mask.unsqueeze(-1)
        token_ids, slot = real_TK.nonzero(as_tuple=True)          # token-major, then preference
        aux = {}
        if self.balance_coef > 0:
            counts_A = selection_counts(topk_ids_TK, E + self.num_null_experts, mask)
            aux["balance"] = self.balance_coef * load_balancing_loss(probs_TA, counts_A, self.top_k, mask=mask)
        return Routing(token_ids=token_ids, expert_ids=topk_ids_TK[token_ids, slot],
                       weights=weights_TK[token_ids, slot], logits=logits_TA[:, :E],
                       dropped=no_drops(x_TD.device), num_experts=E, probs=probs_TA[:, :E], aux_losses=aux,
                       extras={"logits_all": logits_TA, "probs_all": probs_TA, "topk_ids_all": topk_ids_TK})

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, num_null_experts={self.num_null_experts}, "
                f"top_k={self.top_k}, balance_coef={self.balance_coef}")
