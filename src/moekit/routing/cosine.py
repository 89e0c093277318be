"""Cosine router in a low-dimensional space (Chi et al. 2022, "On the Representation Collapse of
Sparse Mixture of Experts", X-MoE) — METHODS.md G12.

Legend: T tokens, D model dim, R routing dim (d_r), E experts, K experts per token.

``s_e = cos(W_p x, u_e) / τ`` with a projection ``W_p: D → R`` (R = 16), learned expert
embeddings ``u_e ∈ R^R`` and a learnable temperature τ (initialised to 0.07, kept ≥ ``min_tau``);
then softmax top-k as in `TopKRouter`. Scoring by cosine keeps the router from pulling hidden
states towards expert centroids (representation collapse). Scores lie in ``[−1/τ, 1/τ]`` and
routing is invariant to positive rescaling of x.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.ops.topk import topk_stable
from moekit.routing.base import TokenChoiceRouter, router_float
from moekit.routing.topk import normalise
from moekit.validate import check_choice, check_int, check_number

__all__ = ["CosineRouter"]


class CosineRouter(TokenChoiceRouter):
    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, d_route: int = 16,
                 init_temperature: float = 0.07, min_temperature: float = 0.01, norm: str = "renorm",
                 capacity_factor=None, eval_capacity_factor="same", drop_policy: str = "position"):
        super().__init__(d_model, num_experts, top_k, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy)
        check_int("d_route", d_route, min=1)
        check_number("min_temperature", min_temperature, min=0, min_open=True)
        check_number("init_temperature", init_temperature, min=min_temperature)
        check_choice("norm", norm, ("renorm", "raw"))
        self.d_route, self.norm, self.min_temperature = d_route, norm, float(min_temperature)
        self.proj = nn.Linear(d_model, d_route, bias=False)
        self.expert_embed = nn.Parameter(torch.empty(num_experts, d_route))
        # τ is learned through its log, so it stays positive.
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
        # Orthogonal embeddings start every expert equally far from the others.
        if num_experts <= d_route:
            nn.init.orthogonal_(self.expert_embed)
        else:
            nn.init.normal_(self.expert_embed)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp_min(self.min_temperature)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TR = F.normalize(F.linear(router_float(x_TD), router_float(self.proj.weight)), dim=-1)
        u_ER = F.normalize(router_float(self.expert_embed), dim=-1)
        return (h_TR @ u_ER.t()) / self.temperature

    def select(self, logits_TE: torch.Tensor):
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_p_TK, topk_ids_TK = topk_stable(probs_TE, self.top_k)
        return topk_ids_TK, normalise(top_p_TK, self.norm, 1.0), probs_TE

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_route={self.d_route}, norm={self.norm!r}"
