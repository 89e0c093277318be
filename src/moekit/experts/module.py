"""Any list of user ``nn.Module``s as the experts of an MoE layer (the flexible, slower path).

Legend: N rows grouped by expert, D model dim, E experts.

Stacked-weight banks (`MLPExperts`, `GLUExperts`) run every expert in one grouped matmul but
fix the expert's architecture. `ModuleExperts` takes arbitrary modules — a conv net, an
attention block, a pretrained FFN, experts of different architectures — and runs each on its
own contiguous segment of rows with a Python loop. That loop *is* the eager reference, so
the only backends are ``"eager"`` and ``"auto"`` (which means eager here); any other name is
refused with a ValueError rather than silently run eagerly.

``bank[i]`` returns the i-th module itself (not a view), so
``moe(x)[t] == Σ w · moe.experts[e](x[t])`` holds with the user's own modules.

Dtype: each expert runs in the dtype of its own parameters (the input rows are cast to it
and the output cast back), so a float32 module works inside a bf16 model and vice versa.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from moekit.experts.base import ExpertBank
from moekit.validate import check_int

__all__ = ["ModuleExperts"]

_BACKENDS = ("auto", "eager")


def _param_dtype(module: nn.Module) -> Optional[torch.dtype]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


class ModuleExperts(ExpertBank):
    """E arbitrary modules, expert i mapping ``(n, D) → (n, d_out)``.

    Args:
        modules: the experts (a list, tuple or ``nn.ModuleList``; at least one).
        d_model: D, the width of the rows each expert receives.
        d_out: width of each expert's output (default D, as inside `moekit.MoE`).
    """

    # The backends this bank can run (a layer may check its ``backend=`` against it up front).
    supported_backends = _BACKENDS

    def __init__(self, modules: Sequence[nn.Module], *, d_model: int, d_out: Optional[int] = None):
        if isinstance(modules, nn.Module) and not isinstance(modules, nn.ModuleList):
            raise TypeError("modules must be a sequence of nn.Module (wrap a single module in a list), "
                            f"got {type(modules).__name__}")
        modules = list(modules)
        if not modules:
            raise ValueError("modules must hold at least one expert, got an empty sequence")
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"modules[{i}] must be an nn.Module, got {type(m).__name__}")
        super().__init__(len(modules), d_model)
        d_out = d_model if d_out is None else d_out
        check_int("d_out", d_out, min=1)
        self.d_out = d_out
        self.expert_modules = nn.ModuleList(modules)

    def __getitem__(self, i: int) -> nn.Module:
        if not isinstance(i, int) or not -self.num_experts <= i < self.num_experts:
            raise IndexError(f"expert index {i!r} out of range for {self.num_experts} experts")
        return self.expert_modules[i]

    def _run(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        module = self.expert_modules[i]
        dt = _param_dtype(module)
        y = module(x_nD if dt is None else x_nD.to(dt))
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape != (x_nD.shape[0], self.d_out):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"expert {i} must map ({x_nD.shape[0]}, {self.d_model}) rows to "
                             f"({x_nD.shape[0]}, {self.d_out}), got {got}")
        return y.to(x_nD.dtype)

    def expert_forward(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        return self._run(i, x_nD)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        if backend not in _BACKENDS:
            raise ValueError(f"ModuleExperts runs arbitrary modules with a per-expert loop; backend must be "
                             f"one of {_BACKENDS}, got {backend!r}")
        if x_ND.dim() != 2 or x_ND.shape[1] != self.d_model:
            raise ValueError(f"x must have shape (N, {self.d_model}), got {tuple(x_ND.shape)}")
        if counts_E.shape != (self.num_experts,):
            raise ValueError(f"counts must have shape ({self.num_experts},), got {tuple(counts_E.shape)}")
        counts = counts_E.tolist()
        if sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)} but x has {x_ND.shape[0]} rows")
        outs = []
        for i, x_nD in enumerate(torch.split(x_ND, counts)):
            if x_nD.shape[0]:       # an expert with no rows is not called (BatchNorm & co. reject n = 0)
                outs.append(self._run(i, x_nD))
        if not outs:
            return x_ND.new_zeros(0, self.d_out)
        return torch.cat(outs, 0)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_out={self.d_out}"
