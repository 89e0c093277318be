"""DSelect-k: differentiable k-sparse gate (Hazimeh et al. 2021, "DSelect-k: Differentiable
Selection in the Mixture of Experts with Applications to Multi-Task Learning") — METHODS.md G10.

Legend: T tokens, D model dim, E experts, K selectors, B binary code length (2^B ≥ E), L = 2^B.

Smooth step ``S(t) = 0 (t ≤ −γ/2); −2t³/γ³ + 3t/(2γ) + 1/2 (|t| < γ/2); 1 (t ≥ γ/2)``, which is
C¹ and reaches exactly 0 and 1. A selector with code ``z ∈ R^B`` puts mass
``r(z)_l = Π_j S(z_j)^{b_j(l)} (1 − S(z_j))^{1 − b_j(l)}`` on expert l (``b(l)`` its binary code),
so ``Σ_l r(z)_l = 1`` exactly. The gate mixes K selectors: ``q = Σ_i softmax(α)_i r(z_i)``.
Per-token variant: ``z_i = W_i x``, ``α = A x``; static variant (``per_token=False``): z and α
are free parameters shared by every token. The entropy term ``λ · mean Σ_i H(r(z_i))`` (in
``routing.aux_losses["entropy"]``) pushes the selectors to binary, after which q is exactly
k-sparse. Pairs are the experts with ``q > 0``.

When E is not a power of two the codes ``l ≥ E`` act as zero experts (the paper pads with
them): their mass is not dispatched, and a token's weights then sum to less than 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.base import Router, Routing, router_float
from moekit.routing.pairs import no_drops, pairs_from_selection
from moekit.validate import check_bool, check_number

__all__ = ["DSelectKRouter", "smooth_step"]


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """The cubic smooth step S(t) with support width γ."""
    cubic = -2.0 / gamma ** 3 * t ** 3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectKRouter(Router):
    """``top_k`` is K, the number of selectors (at most K experts per token once binary)."""

    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, gamma: float = 1.0,
                 entropy_coef: float = 1e-3, per_token: bool = True):
        super().__init__(d_model, num_experts, top_k)
        check_number("gamma", gamma, min=0, min_open=True)
        check_number("entropy_coef", entropy_coef, min=0)
        check_bool("per_token", per_token)
        self.gamma, self.entropy_coef, self.per_token = float(gamma), float(entropy_coef), bool(per_token)
        self.code_bits = max(1, math.ceil(math.log2(num_experts)))
        L, B, K = 2 ** self.code_bits, self.code_bits, top_k
        # bits_LB[l, j] = j-th bit of l.
        self.register_buffer("bits_LB", ((torch.arange(L).unsqueeze(-1) >> torch.arange(B)) & 1).bool(),
                             persistent=False)
        if self.per_token:
            self.code_proj = nn.Linear(d_model, K * B, bias=True)
            self.mix_proj = nn.Linear(d_model, K, bias=True)
            # Small weights start every selector inside the smooth region (all experts reachable).
            for lin in (self.code_proj, self.mix_proj):
                nn.init.uniform_(lin.weight, -0.1 / math.sqrt(d_model), 0.1 / math.sqrt(d_model))
                nn.init.zeros_(lin.bias)
            nn.init.uniform_(self.code_proj.bias, -self.gamma / 4, self.gamma / 4)
        else:
            self.codes_KB = nn.Parameter(torch.empty(K, B).uniform_(-self.gamma / 4, self.gamma / 4))
            self.mix_K = nn.Parameter(torch.zeros(K))

    def selector_probs(self, codes_TKB: torch.Tensor) -> torch.Tensor:
        """(T, K, L) mass each selector puts on each code l: a product of B Bernoulli factors."""
        s_TK1B = smooth_step(codes_TKB, self.gamma).unsqueeze(-2)
        factors = torch.where(self.bits_LB, s_TK1B, 1.0 - s_TK1B)          # (T, K, L, B)
        return factors.prod(-1)

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        T, K, B, E = x_TD.shape[0], self.top_k, self.code_bits, self.num_experts
        x = router_float(x_TD)
        if self.per_token:
            codes_TKB = F.linear(x, router_float(self.code_proj.weight), router_float(self.code_proj.bias)).view(T, K,
                                                                                                                 B)
            mix_TK = F.linear(x, router_float(self.mix_proj.weight), router_float(self.mix_proj.bias))
        else:
            codes_TKB = router_float(self.codes_KB).expand(T, K, B)
            mix_TK = router_float(self.mix_K).expand(T, K)
        r_TKL = self.selector_probs(codes_TKB)
        q_TL = (torch.softmax(mix_TK, dim=-1).unsqueeze(-1) * r_TKL).sum(1)
        q_TE = q_TL[:, :E]
        token_ids, expert_ids, weights = pairs_from_selection(q_TE > 0, q_TE, mask)
        aux = {}
        if self.training and self.entropy_coef > 0:
            h_TK = -(r_TKL * torch.log(r_TKL.clamp_min(1e-12))).sum(-1)
            h_T = h_TK.sum(-1)
            h = h_T.mean() if mask is None else (h_T * mask).sum() / mask.sum().clamp_min(1)
            aux["entropy"] = self.entropy_coef * h
        return Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights, logits=None,
                       dropped=no_drops(x_TD.device), num_experts=E, probs=q_TE, aux_losses=aux,
                       extras={"selector_probs": r_TKL})

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.top_k}, gamma={self.gamma}, "
                f"per_token={self.per_token}, entropy_coef={self.entropy_coef}")
