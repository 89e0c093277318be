"""ReLU routing with adaptive L1 regularisation (Wang, Zhu & Chen 2024, "ReMoE: Fully
Differentiable Mixture-of-Experts with ReLU Routing") — METHODS.md G15.

Legend: T tokens, D model dim, E experts, K target experts per token.

``g = ReLU(x W_rᵀ)``: no softmax and no top-k, so the gate is continuous (it only kinks at 0)
and every expert with ``g_e > 0`` runs; the number of experts varies per token. Sparsity comes
from an L1 penalty, load-weighted for balance:

``L_reg = λ · mean_t Σ_e w_e g_{t,e}``, ``w_e = E · n_e / Σ_e' n_e'`` (``n_e`` = tokens with
``g_e > 0``, not differentiated; ``w_e = 1`` with ``load_balanced=False``),

added to ``routing.aux_losses["l1"]``. After every training forward λ adapts towards the
target sparsity ``1 − K/E``: ``λ ← λ · ζ^{sign((1 − K/E) − sparsity)}`` (ζ = 1.2), where
sparsity is the fraction of zero gates in this forward. λ is a buffer (saved, never learned).
The paper starts from λ = 1e-8; a larger ``l1_init`` reaches the target sooner.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.base import Router, Routing, router_float
from moekit.routing.pairs import no_drops, pairs_from_selection
from moekit.routing.topk import init_router_weight
from moekit.validate import check_bool, check_number

__all__ = ["ReLURouter"]


class ReLURouter(Router):
    """``top_k`` is the target mean number of experts per token (sparsity ``1 − K/E``)."""

    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, l1_init: float = 1e-8,
                 l1_growth: float = 1.2, load_balanced: bool = True, adapt: bool = True):
        super().__init__(d_model, num_experts, top_k)
        check_number("l1_init", l1_init, min=0, min_open=True)
        check_number("l1_growth", l1_growth, min=1, min_open=True)      # ζ
        check_bool("load_balanced", load_balanced)
        check_bool("adapt", adapt)
        self.l1_growth, self.load_balanced, self.adapt = float(l1_growth), bool(load_balanced), bool(adapt)
        self.register_buffer("l1_coef", torch.tensor(float(l1_init)))
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        init_router_weight(self.weight.data)

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.top_k / self.num_experts

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        logits_TE = F.linear(router_float(x_TD), router_float(self.weight))
        gates_TE = torch.relu(logits_TE)
        active_TE = gates_TE > 0
        m_T1 = torch.ones_like(gates_TE[:, :1]) if mask is None else mask.float().unsqueeze(-1)
        n_valid = m_T1.sum().clamp_min(1)
        token_ids, expert_ids, weights = pairs_from_selection(active_TE, gates_TE, mask)

        aux = {}
        if self.training:
            active_E = (active_TE.float() * m_T1).sum(0)
            if self.load_balanced:
                w_E = self.num_experts * active_E / active_E.sum().clamp_min(1)
            else:
                w_E = torch.ones_like(active_E)
            # A copy: λ is updated in place below, after the loss captured its value.
            aux["l1"] = self.l1_coef.clone() * ((gates_TE * m_T1) @ w_E).sum() / n_valid
            if self.adapt:
                with torch.no_grad():
                    sparsity = 1.0 - active_E.sum() / (n_valid * self.num_experts)
                    step = torch.sign(self.target_sparsity - sparsity)
                    self.l1_coef.mul_(self.l1_growth ** step)
        # Gate mass normalised per token, for statistics (entropy, P_e); all-zero rows stay 0.
        probs_TE = gates_TE / gates_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        return Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights, logits=logits_TE,
                       dropped=no_drops(x_TD.device), num_experts=self.num_experts, probs=probs_TE,
                       aux_losses=aux, extras={"l1_coef": self.l1_coef.detach().clone()})

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, target_k={self.top_k}, "
                f"l1_growth={self.l1_growth}, load_balanced={self.load_balanced}")
