"""MLP experts with biases, ``down(act(up(x) + b_up)) + b_down``, for upcycling dense FFNs that
have biases (BERT, ViT, GPT-2 style ``Linear(bias=True)`` MLPs).

Legend: N rows grouped by expert, D model dim, F expert hidden dim, E experts.

Same stacked layout as `MLPExperts` (``up_proj`` (E, F, D), ``down_proj`` (E, D, F)) plus
``up_bias`` (E, F) and ``down_bias`` (E, D). The grouped path adds each row's expert bias
after the grouped matmul; `expert_forward` is the plain per-expert reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.mlp import MLPExperts

__all__ = ["BiasMLPExperts"]


class BiasMLPExperts(MLPExperts):
    def __init__(self, num_experts: int, d_model: int, d_hidden: int, *, activation: str = "gelu"):
        super().__init__(num_experts, d_model, d_hidden, activation=activation)
        self.up_bias = nn.Parameter(torch.zeros(num_experts, d_hidden))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, d_model))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        offs_E = self.offsets(counts_E)
        # Expert of each row: rows arrive grouped by expert, counts_E[e] rows for expert e.
        e_N = torch.repeat_interleave(torch.arange(self.num_experts, device=x_ND.device),
                                      counts_E.to(x_ND.device), output_size=x_ND.shape[0])
        h_NF = self.grouped(backend, x_ND, self.up_proj.transpose(1, 2), offs_E)
        h_NF = h_NF + self.up_bias[e_N].to(h_NF.dtype)
        y_ND = self.grouped(backend, self.act(h_NF), self.down_proj.transpose(1, 2), offs_E)
        return y_ND + self.down_bias[e_N].to(y_ND.dtype)

    def expert_forward(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        dt = x_nD.dtype
        h = F.linear(x_nD, self.up_proj[i].to(dt), self.up_bias[i].to(dt))
        return F.linear(self.act(h), self.down_proj[i].to(dt), self.down_bias[i].to(dt))
