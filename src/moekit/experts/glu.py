"""Gated-linear-unit experts: SwiGLU, GeGLU, ReGLU (Shazeer 2020, "GLU Variants") with stacked weights.

Legend: N rows grouped by expert, D model dim, F expert hidden dim, E experts.

``expert(x) = down(act(gate(x)) · up(x))``. Weight layout pinned to Hugging Face v5:
``gate_up_proj`` (E, 2F, D) with the gate rows first, ``down_proj`` (E, D, F).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.base import ExpertBank, activation_fn, uniform_init_

__all__ = ["GLUExperts", "GLU_ACTIVATIONS"]

# expert name -> activation of the gate branch
GLU_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "geglu_tanh": "gelu_tanh"}


class GLUExperts(ExpertBank):
    def __init__(self, num_experts: int, d_model: int, d_hidden: int, *, activation: str = "silu"):
        super().__init__(num_experts, d_model)
        if not isinstance(d_hidden, int) or d_hidden <= 0:
            raise ValueError(f"d_hidden must be a positive int, got {d_hidden!r}")
        self.d_hidden = d_hidden
        self.activation = activation
        self.act = activation_fn(activation)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * d_hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        uniform_init_(self.gate_up_proj.data)
        uniform_init_(self.down_proj.data)

    def _glu(self, h_N2F: torch.Tensor) -> torch.Tensor:
        gate, up = h_N2F.chunk(2, dim=-1)
        return self.act(gate) * up

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        offs_E = self.offsets(counts_E)
        h_N2F = self.grouped(backend, x_ND, self.gate_up_proj.transpose(1, 2), offs_E)
        return self.grouped(backend, self._glu(h_N2F), self.down_proj.transpose(1, 2), offs_E)

    def expert_forward(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        gu, down = self.gate_up_proj[i].to(x_nD.dtype), self.down_proj[i].to(x_nD.dtype)
        return F.linear(self._glu(F.linear(x_nD, gu)), down)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"activation={self.activation!r}")
