"""Sigmoid routing with group-limited top-k and aux-loss-free bias balancing
(DeepSeek-V3; Wang et al. 2024 "Auxiliary-Loss-Free Load Balancing") — METHODS.md G13.

Legend: T tokens, D model dim, E experts, K experts per token, G expert groups.

``s = sigmoid(x W_rᵀ)``. Selection uses ``s + b`` where ``b`` (the buffer ``expert_bias``) is
*not* learned by gradient: after each optimizer step it moves by ``u · sign(mean_load − load_e)``
(see `moekit.losses.bias_update` and `update_bias`). Combine weights use ``s`` without the
bias, renormalised over the K chosen experts and multiplied by ``route_scale``.

Group-limited routing: experts form ``num_groups`` equal groups; a group's score is the sum
of its two best ``s + b``; only experts in the ``topk_groups`` best groups can be chosen.

For balancing losses ``probs = s / Σ s`` (DeepSeek-V3's normalised affinities).

Without groups the gate is `moekit.ops.gate.topk_gate` (one Triton kernel on CUDA with
``fused_gate="auto"``, see `moekit.routing.topk`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.losses.bias import bias_update
from moekit.ops.gate import check_fused_option, gate_weights_probs, topk_gate
from moekit.ops.topk import topk_stable
from moekit.routing.base import TokenChoiceRouter, router_float
from moekit.routing.topk import init_router_weight
from moekit.validate import check_bool, check_int, check_number

__all__ = ["SigmoidRouter"]


class SigmoidRouter(TokenChoiceRouter):
    default_balance_loss = "sequence"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, num_groups: int = 1,
                 topk_groups: int = 1, route_scale: float = 1.0, renorm: bool = True,
                 bias_update_rate: float = 1e-3, capacity_factor=None, eval_capacity_factor="same",
                 drop_policy: str = "position", fused_gate="auto"):
        super().__init__(d_model, num_experts, top_k, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy)
        check_int("num_groups", num_groups, min=1)
        if num_experts % num_groups:
            raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
        check_int("topk_groups", topk_groups, min=1)
        if topk_groups > num_groups:
            raise ValueError(f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
        if top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(f"top_k={top_k} exceeds the experts in {topk_groups} of {num_groups} groups")
        check_number("bias_update_rate", bias_update_rate, min=0)
        check_number("route_scale", route_scale, min=0, min_open=True)
        check_bool("renorm", renorm)
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.route_scale, self.renorm = float(route_scale), bool(renorm)
        self.bias_update_rate = float(bias_update_rate)
        check_fused_option(fused_gate)
        if fused_gate is True and num_groups > 1:
            raise ValueError(f"fused_gate=True: the fused kernel has no group-limited routing; num_groups="
                             f"{num_groups} runs in PyTorch (use fused_gate='auto' or False)")
        self.fused_gate = fused_gate
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # Pairs per expert seen in training since the last bias update (summed over
        # micro-batches, so gradient accumulation updates on the whole batch).
        self.register_buffer("load_accum", torch.zeros(num_experts), persistent=False)
        init_router_weight(self.weight.data)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(router_float(x_TD), router_float(self.weight))

    def preference(self, logits_TE, probs_TE):
        return torch.sigmoid(logits_TE) + self.expert_bias

    def select(self, logits_TE: torch.Tensor):
        if self.num_groups == 1:
            return topk_gate(logits_TE, self.top_k, score="sigmoid", normalize=self.renorm,
                             route_scale=self.route_scale, bias_E=self.expert_bias, fused=self.fused_gate)
        # Group-limited choice: only experts of the topk_groups best groups compete.
        choice_TE = torch.sigmoid(logits_TE).detach() + self.expert_bias
        grouped = choice_TE.view(choice_TE.shape[0], self.num_groups, -1)
        top2 = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)   # (T, G)
        _, top_groups = topk_stable(top2, self.topk_groups)
        allowed = torch.zeros_like(top2, dtype=torch.bool).scatter(1, top_groups, True)
        allowed_TE = allowed.repeat_interleave(self.num_experts // self.num_groups, dim=1)
        _, topk_ids_TK = topk_stable(choice_TE.masked_fill(~allowed_TE, float("-inf")), self.top_k)
        weights_TK, probs_TE = gate_weights_probs(logits_TE, topk_ids_TK, "sigmoid", self.renorm, self.route_scale)
        return topk_ids_TK, weights_TK, probs_TE

    def forward(self, x_TD, *, mask=None):
        routing = super().forward(x_TD, mask=mask)
        if self.training:
            self.load_accum += routing.tokens_per_expert().to(self.load_accum.dtype)
        return routing

    @torch.no_grad()
    def update_bias(self, rate: float | None = None) -> None:
        """Apply the aux-loss-free update from the load seen since the last call, then reset it.

        Call after the optimizer step (e.g. through `moekit.update_router_biases(model)`).
        """
        if self.load_accum.sum() == 0:
            return
        rate = self.bias_update_rate if rate is None else rate
        self.expert_bias.copy_(bias_update(self.expert_bias, self.load_accum, rate=rate))
        self.load_accum.zero_()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_groups={self.num_groups}, topk_groups={self.topk_groups}, "
                f"route_scale={self.route_scale}")
