"""The fused expert path: gather → gate/up GEMM + SwiGLU → down GEMM + combine, in kernels.

Legend: T tokens, D model dim.

`fused_experts` returns the layer's routed output ``y_TD`` computed by the fused op
`moekit.ops.fused_moe` (Triton kernels) when it applies here (a SwiGLU bank, a device the kernels run on,
backend ``"auto"`` or ``"triton"``), and None otherwise, so the caller falls back to the
dispatch → experts → combine path, which computes the same function (tests compare both).
The deterministic ``"slots"`` combine needs every token's K pairs in token-major order
(``routing.slots_per_token``) with every slot kept; other routings (capacity, masks, the
static layout of sync-free routing) use the atomic combine.
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.ops.precision import autocast_dtype

__all__ = ["fused_experts"]


def fused_experts(x_TD: torch.Tensor, routing, experts, *, backend: str) -> Optional[torch.Tensor]:
    if backend not in ("auto", "triton"):
        return None
    try:
        from moekit.ops.triton_backend import fused_moe_applicable  # imports no triton on the CPU
    except ImportError:
        return None
    if not fused_moe_applicable(x_TD, experts):
        return None
    from moekit.ops import fused_moe

    amp = autocast_dtype(x_TD)                     # the kernels compute in x's dtype
    if amp is not None:
        x_TD = x_TD.to(amp)
    uniform = getattr(routing, "slots_per_token", None) is not None and getattr(routing, "keep", None) is None
    combine = "slots" if uniform else "atomic"
    return fused_moe.fused_moe_forward(x_TD, routing, experts, combine=combine)
