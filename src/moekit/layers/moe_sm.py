"""MoE-SM: per-example top-k MLP experts fused by the Smart-Merger — Swin2-MoSE (Rossi, Bernuzzi,
Fontanini, Bertozzi & Prati 2024), METHODS.md CV2.

Legend: B examples (images or windows), N tokens per example, D model dim, F expert hidden dim,
E experts, K experts per example, P (token, expert) pairs.

As the official code (``hachreak/swin2-mose``, ``src/super_res/moe.py``) computes it:

1. Gate on the example mean: ``h_b = mean_n(x_bn) · W_gᵀ`` (no bias; ``W_g`` starts at zero),
   each example keeps the K largest logits (ties to the lowest expert id) and its gates are the
   softmax over those K (Shazeer et al.'s noisy top-k gating; the noise is optional and off in
   the paper's final config, ``with_noise=False``). Every token of an example goes to the same
   K experts (`moekit.layers.moe.expand_example_routing`).
2. E two-layer MLP experts ``fc2(act(fc1(x)))`` with biases, hidden ``F = D`` (mlp_ratio 1).
3. Smart-Merger (``merger="smart"``): the K gate-scaled outputs ``g_be · f_e(x_b)``, each
   (N, D), are stacked as K channels in ascending expert id (the order the official sparse
   dispatcher produces, not the gate rank) and fused by ``Conv2d(K, 1, 3, padding=1)`` over the
   (N × D) plane. ``merger="sum"`` is the plain weighted sum ``Σ_e g_be · f_e(x_b)``.
4. ``aux_loss = balance_coef · (CV²(importance) + CV²(load))`` over the B examples, with
   ``importance_e = Σ_b g_be`` and ``load_e`` the number of examples routed to e (in training
   with noise, Shazeer's smooth estimate). CV² uses Bessel's correction (``torch.var``'s
   default, as the official code): ``E / (E − 1)`` times `moekit.losses.cv_squared`.
   The paper weights this loss 0.2 in the total loss; that weight belongs to the model
   (``loss = task + 0.2 · moekit.aux_loss(model)``), not to the layer.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from moekit.experts import MLPExperts
from moekit.layers.checks import check_float_input
from moekit.layers.moe import expand_example_routing
from moekit.layers.protocol import MoELayer
from moekit.layers.stats import MoEStats, compute_stats
from moekit.losses import cv_squared, importance_loss, load_loss
from moekit.ops.backends import check_backend_name
from moekit.ops.counting import count_ids
from moekit.ops.dispatch import permute
from moekit.routing import NoisyTopKRouter, Routing
from moekit.routing.base import check_router_args
from moekit.validate import check_bool, check_choice, check_instance, check_int, check_number

__all__ = ["MoESM", "MERGERS"]

MERGERS = ("smart", "sum")


class MoESM(MoELayer):
    """``(B, N, D) → (B, N, D)``: Swin2-MoSE's MoE-SM layer (see the module docstring).

    Args:
        d_model: D.
        num_experts: E (the paper: 8).
        top_k: K experts per example (the paper: 2).
        d_hidden: F, each expert's hidden size (default D: mlp_ratio 1).
        activation: the experts' activation (GELU as in Swin).
        merger: ``"smart"`` (the 3×3 convolution over the K stacked outputs) or ``"sum"``.
        balance_coef: weight of ``CV²(importance) + CV²(load)`` in ``aux_loss`` (official 1e-2).
        with_noise: noisy top-k gating in training (official option, off in the final config).
        backend: the expert bank's backend (``"auto"`` | ``"eager"`` | ``"grouped_mm"`` …).

    After a forward pass: ``aux_loss``, ``last_routing`` (the token pairs taken, token
    ``b·N + n``), ``last_example_routing`` (the B-row routing) and ``last_stats`` (a `MoEStats`
    over the examples, computed when first read).
    """

    def __init__(self, *, d_model: int, num_experts: int = 8, top_k: int = 2, d_hidden: Optional[int] = None,
                 activation: str = "gelu", merger: str = "smart", balance_coef: float = 1e-2,
                 with_noise: bool = False, backend: str = "auto"):
        super().__init__()
        check_int("top_k", top_k, min=1)
        check_router_args(d_model, num_experts, top_k)
        check_int("d_hidden", d_hidden, min=1, allow_none=True)
        check_instance("activation", activation, str)
        check_choice("merger", merger, MERGERS)
        self.balance_coef = check_number("balance_coef", balance_coef, min=0)
        check_bool("with_noise", with_noise)
        check_backend_name(backend)
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.d_hidden = d_model if d_hidden is None else d_hidden
        self.merger_kind, self.with_noise, self.backend = merger, with_noise, backend
        # W_g and W_noise start at zero, as the official w_gate / w_noise.
        self.router = NoisyTopKRouter(d_model, num_experts, top_k)
        self.experts = MLPExperts(num_experts, d_model, self.d_hidden, activation=activation, bias=True)
        self.merger = nn.Conv2d(top_k, 1, kernel_size=3, padding=1) if merger == "smart" else None
        self.last_routing = None
        self.last_example_routing = None

    @property
    def last_stats(self) -> Optional[MoEStats]:
        """Detached statistics of the last forward pass over its B examples (computed on first read)."""
        if self._stats is None and self.last_example_routing is not None:
            self._stats = compute_stats(self.last_example_routing)
        return self._stats

    @last_stats.setter
    def last_stats(self, value: Optional[MoEStats]) -> None:
        self._stats = value

    def gate(self, x_BND: torch.Tensor) -> Routing:
        """The routing of the B examples on their mean token: K experts each, in preference order."""
        pooled_BD = x_BND.mean(1)
        if self.with_noise and self.training:
            return self.router(pooled_BD)                 # noisy logits; extras["load_probs"]
        logits_BE = self.router.logits(pooled_BD)
        topk_ids_BK, weights_BK, probs_BE = self.router.select(logits_BE)
        return self.router.build_routing(logits_BE, probs_BE, topk_ids_BK, weights_BK, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_input(x, self.d_model)
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, N, {self.d_model}), got {tuple(x.shape)}")
        B, N, D = x.shape
        K = self.top_k
        routing_B = self.gate(x)
        # Channel order of the merger: ascending expert id within each example.
        ids_BK, slot_BK = routing_B.topk_ids.sort(1)
        w_BK = routing_B.weights.view(B, K).gather(1, slot_BK)
        routing = expand_example_routing(replace(routing_B, expert_ids=ids_BK.reshape(-1), weights=w_BK.reshape(-1)),
                                         B, N)                     # token b·N + n: example b's K slots
        y_BKND = self._expert_outputs(x.reshape(B * N, D), routing).view(B, N, K, D).permute(0, 2, 1, 3)
        y_BKND = y_BKND * w_BK.to(y_BKND.dtype).view(B, K, 1, 1)              # gate-scaled
        out_BND = self.merger(y_BKND).squeeze(1) if self.merger is not None else y_BKND.sum(1)

        self.aux_loss = self.balance_coef * self._balance_loss(routing_B, ids_BK, w_BK)
        self.last_routing, self.last_example_routing, self._stats = routing, routing_B, None
        return out_BND.to(x.dtype)

    def _expert_outputs(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """(P, D) ``f_e(x_t)`` of every pair, in the routing's pair order (not gate-scaled)."""
        x_PD, counts_E, order_P = permute(x_TD, routing.token_ids, routing.expert_ids, self.num_experts)
        y_PD = self.experts(x_PD, counts_E, backend=self.backend)
        inverse_P = torch.empty_like(order_P)
        inverse_P[order_P] = torch.arange(order_P.numel(), device=order_P.device)
        return y_PD.index_select(0, inverse_P)

    def _balance_loss(self, routing_B: Routing, ids_BK: torch.Tensor, w_BK: torch.Tensor) -> torch.Tensor:
        """``CV²(importance) + CV²(load)`` over the examples, with Bessel's correction."""
        E = self.num_experts
        gates_BE = torch.zeros(w_BK.shape[0], E, dtype=w_BK.dtype, device=w_BK.device).scatter(1, ids_BK, w_BK)
        load_probs = routing_B.extras.get("load_probs")
        if load_probs is not None:
            load = load_loss(load_probs)
        else:
            load = cv_squared(count_ids(ids_BK, E))
        bessel = E / (E - 1) if E > 1 else 1.0
        return bessel * (importance_loss(gates_BE) + load)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"d_hidden={self.d_hidden}, merger={self.merger_kind!r}, balance_coef={self.balance_coef}, "
                f"with_noise={self.with_noise}, backend={self.backend!r}")
