"""Localised (Gaussian) gating (Xu, Jordan & Hinton 1995, "An Alternative Model for Mixtures of
Experts") — METHODS.md F3.

Legend: T tokens, D model dim, E experts, K experts per token.

The gate is the posterior of a Gaussian mixture over inputs:
``g_e(x) = α_e N(x; m_e, diag σ_e²) / Σ_j α_j N(x; m_j, diag σ_j²)``, i.e. ``softmax`` of the
logits ``log α_e + log N(x; m_e, σ_e²)``. Each token keeps its top-K experts (renormalised);
K = E is the paper's dense gate. Because the model is a joint density
``p(x, y) = Σ_e α_e N(x; m_e, σ_e²) P_e(y | x)``, the gate's M-step is closed form:
`em_update` applies the GMM updates for given responsibilities ``h`` (T, E) — with ``h`` the
gate posterior itself it is one EM step of the GMM on x, which never lowers
`log_likelihood`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moekit.ops.topk import topk_stable
from moekit.routing.base import TokenChoiceRouter, router_float
from moekit.routing.topk import normalise
from moekit.validate import check_number

__all__ = ["GaussianRouter"]


class GaussianRouter(TokenChoiceRouter):
    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, min_var: float = 1e-4,
                 capacity_factor=None, eval_capacity_factor="same", drop_policy: str = "position"):
        super().__init__(d_model, num_experts, top_k, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy)
        check_number("min_var", min_var, min=0, min_open=True)
        self.min_var = float(min_var)
        self.means = nn.Parameter(torch.randn(num_experts, d_model))
        self.log_var = nn.Parameter(torch.zeros(num_experts, d_model))
        self.log_mix = nn.Parameter(torch.zeros(num_experts))          # log α up to a constant

    def variances(self) -> torch.Tensor:
        return self.log_var.float().exp().clamp_min(self.min_var)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """(T, E) ``log α_e + log N(x_t; m_e, diag σ_e²)``."""
        x = router_float(x_TD)
        var_ED = self.variances()
        diff2_TED = (x.unsqueeze(1) - self.means.float().unsqueeze(0)).square()
        log_n_TE = -0.5 * ((diff2_TED / var_ED).sum(-1) + var_ED.log().sum(-1) + x.shape[-1] * math.log(2 * math.pi))
        return torch.log_softmax(self.log_mix.float(), -1) + log_n_TE

    def select(self, logits_TE: torch.Tensor):
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_p_TK, topk_ids_TK = topk_stable(probs_TE, self.top_k)
        return topk_ids_TK, normalise(top_p_TK, "renorm", 1.0), probs_TE

    @torch.no_grad()
    def log_likelihood(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Mean ``log Σ_e α_e N(x; m_e, σ_e²)`` of the input mixture."""
        return torch.logsumexp(self.logits(x_TD), -1).mean()

    @torch.no_grad()
    def em_update(self, x_TD: torch.Tensor, resp_TE: torch.Tensor) -> None:
        """Closed-form M-step for responsibilities ``h`` (T, E): ``α = mean h``,
        ``m = Σ h x / Σ h``, ``σ² = Σ h (x − m)² / Σ h`` (floored at ``min_var``)."""
        T, E = resp_TE.shape
        if x_TD.shape != (T, self.d_model) or E != self.num_experts:
            raise ValueError(f"need x (T, {self.d_model}) and resp (T, {self.num_experts}), "
                             f"got {tuple(x_TD.shape)} and {tuple(resp_TE.shape)}")
        x, h = router_float(x_TD), router_float(resp_TE)
        n_E = h.sum(0).clamp_min(1e-12)
        means = (h.t() @ x) / n_E.unsqueeze(-1)
        var = (h.t() @ x.square()) / n_E.unsqueeze(-1) - means.square()
        self.means.copy_(means)
        self.log_var.copy_(var.clamp_min(self.min_var).log())
        self.log_mix.copy_((n_E / T).log())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_var={self.min_var}"
