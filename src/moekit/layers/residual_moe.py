"""Residual-MoE and Pyramid-MoE (PR-MoE) — METHODS.md X3.

Rajbhandari, Li, Yao, Zhang, Aminabadi, Awan, Rasley & He (2022), ICML, "DeepSpeed-MoE:
Advancing Mixture-of-Experts Inference and Training to Power Next-Generation AI Scale".

Legend: T tokens, D model dim, E experts.

- **Residual-MoE**: every token goes through a fixed dense MLP, and one routed expert (top-1 by
  default) adds a correction: ``y = MLP(x) + g · f_{e*}(x)``. The paper's argument: top-2
  quality at top-1 communication cost, the dense MLP carrying what all tokens share. With
  ``coefficient=True`` the two branches are mixed per token by a learned softmax,
  ``y = c₀(x) · MoE(x) + c₁(x) · MLP(x)``, ``c = softmax(x W_c)`` — the form DeepSpeed's
  released ``use_residual`` code uses [R].
- **Pyramid-MoE**: more experts in later layers than in earlier ones; `PyramidMoE` takes the
  expert count of every layer as a list and stacks Residual-MoE (or plain MoE) blocks with a
  residual connection ``x ← x + block(x)``.

The routed branch is a `moekit.MoE` (any router, bank, capacity), so its ``aux_loss`` and
``last_stats`` are the inner layer's; `moekit.aux_loss(model)` finds the inner layer, and these
wrappers are not `MoELayer`s themselves (that would count the loss twice).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.shared import DenseFFN
from moekit.layers.moe import MoE, default_hidden
from moekit.validate import check_bool, check_instance, check_int

__all__ = ["ResidualMoE", "PyramidMoE"]


class ResidualMoE(nn.Module):
    """``(..., D) → (..., D)``: dense MLP + routed expert correction.

    Args:
        d_model: D.
        num_experts: E routed experts.
        top_k: experts per token in the routed branch (1 in the paper).
        d_hidden: hidden size of each routed expert (default as `moekit.MoE`).
        mlp_d_hidden: hidden size of the dense MLP (default: ``d_hidden``).
        expert: expert type of both branches (``"swiglu"`` default, ``"mlp"`` …).
        coefficient: mix the branches with a learned per-token softmax instead of adding them.
        **moe_kwargs: further `moekit.MoE` arguments (router, capacity_factor, aux_loss_coef …).
    """

    def __init__(self, *, d_model: int, num_experts: int, top_k: int = 1, d_hidden: Optional[int] = None,
                 mlp_d_hidden: Optional[int] = None, expert: str = "swiglu", coefficient: bool = False,
                 **moe_kwargs):
        super().__init__()
        if "experts" in moe_kwargs:
            raise ValueError("ResidualMoE builds its own expert bank; experts= is not accepted")
        check_int("d_model", d_model, min=1)
        check_int("mlp_d_hidden", mlp_d_hidden, min=1, allow_none=True)
        check_bool("coefficient", coefficient)
        d_hidden = default_hidden(d_model, expert) if d_hidden is None else d_hidden
        self.moe = MoE(d_model=d_model, num_experts=num_experts, top_k=top_k, d_hidden=d_hidden, expert=expert,
                       **moe_kwargs)
        self.mlp = DenseFFN(d_model, d_hidden if mlp_d_hidden is None else mlp_d_hidden, expert=expert)
        self.coefficient = nn.Linear(d_model, 2) if coefficient else None
        self.d_model = d_model

    @property
    def aux_loss(self) -> torch.Tensor:
        return self.moe.aux_loss

    @property
    def last_stats(self):
        return self.moe.last_stats

    def forward(self, x: torch.Tensor, **moe_inputs) -> torch.Tensor:
        routed = self.moe(x, **moe_inputs)               # validates x (shape, dtype)
        dense = self.mlp(x)
        if self.coefficient is None:
            return dense + routed
        c = torch.softmax(F.linear(x.float(), self.coefficient.weight.float(), self.coefficient.bias.float()), -1)
        return (c[..., :1] * routed.float() + c[..., 1:] * dense.float()).to(x.dtype)


class PyramidMoE(nn.Module):
    """A stack of MoE blocks whose expert counts grow with depth (``num_experts`` per layer).

    Args:
        d_model: D.
        num_experts: experts of each layer, e.g. ``[4, 4, 8, 8]`` (must be non-decreasing unless
            ``allow_any_order=True``: the pyramid puts more experts in later layers).
        residual_mlp: use `ResidualMoE` blocks (PR-MoE) rather than plain `moekit.MoE` blocks.
        **layer_kwargs: passed to every block (top_k, d_hidden, expert, router …).
    """

    def __init__(self, *, d_model: int, num_experts: Sequence[int], residual_mlp: bool = True,
                 allow_any_order: bool = False, **layer_kwargs):
        super().__init__()
        check_instance("num_experts", num_experts, (list, tuple), what="a list of expert counts, one per layer")
        counts = [check_int(f"num_experts[{i}]", e, min=1) for i, e in enumerate(num_experts)]
        check_bool("residual_mlp", residual_mlp)
        check_bool("allow_any_order", allow_any_order)
        if not counts:
            raise ValueError("num_experts must list one expert count per layer, got []")
        if not allow_any_order and any(a > b for a, b in zip(counts, counts[1:])):
            raise ValueError(f"num_experts must be non-decreasing with depth (a pyramid), got {counts}; "
                             "pass allow_any_order=True to build it anyway")
        self.num_experts = counts
        if residual_mlp:
            self.layers = nn.ModuleList(ResidualMoE(d_model=d_model, num_experts=e, **layer_kwargs) for e in counts)
        else:
            layer_kwargs.setdefault("top_k", 1)
            self.layers = nn.ModuleList(MoE(d_model=d_model, num_experts=e, **layer_kwargs) for e in counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x
