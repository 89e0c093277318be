"""Softmax top-k routing (Shazeer et al. 2017; GShard; Mixtral) — METHODS.md G2/G3/§0.2.

Legend: T tokens, D model dim, E experts, K experts per token.

``logits = x W_rᵀ`` in float32, ``p = softmax(logits)``; each token keeps its K most probable
experts (ties to the lowest index). Combine weights by ``norm``:

- ``"renorm"``: ``w = p_topk / Σ p_topk`` (sums to 1), the default;
- ``"raw"``: ``w = p_topk`` (sum ≤ 1; Switch, V-MoE);
- ``"scaled"``: renorm × ``route_scale``.

``softmax="after"`` applies the softmax to the K selected logits only (Mixtral's order); it
equals ``"renorm"`` of the softmax-before weights, so ``norm="raw"`` is refused with it.

The softmax-before gate is `moekit.ops.gate.topk_gate`: with ``fused_gate="auto"`` (default)
it runs as one Triton kernel on CUDA when triton is installed, elsewhere in PyTorch;
``True`` insists on the kernel, ``False`` never uses it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.ops.gate import check_fused_option, topk_gate
from moekit.ops.topk import topk_stable
from moekit.routing.base import TokenChoiceRouter, router_float
from moekit.validate import check_bool, check_choice, check_number

__all__ = ["TopKRouter", "NORMS", "init_router_weight", "normalise"]

NORMS = ("renorm", "raw", "scaled")


def init_router_weight(weight_ED: torch.Tensor, scale: float = 0.1) -> None:
    """Truncated normal with std ``sqrt(scale / fan_in)`` (Switch Transformer's router init)."""
    std = math.sqrt(scale / weight_ED.shape[1])
    nn.init.trunc_normal_(weight_ED, std=std, a=-2 * std, b=2 * std)


def normalise(weights_TK: torch.Tensor, norm: str, route_scale: float) -> torch.Tensor:
    if norm == "raw":
        return weights_TK
    w = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return w * route_scale if norm == "scaled" else w


class TopKRouter(TokenChoiceRouter):
    """Softmax top-k router with a linear gate ``weight`` of shape (E, D)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, norm: str = "renorm",
                 route_scale: float = 1.0, softmax: str = "before", bias: bool = False,
                 capacity_factor=None, eval_capacity_factor="same", drop_policy: str = "position",
                 fused_gate="auto"):
        super().__init__(d_model, num_experts, top_k, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy)
        check_choice("norm", norm, NORMS)
        check_choice("softmax", softmax, ("before", "after"))
        route_scale = check_number("route_scale", route_scale, min=0, min_open=True)
        check_bool("bias", bias)
        if softmax == "after" and norm == "raw":
            raise ValueError("norm='raw' needs softmax='before': a softmax over the K selected "
                             "logits always sums to 1")
        if norm != "scaled" and route_scale != 1.0:
            raise ValueError(f"route_scale={route_scale} only applies with norm='scaled', got norm={norm!r}")
        check_fused_option(fused_gate)
        if fused_gate is True and softmax == "after":
            raise ValueError("fused_gate=True: the fused kernel implements the softmax-before gate; "
                             "softmax='after' runs in PyTorch (use fused_gate='auto' or False)")
        self.norm, self.route_scale, self.softmax_position = norm, float(route_scale), softmax
        self.fused_gate = fused_gate
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_router_weight(self.weight.data)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Router math in float32 whatever the input dtype (Switch's "selective precision").
        b = None if self.bias is None else router_float(self.bias)
        return F.linear(router_float(x_TD), router_float(self.weight), b)

    def select(self, logits_TE: torch.Tensor):
        if self.softmax_position == "before":
            return topk_gate(logits_TE, self.top_k, score="softmax", normalize=self.norm != "raw",
                             route_scale=self.route_scale, fused=self.fused_gate)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_logits_TK, topk_ids_TK = topk_stable(logits_TE, self.top_k)
        w = torch.softmax(top_logits_TK, dim=-1)
        weights_TK = w * self.route_scale if self.norm == "scaled" else w
        return topk_ids_TK, weights_TK, probs_TE

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm={self.norm!r}, softmax={self.softmax_position!r}"
