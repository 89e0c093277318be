"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks") — METHODS.md G2.

Legend: T tokens, D model dim, E experts, K experts per token.

``H = x W_gᵀ + ε · softplus(x W_noiseᵀ)``, ``ε ~ N(0, 1)`` in training only;
``G = softmax(KeepTopK(H, k))`` so the K kept gates sum to 1. Both weights start at zero.

For the load loss the router also returns the smooth load estimate
``P(x, i) = Φ((clean_i − kth_excl(H, k, i)) / softplus(noise_i))`` in
``routing.extras["load_probs"]``, where ``kth_excl(H, k, i)`` is the k-th largest noisy logit
ignoring component i: the (k+1)-th value when i is in the top-k, else the k-th. It is
differentiable in both ``W_g`` and ``W_noise``. ``routing.extras["gates"]`` holds the dense
(T, E) gates for the importance loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.ops.topk import topk_stable
from moekit.routing.base import TokenChoiceRouter, router_float
from moekit.validate import check_number

__all__ = ["NoisyTopKRouter"]


class NoisyTopKRouter(TokenChoiceRouter):
    default_balance_loss = "importance_load"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, min_noise_std: float = 1e-2,
                 capacity_factor=None, eval_capacity_factor="same", drop_policy: str = "position"):
        super().__init__(d_model, num_experts, top_k, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy)
        check_number("min_noise_std", min_noise_std, min=0)
        self.min_noise_std = float(min_noise_std)
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.noise_weight)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(router_float(x_TD), router_float(self.weight))

    def noise_std(self, x_TD: torch.Tensor) -> torch.Tensor:
        # A small floor keeps Φ's argument finite (the reference implementations add 1e-2 too).
        return F.softplus(F.linear(router_float(x_TD), router_float(self.noise_weight))) + self.min_noise_std

    def select(self, logits_TE: torch.Tensor):
        top_TK, topk_ids_TK = topk_stable(logits_TE, self.top_k)
        weights_TK = torch.softmax(top_TK, dim=-1)
        return topk_ids_TK, weights_TK, torch.softmax(logits_TE, dim=-1)

    def forward(self, x_TD, *, mask=None):
        self.check_input(x_TD, mask)
        clean_TE = self.logits(x_TD)
        extras = {}
        if self.training:
            std_TE = self.noise_std(x_TD)
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
            extras["load_probs"] = self.load_probs(clean_TE, noisy_TE, std_TE)
        else:
            noisy_TE = clean_TE
        topk_ids_TK, weights_TK, _ = self.select(noisy_TE)
        gates_TE = torch.zeros_like(clean_TE).scatter(1, topk_ids_TK, weights_TK)
        extras["gates"] = gates_TE
        # probs: clean softmax, so z-loss and statistics see the deterministic router.
        return self.build_routing(clean_TE, torch.softmax(clean_TE, -1), topk_ids_TK, weights_TK, mask,
                                  extras=extras)

    def load_probs(self, clean_TE, noisy_TE, std_TE) -> torch.Tensor:
        """(T, E) probability that expert i stays in the top-k under fresh noise on i alone."""
        K, E = self.top_k, self.num_experts
        if K >= E:
            return torch.ones_like(clean_TE)
        top_TK1, _ = torch.topk(noisy_TE, K + 1, dim=-1)
        kth_in = top_TK1[:, K:K + 1]        # threshold for experts currently in the top-k
        kth_out = top_TK1[:, K - 1:K]       # threshold for the others
        in_top = noisy_TE >= kth_out
        threshold_TE = torch.where(in_top, kth_in, kth_out)
        return torch.special.ndtr((clean_TE - threshold_TE) / std_TE)     # standard normal CDF
