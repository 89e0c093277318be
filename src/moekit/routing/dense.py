"""Dense softmax gate (Jacobs, Jordan, Nowlan & Hinton 1991, "Adaptive Mixtures of Local
Experts") — METHODS.md G1 / F1.

Legend: T tokens, D model dim, E experts.

``g = softmax(x W_rᵀ / τ)`` and ``y = Σ_e g_e f_e(x)``: every token goes to every expert. It is
the oracle for dense equivalence (top-k with k = E, expert choice with c = E, top-p with p = 1)
and the classic mixture of experts. No balancing loss: every expert already sees every token.

``top_k`` is not used (K = E); the MoE layer passes its ``top_k`` to every router.
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.routing.topk import TopKRouter

__all__ = ["DenseRouter"]


class DenseRouter(TopKRouter):
    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None, *,
                 temperature: float = 1.0, bias: bool = False):
        super().__init__(d_model, num_experts, num_experts, norm="raw", bias=bias)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def set_capacity(self, capacity_factor, eval_capacity_factor="same", drop_policy: str = "position") -> None:
        if capacity_factor is not None or eval_capacity_factor not in (None, "same") or drop_policy != "position":
            raise ValueError("the dense gate sends every token to every expert; it takes no capacity settings, "
                             f"got capacity_factor={capacity_factor!r}, eval_capacity_factor="
                             f"{eval_capacity_factor!r}, drop_policy={drop_policy!r}")
        super().set_capacity(None, None, "position")

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return super().logits(x_TD) / self.temperature

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, temperature={self.temperature}"
