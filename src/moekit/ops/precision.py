"""The dtype ``torch.autocast`` runs matmuls in, for ops autocast does not know.

``nn.Linear`` and ``torch.matmul`` run in the autocast dtype (bf16 on the CPU, fp16 or bf16
on CUDA) inside an autocast region; the grouped matmuls and fused kernels of the expert banks
are custom ops that autocast does not see, so the banks cast their operands themselves with
`autocast_dtype`, and every backend computes what the eager reference (``x @ w``) computes.
As autocast does, float32 operands are cast and float64 ones are left alone.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["autocast_dtype"]


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast matmul dtype for float32 `t` on its device; None when autocast is off
    there or `t` is not float32."""
    if t.dtype != torch.float32:
        return None
    device = t.device.type
    try:
        if not torch.is_autocast_enabled(device):
            return None
        return torch.get_autocast_dtype(device)
    except (TypeError, AttributeError):                 # torch < 2.4: the older per-device calls
        if device == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        if device == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return None
