"""Plain two-layer MLP experts ``down(act(up(x)))`` with stacked weights.

Legend: N rows grouped by expert, D model dim, F expert hidden dim, E experts.

Weight layout (pinned so Hugging Face v5 checkpoints map without copies):
``up_proj`` (E, F, D) and ``down_proj`` (E, D, F), each expert's matrix stored (out, in)
like ``nn.Linear.weight``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.base import ExpertBank, activation_fn, uniform_init_

__all__ = ["MLPExperts"]


class MLPExperts(ExpertBank):
    def __init__(self, num_experts: int, d_model: int, d_hidden: int, *, activation: str = "gelu"):
        super().__init__(num_experts, d_model)
        if not isinstance(d_hidden, int) or d_hidden <= 0:
            raise ValueError(f"d_hidden must be a positive int, got {d_hidden!r}")
        self.d_hidden = d_hidden
        self.activation = activation
        self.act = activation_fn(activation)
        self.up_proj = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        uniform_init_(self.up_proj.data)
        uniform_init_(self.down_proj.data)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        offs_E = self.offsets(counts_E)
        h_NF = self.grouped(backend, x_ND, self.up_proj.transpose(1, 2), offs_E)
        return self.grouped(backend, self.act(h_NF), self.down_proj.transpose(1, 2), offs_E)

    def expert_forward(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        up, down = self.up_proj[i].to(x_nD.dtype), self.down_proj[i].to(x_nD.dtype)
        return F.linear(self.act(F.linear(x_nD, up)), down)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"activation={self.activation!r}")
