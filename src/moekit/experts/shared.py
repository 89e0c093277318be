"""Shared experts: always-on dense experts beside the routed ones (DeepSeekMoE; Qwen-MoE) — METHODS.md X2.

Legend: T tokens, D model dim, F hidden dim.

``num_shared`` shared experts of hidden size F are one dense MLP/GLU of hidden size
``num_shared · F`` (the same function, one matmul). Qwen-MoE's optional gate scales the
shared output per token by ``sigmoid(x w_g)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.base import activation_fn
from moekit.experts.glu import GLU_ACTIVATIONS
from moekit.ops.glu import glu
from moekit.validate import check_bool, check_choice, check_int

__all__ = ["SharedExperts", "DenseFFN"]


class DenseFFN(nn.Module):
    """One dense expert: GLU (``gate_up_proj`` (2F, D)) or MLP (``up_proj`` (F, D)), ``down_proj`` (D, F)."""

    def __init__(self, d_model: int, d_hidden: int, *, expert: str = "swiglu", activation: str | None = None):
        super().__init__()
        check_int("d_model", d_model, min=1)
        check_int("d_hidden", d_hidden, min=1)
        check_choice("expert", expert, ("mlp", *sorted(GLU_ACTIVATIONS)))
        self.glu = expert in GLU_ACTIVATIONS
        self.expert = expert
        act_name = activation if activation is not None else (GLU_ACTIVATIONS[expert] if self.glu else "gelu")
        self.act = activation_fn(act_name)
        if self.glu:
            self.gate_up_proj = nn.Linear(d_model, 2 * d_hidden, bias=False)
        else:
            self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.glu:
            return self.down_proj(glu(self.gate_up_proj(x), self.act))
        return self.down_proj(self.act(self.up_proj(x)))


class SharedExperts(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, num_shared: int = 1, *, expert: str = "swiglu",
                 activation: str | None = None, gate: bool = False):
        super().__init__()
        check_int("d_model", d_model, min=1)
        check_int("num_shared", num_shared, min=1)
        check_int("d_hidden", d_hidden, min=1)
        check_bool("gate", gate)
        self.num_shared = num_shared
        self.ffn = DenseFFN(d_model, num_shared * d_hidden, expert=expert, activation=activation)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y = self.ffn(x_TD)
        if self.gate is not None:
            # The gate in float32 at least (float64 stays float64), like the routers.
            acc = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
            y = torch.sigmoid(F.linear(x_TD.to(acc), self.gate.weight.to(acc))).to(y.dtype) * y
        return y
