"""Switch routing (Fedus, Zoph & Shazeer 2021) — METHODS.md G4.

Top-1 with the raw softmax probability as the gate, ``y = p_{i*}(x) · f_{i*}(x)``, which is
what keeps the router trainable. Optional multiplicative jitter on the router input in
training, ``x · U[1 − ε, 1 + ε]``; off in eval.
"""
from __future__ import annotations

import torch

from moekit.routing.base import router_float
from moekit.routing.topk import TopKRouter
from moekit.validate import check_number

__all__ = ["SwitchRouter"]


class SwitchRouter(TopKRouter):
    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, jitter: float = 0.0,
                 capacity_factor=None, eval_capacity_factor="same", drop_policy: str = "position",
                 fused_gate="auto"):
        if top_k != 1:
            raise ValueError(f"Switch routing is top-1, got top_k={top_k}")
        check_number("jitter", jitter, min=0, max=1, max_open=True)
        super().__init__(d_model, num_experts, 1, norm="raw", capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy,
                         fused_gate=fused_gate)
        self.jitter = float(jitter)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        x = router_float(x_TD)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return super().logits(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, jitter={self.jitter}"
