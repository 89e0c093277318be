"""Merged-parameter experts: SMEAR — METHODS.md X6.

Muqeeth, Liu & Raffel (2023), "Soft Merging of Experts with Adaptive Routing" (TMLR 2024).

Legend: B examples, S tokens per example, D model dim, F expert hidden dim, E experts.

Instead of running the experts a router selects, SMEAR averages their *parameters* with the
router's probabilities and runs the merged expert once per example:

    p = softmax(W_r · mean_s x_s)           (B, E), one routing decision per example
    θ̄_b = Σ_e p_{b,e} θ_e                   every weight and bias of the expert
    y_{b,s} = f(x_{b,s}; θ̄_b)

Routing is fully differentiable (no top-k, no gradient estimator). The token computation
costs one expert; the merge costs ``E · |θ|`` per example, independent of S. For a linear
expert ``f(x; W, b) = W x + b``, SMEAR equals the dense mixture ``Σ_e p_e f_e(x)`` exactly
(linearity); for an MLP it does not (the mixture of products is not the product of mixtures).

Experts: ``"linear"`` (``W_e`` (E, D, D), ``b_e`` (E, D)) or ``"mlp"`` (``up`` (E, F, D) with
bias, activation, ``down`` (E, D, F) with bias).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.base import activation_fn, uniform_init_
from moekit.layers.protocol import MoELayer, mixture_stats
from moekit.validate import check_choice, check_int

__all__ = ["SMEAR"]


class SMEAR(MoELayer):
    """Per-example merged expert ``(B, S, D) → (B, S, D)`` (or ``(B, D) → (B, D)``, S = 1).

    Args:
        d_model: D.
        num_experts: E.
        expert: ``"mlp"`` (default) or ``"linear"``.
        d_hidden: F for ``"mlp"`` (default 4·D); must be None for ``"linear"``.
        activation: the MLP's activation (default gelu).
    """

    def __init__(self, *, d_model: int, num_experts: int, expert: str = "mlp", d_hidden: Optional[int] = None,
                 activation: str = "gelu"):
        super().__init__()
        for name, v in (("d_model", d_model), ("num_experts", num_experts)):
            check_int(name, v, min=1)
        check_choice("expert", expert, ("mlp", "linear"))
        if expert == "linear" and d_hidden is not None:
            raise ValueError(f"d_hidden applies to expert='mlp' only, got d_hidden={d_hidden} with 'linear'")
        self.d_model, self.num_experts, self.expert = d_model, num_experts, expert
        self.router = nn.Linear(d_model, num_experts, bias=False)
        bound = 1.0 / math.sqrt(d_model)
        if expert == "linear":
            self.weight = nn.Parameter(uniform_init_(torch.empty(num_experts, d_model, d_model)))   # (E, D, D)
            self.bias = nn.Parameter(torch.empty(num_experts, d_model).uniform_(-bound, bound))
        else:
            d_hidden = 4 * d_model if d_hidden is None else d_hidden
            check_int("d_hidden", d_hidden, min=1)
            self.d_hidden, self.activation = d_hidden, activation
            self.act = activation_fn(activation)
            self.up_proj = nn.Parameter(uniform_init_(torch.empty(num_experts, d_hidden, d_model)))  # (E, F, D)
            self.up_bias = nn.Parameter(torch.empty(num_experts, d_hidden).uniform_(-bound, bound))
            self.down_proj = nn.Parameter(uniform_init_(torch.empty(num_experts, d_model, d_hidden)))  # (E, D, F)
            hb = 1.0 / math.sqrt(d_hidden)
            self.down_bias = nn.Parameter(torch.empty(num_experts, d_model).uniform_(-hb, hb))
        self.last_gates: Optional[torch.Tensor] = None

    def gates(self, x_BSD: torch.Tensor, mask_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, E) float32 routing probabilities from the (masked) mean token."""
        x = x_BSD.float()
        if mask_BS is None:
            pooled = x.mean(1)
        else:
            m = mask_BS.to(x.dtype)[..., None]
            pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return torch.softmax(F.linear(pooled, self.router.weight.float()), dim=-1)

    def merged_parameters(self, p_BE: torch.Tensor) -> dict:
        """Each expert parameter averaged per example: a tensor with a leading B axis per name."""
        names = ("weight", "bias") if self.expert == "linear" else ("up_proj", "up_bias", "down_proj", "down_bias")
        return {n: torch.einsum("be,e...->b...", p_BE, getattr(self, n).to(p_BE.dtype)) for n in names}

    def expert_forward(self, params: dict, x_BSD: torch.Tensor) -> torch.Tensor:
        """The expert function with per-example parameters ``params`` (leading B axis)."""
        p = {k: v.to(x_BSD.dtype) for k, v in params.items()}
        if self.expert == "linear":
            return torch.einsum("bsd,bod->bso", x_BSD, p["weight"]) + p["bias"][:, None]
        h = self.act(torch.einsum("bsd,bfd->bsf", x_BSD, p["up_proj"]) + p["up_bias"][:, None])
        return torch.einsum("bsf,bdf->bsd", h, p["down_proj"]) + p["down_bias"][:, None]

    def forward(self, x: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x)}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, S, {self.d_model}) or (B, {self.d_model}), got {tuple(x.shape)}")
        x_BSD = x.unsqueeze(1) if x.dim() == 2 else x
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x_BSD.shape[:2]):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(x_BSD.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        p_BE = self.gates(x_BSD, mask)
        y = self.expert_forward(self.merged_parameters(p_BE), x_BSD)
        self.last_gates = p_BE.detach()
        self.last_stats = mixture_stats(p_BE)
        self.aux_loss = torch.zeros((), device=x.device)
        return y.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, expert={self.expert!r}"
