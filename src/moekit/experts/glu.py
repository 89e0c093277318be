"""Gated-linear-unit experts: SwiGLU, GeGLU, ReGLU (Shazeer 2020, "GLU Variants") with stacked weights.

Legend: N rows grouped by expert, D model dim, F expert hidden dim, E experts.

``expert(x) = down(act(gate(x)) · up(x))``. Weight layout pinned to Hugging Face v5:
``gate_up_proj`` (E, 2F, D) with the gate rows first, ``down_proj`` (E, D, F).
"""
from __future__ import annotations

import torch
from torch import nn

from moekit.experts.base import StackedFFNExperts, uniform_init_
from moekit.ops.glu import glu

__all__ = ["GLUExperts", "GLU_ACTIVATIONS"]

# expert name -> activation of the gate branch
GLU_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "geglu_tanh": "gelu_tanh"}


class GLUExperts(StackedFFNExperts):
    def __init__(self, num_experts: int, d_model: int, d_hidden: int, *, activation: str = "silu"):
        super().__init__(num_experts, d_model, d_hidden, activation=activation)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * d_hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        uniform_init_(self.gate_up_proj.data)
        uniform_init_(self.down_proj.data)

    def projections(self) -> tuple[torch.Tensor, None, torch.Tensor, None]:
        return self.gate_up_proj, None, self.down_proj, None

    def hidden(self, h_N2F: torch.Tensor) -> torch.Tensor:
        return glu(h_N2F, self.act)
