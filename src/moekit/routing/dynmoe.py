"""DynMoE's top-any gating with trainable per-expert thresholds (Guo et al. 2024, "Dynamic
Mixture of Experts: An Auto-Tuning Approach for Efficient Transformer Models") — METHODS.md G16.

Legend: T tokens, D model dim, E experts.

``s_te = σ(cos(x_t, w_e))`` and expert e fires for token t when ``s_te > θ_e`` with a learned
threshold ``θ_e = σ(g_e)`` (``g`` the parameter ``threshold_logit``, 0 at init: θ = ½, i.e. the
expert fires when the cosine is positive). Any number of experts may fire; a token for which
none fires falls back to its best expert ``argmax_e (s_te − θ_e)``, so every token gets ≥ 1.

Gates: each of a token's n_t experts gets ``1/n_t`` in the forward pass; the gradient reaches
``w`` and ``θ`` through a straight-through estimator, ``gate = 1 + σ((s − θ)/τ) −
stopgrad(σ((s − θ)/τ))`` divided by the (detached) n_t — the hard decision forward, the
sigmoid's slope backward (τ = ``ste_temperature``).

Growth and pruning (`moekit.layers.dynmoe_adapt`): in training the router records the tokens
that fired nothing (their count and the sum of their normalised inputs) and the pairs each
expert took; ``dynmoe_adapt`` adds an expert whose router row is the mean direction of the
tokens that fired nothing, and removes experts that took no token since the last call.
``probs`` (for statistics and the Switch loss) are ``s / Σ_e s``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.base import Router, Routing, check_no_top_k, router_float
from moekit.routing.pairs import no_drops, pairs_from_selection
from moekit.validate import check_number

__all__ = ["DynMoERouter", "top_any_selection"]


def top_any_selection(scores_TE: torch.Tensor, thresholds_E: torch.Tensor) -> tuple:
    """``(selected_TE bool, fired_T bool)``: experts whose score exceeds their threshold, and the
    best ``argmax (s − θ)`` (lowest index on ties) for tokens where none does."""
    margin_TE = scores_TE - thresholds_E
    fired_TE = margin_TE > 0
    fired_T = fired_TE.any(-1)
    best_T = margin_TE.argmax(-1)                     # first maximum: lowest index on ties
    fallback_TE = F.one_hot(best_T, scores_TE.shape[-1]).bool() & ~fired_T.unsqueeze(-1)
    return fired_TE | fallback_TE, fired_T


class DynMoERouter(Router):
    """Top-any router: per-expert learned thresholds on sigmoid-of-cosine scores; ≥ 1 expert per token."""

    default_balance_loss = "switch"

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None, *,
                 ste_temperature: float = 0.1):
        check_no_top_k("dynmoe", top_k, None)
        super().__init__(d_model, num_experts, None)
        self.ste_temperature = check_number("ste_temperature", ste_temperature, min=0, min_open=True)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.threshold_logit = nn.Parameter(torch.zeros(num_experts))
        nn.init.normal_(self.weight, std=d_model ** -0.5)
        # What dynmoe_adapt reads: training tokens that fired nothing, and pairs per expert.
        self.register_buffer("unrouted_count", torch.zeros(()), persistent=False)
        self.register_buffer("unrouted_sum", torch.zeros(d_model), persistent=False)
        self.register_buffer("routed_count", torch.zeros(num_experts), persistent=False)
        self.register_buffer("seen_tokens", torch.zeros(()), persistent=False)

    @property
    def thresholds(self) -> torch.Tensor:
        """(E,) θ = σ(threshold_logit)."""
        return torch.sigmoid(router_float(self.threshold_logit))

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """(T, E) ``σ(cos(x, w_e))``."""
        cos_TE = F.normalize(router_float(x_TD), dim=-1) @ F.normalize(router_float(self.weight), dim=-1).t()
        return torch.sigmoid(cos_TE)

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        s_TE = self.scores(x_TD)
        theta_E = self.thresholds
        selected_TE, fired_T = top_any_selection(s_TE.detach(), theta_E.detach())
        soft_TE = torch.sigmoid((s_TE - theta_E) / self.ste_temperature)
        n_T1 = selected_TE.sum(-1, keepdim=True).to(s_TE.dtype)             # ≥ 1
        gate_TE = (1.0 + soft_TE - soft_TE.detach()) / n_T1
        token_ids, expert_ids, weights = pairs_from_selection(selected_TE, gate_TE, mask)
        if self.training:
            with torch.no_grad():
                valid_T = torch.ones_like(fired_T) if mask is None else mask
                lost_T = (~fired_T & valid_T).to(s_TE.dtype)
                self.unrouted_count += lost_T.sum()
                self.unrouted_sum += (F.normalize(router_float(x_TD), dim=-1) * lost_T.unsqueeze(-1)).sum(0).to(
                    self.unrouted_sum.dtype)
                self.routed_count += torch.bincount(expert_ids, minlength=self.num_experts).to(self.routed_count.dtype)
                self.seen_tokens += valid_T.sum()
        return Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights.float() if
                       weights.dtype != torch.float64 else weights, logits=None, dropped=no_drops(x_TD.device),
                       num_experts=self.num_experts, probs=s_TE / s_TE.sum(-1, keepdim=True))

    @torch.no_grad()
    def reset_records(self) -> None:
        """Forget the tokens and pairs recorded since the last `dynmoe_adapt`."""
        for b in (self.unrouted_count, self.unrouted_sum, self.routed_count, self.seen_tokens):
            b.zero_()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, ste_temperature={self.ste_temperature:g}"
