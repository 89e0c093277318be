"""MultiHash layer (Roller et al. 2021, "Hash Layers For Large Sparse Models") — METHODS.md G8.

Legend: T tokens, D model dim, H hashes, E experts.

The token's hidden vector ``(D,)`` is split into H chunks of ``D / H``; chunk i is computed by
expert ``h_i(token_id)`` of a `moekit.MoE` of width ``D / H`` (router
`moekit.routing.MultiHashRouter`) and the H outputs are concatenated. The MoE sees the input
as ``(..., H, D/H)`` — its rows are the chunks in token-major order — and each chunk row
carries its token's id.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moekit.layers.checks import check_float_input
from moekit.layers.moe import MoE
from moekit.routing.multihash import MultiHashRouter
from moekit.validate import check_int

__all__ = ["MultiHashMoE"]


class MultiHashMoE(nn.Module):
    """``y = concat_i expert_{h_i(id)}(x_i)`` over the H chunks ``x_i`` of each token.

    Args: d_model (D, divisible by num_hashes), num_experts, num_hashes (H), vocab_size / seed
    (the hashes, see `MultiHashRouter`); the remaining keyword arguments go to the inner
    `moekit.MoE` of width ``D / H`` (``d_hidden``, ``expert``, ``backend`` …).
    """

    def __init__(self, *, d_model: int, num_experts: int, num_hashes: int = 2, vocab_size: Optional[int] = None,
                 seed: int = 0, **moe_kwargs):
        super().__init__()
        check_int("d_model", d_model, min=1)
        check_int("num_hashes", num_hashes, min=1)
        if d_model % num_hashes:
            raise ValueError(f"num_hashes must divide d_model={d_model} (equal chunks), got {num_hashes}")
        for k in ("router", "top_k", "router_kwargs", "d_model"):
            if k in moe_kwargs:
                raise ValueError(f"MultiHashMoE sets {k!r} itself (router 'multihash'); got {k}={moe_kwargs[k]!r}")
        self.d_model, self.num_hashes = d_model, num_hashes
        chunk = d_model // num_hashes
        router = MultiHashRouter(chunk, num_experts, num_hashes=num_hashes, vocab_size=vocab_size, seed=seed,
                                 rows_are_chunks=True)
        self.moe = MoE(d_model=chunk, num_experts=num_experts, router=router, **moe_kwargs)

    @property
    def router(self) -> MultiHashRouter:
        return self.moe.router

    def forward(self, x: torch.Tensor, *, token_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(..., D) → (..., D)``; token_ids and mask: shape ``(...)``."""
        check_float_input(x, self.d_model)
        H = self.num_hashes
        if not isinstance(token_ids, torch.Tensor) or token_ids.shape != x.shape[:-1]:
            got = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
            raise ValueError(f"token_ids must be a tensor of shape {tuple(x.shape[:-1])}, got {got}")
        x_H = x.reshape(*x.shape[:-1], H, self.d_model // H)                      # (..., H, D/H)
        ids_H = token_ids.unsqueeze(-1).expand(*token_ids.shape, H)
        mask_H = None if mask is None else mask.unsqueeze(-1).expand(*mask.shape, H)
        return self.moe(x_H, token_ids=ids_H, mask=mask_H).reshape(x.shape)

    @property
    def aux_loss(self) -> torch.Tensor:
        return self.moe.aux_loss

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_hashes={self.num_hashes}"
