"""V-MoE's router (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts") —
METHODS.md CV1.

Legend: T tokens, D model dim, E experts, K experts per token.

``g(x) = TOP_K(softmax(x W_rᵀ + ε))`` with ``ε ~ N(0, σ²)`` in training only, σ = 1/E by
default (the paper's ``N(0, 1/E²)``): the softmax comes *before* the top-k and the K kept
probabilities are not renormalised (sum ≤ 1, ``norm="raw"``). The noise makes near-ties
between experts random during training, which spreads load; eval routing is the clean
top-k of `TopKRouter` with ``norm="raw"``. The noise is drawn from torch's global generator
(the trainer seeds and checkpoints it). Batch Prioritised Routing is the capacity policy
``drop_policy="probability"`` (`moekit.routing.capacity`).
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.routing.topk import TopKRouter
from moekit.validate import check_number

__all__ = ["VMoERouter"]


class VMoERouter(TopKRouter):
    """Top-k softmax router with Gaussian noise on the logits in training; gates are raw probabilities.

    noise_std: σ of the logit noise (``None``: 1/E, the paper's variance 1/E²; 0: no noise).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, noise_std: Optional[float] = None,
                 capacity_factor=None, eval_capacity_factor="same", drop_policy: str = "position",
                 fused_gate="auto"):
        super().__init__(d_model, num_experts, top_k, norm="raw", capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy, fused_gate=fused_gate)
        noise_std = 1.0 / num_experts if noise_std is None else noise_std
        self.noise_std = check_number("noise_std", noise_std, min=0)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = super().logits(x_TD)
        if self.training and self.noise_std > 0:
            logits_TE = logits_TE + self.noise_std * torch.randn_like(logits_TE)
        return logits_TE

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_std={self.noise_std:g}"
