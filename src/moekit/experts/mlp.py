"""Plain two-layer MLP experts ``down(act(up(x) + b_up)) + b_down`` with stacked weights.

Legend: N rows grouped by expert, D model dim, F expert hidden dim, E experts.

Weight layout (pinned so Hugging Face v5 checkpoints map without copies):
``up_proj`` (E, F, D) and ``down_proj`` (E, D, F), each expert's matrix stored (out, in)
like ``nn.Linear.weight``. With ``bias=True`` (dense FFNs upcycled from BERT, ViT or GPT-2
style ``Linear(bias=True)`` MLPs) also ``up_bias`` (E, F) and ``down_bias`` (E, D); without,
both are None.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moekit.experts.base import StackedFFNExperts, uniform_init_
from moekit.validate import check_bool

__all__ = ["MLPExperts"]


class MLPExperts(StackedFFNExperts):
    def __init__(self, num_experts: int, d_model: int, d_hidden: int, *, activation: str = "gelu",
                 bias: bool = False):
        check_bool("bias", bias)
        super().__init__(num_experts, d_model, d_hidden, activation=activation)
        self.up_proj = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        if bias:
            self.up_bias = nn.Parameter(torch.empty(num_experts, d_hidden))
            self.down_bias = nn.Parameter(torch.empty(num_experts, d_model))
        else:
            self.register_parameter("up_bias", None)
            self.register_parameter("down_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        uniform_init_(self.up_proj.data)
        uniform_init_(self.down_proj.data)
        # Zero biases: a fresh bank with bias computes what the same weights without bias do.
        for b in (self.up_bias, self.down_bias):
            if b is not None:
                nn.init.zeros_(b)

    def projections(self) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        return self.up_proj, self.up_bias, self.down_proj, self.down_bias

    def hidden(self, h_NF: torch.Tensor) -> torch.Tensor:
        return self.act(h_NF)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", bias=True" if self.up_bias is not None else "")
