"""Grouped matmul on the Triton kernels: the ``"triton"`` backend's op.

Legend: N rows grouped by expert, E experts, I input dim, O output dim.

`grouped_mm_triton(x_NI, w_EIO, offs_E) -> y_NO` has the signature and function of
`moekit.ops.grouped_mm.grouped_mm_reference` (the per-expert loop it is tested against).
Backward: ``dx = dy @ W[e]ᵀ`` (the same kernel on a transposed view, no copy) and
``dW[e] = x_eᵀ dy_e`` (the weight-gradient kernel). Importing this module imports triton.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from moekit.kernels.grouped_gemm import check_operands, gmm, gmm_wgrad
from moekit.kernels.launch import check_tiles

__all__ = ["grouped_mm_triton"]


class _GroupedMMTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, w_EIO, offs_E, tiles):
        ctx.save_for_backward(x_NI, w_EIO, offs_E)
        ctx.tiles = tiles
        return gmm(x_NI, w_EIO, offs_E, tiles=tiles)

    @staticmethod
    def backward(ctx, gy_NO):
        x_NI, w_EIO, offs_E = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = gmm(gy_NO, w_EIO.transpose(1, 2), offs_E, tiles=ctx.tiles)
        if ctx.needs_input_grad[1]:
            gw = gmm_wgrad(x_NI, gy_NO, offs_E, out_dtype=w_EIO.dtype, tiles=ctx.tiles)
        return gx, gw, None, None


def grouped_mm_triton(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, *,
                      tiles: Optional[Mapping[str, int]] = None) -> torch.Tensor:
    """Triton grouped matmul with the signature of `grouped_mm_reference` (autograd-aware).

    tiles: tile sizes to force in every launch, forward and backward (keys of
    `moekit.kernels.launch.GEMM_TILE_KEYS` / `WGRAD_TILE_KEYS`); None takes the heuristic's.
    """
    check_operands(x_NI, w_EIO, offs_E)
    check_tiles(tiles)
    return _GroupedMMTriton.apply(x_NI, w_EIO, offs_E, tiles)
