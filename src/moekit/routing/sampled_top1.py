"""Sampled top-1 routing (one of Branch-Train-MiX's routing variants) — METHODS.md T7.

Legend: T tokens, D model dim, E experts.

Sukhbaatar et al. (2024), "Branch-Train-MiX", compare top-2 with "sample top-1": in training
each token goes to one expert *drawn* from the router distribution instead of its argmax, with
the Gumbel-softmax (Jang et al., 2016) carrying the router's gradient; in eval the argmax.

Training, with Gumbel noise ``g_e = −log(−log u_e)``, ``u ~ U(0, 1)``, and temperature τ:

    i = argmax_e (h_e + g_e)            ~ softmax(h)      (the Gumbel-max trick: an exact draw)
    s = softmax((h + g) / τ)            the relaxed one-hot sample
    weight = 1 + s_i − stop_grad(s_i)   straight-through: value exactly 1, gradient of s_i

so the forward pass is a hard one-expert choice and the router learns through ``∂s_i/∂h``.
With ``straight_through=False`` the weight is ``s_i`` itself (a soft gate ≤ 1), and in eval
``softmax(h / τ)_i`` of the argmax expert. Eval (``straight_through=True``): the argmax expert
with weight exactly 1, its gradient that of ``softmax(h / τ)_i``; no randomness (contract 8).

The paper does not pin τ or the gate value beyond "Gumbel softmax"; τ = 1 by default here.
"""
from __future__ import annotations

import torch

from moekit.ops.topk import topk_stable
from moekit.routing.topk import TopKRouter
from moekit.validate import check_bool, check_number

__all__ = ["SampledTop1Router", "gumbel_like"]


def gumbel_like(logits_TE: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise of the logits' shape, dtype and device (finite: u is kept off 0 and 1)."""
    tiny = torch.finfo(logits_TE.dtype).tiny
    u = torch.rand_like(logits_TE).clamp(min=tiny, max=1.0 - torch.finfo(logits_TE.dtype).eps)
    return -torch.log(-torch.log(u))


class SampledTop1Router(TopKRouter):
    """Top-1 routing to an expert sampled from ``softmax(x W_rᵀ)`` in training, argmax in eval."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, temperature: float = 1.0,
                 straight_through: bool = True, capacity_factor=None, eval_capacity_factor="same",
                 drop_policy: str = "position"):
        if top_k != 1:
            raise ValueError(f"sampled top-1 routing routes 1 expert per token, got top_k={top_k}")
        temperature = check_number("temperature", temperature, min=0, min_open=True)
        check_bool("straight_through", straight_through)
        super().__init__(d_model, num_experts, 1, norm="raw", capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy, fused_gate=False)
        self.temperature, self.straight_through = temperature, straight_through

    def select(self, logits_TE: torch.Tensor):
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.training:
            noisy_TE = logits_TE + gumbel_like(logits_TE).detach()
            _, ids_T1 = topk_stable(noisy_TE.detach(), 1)
        else:
            noisy_TE = logits_TE
            _, ids_T1 = topk_stable(logits_TE.detach(), 1)
        soft_T1 = torch.softmax(noisy_TE / self.temperature, dim=-1).gather(1, ids_T1)
        weights_T1 = (soft_T1 - soft_T1.detach()) + 1.0 if self.straight_through else soft_T1
        return ids_T1, weights_T1, probs_TE

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, straight_through={self.straight_through}"
