"""Helpers that turn a (T, E) selection into the kept (token, expert, weight) pairs of a `Routing`.

Legend: T tokens, E experts, N kept pairs.

Routers whose tokens take a variable number of experts (top-p, ReLU, DSelect-k, expert
choice, null experts) select with a boolean (T, E) matrix rather than (T, K) ids; these
helpers give every such router the same token-major pair order.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["pairs_from_selection", "no_drops", "check_token_input"]


def pairs_from_selection(selected_TE: torch.Tensor, weights_TE: torch.Tensor,
                         mask_T: Optional[torch.Tensor] = None):
    """``(token_ids_N, expert_ids_N, weights_N)`` of the True entries of `selected_TE`.

    Pairs come in token-major order (then expert index). Padding rows (``mask_T`` False) are
    never kept. Weights keep their autograd graph.
    """
    if mask_T is not None:
        selected_TE = selected_TE & mask_T.unsqueeze(-1)
    token_ids, expert_ids = selected_TE.nonzero(as_tuple=True)   # row-major = token-major
    return token_ids, expert_ids, weights_TE[token_ids, expert_ids]


def no_drops(device) -> torch.Tensor:
    """The 0-d int64 ``dropped`` of a router that never drops a selected pair."""
    return torch.zeros((), dtype=torch.long, device=device)


def check_token_input(name: str, ids_T: Optional[torch.Tensor], num_tokens: int,
                      num_values: Optional[int] = None, *, sync_free: bool = False) -> torch.Tensor:
    """Validate a per-token integer input (``token_ids``, ``task_ids``) of shape (T,).

    The range check reads the values on the host (a ValueError naming them); with
    `sync_free` it is an asynchronous device assertion instead (RuntimeError, or a CUDA
    device-side assert), so routing stays free of host syncs.
    """
    if ids_T is None:
        raise ValueError(f"this router needs `{name}` (an int tensor of shape ({num_tokens},)); "
                         f"pass it as MoE.forward(x, {name}=...)")
    if not isinstance(ids_T, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(ids_T).__name__}")
    if ids_T.shape != (num_tokens,):
        raise ValueError(f"{name} must have shape ({num_tokens},), got {tuple(ids_T.shape)}")
    if ids_T.dtype.is_floating_point or ids_T.dtype == torch.bool or ids_T.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got dtype {ids_T.dtype}")
    if sync_free:
        ok = (ids_T >= 0).all() if num_values is None else ((ids_T >= 0) & (ids_T < num_values)).all()
        bound = f"[0, {num_values})" if num_values is not None else ">= 0"
        torch._assert_async(ok, f"{name} must lie in {bound}")
    elif ids_T.numel():
        lo, hi = int(ids_T.min()), int(ids_T.max())
        if lo < 0 or (num_values is not None and hi >= num_values):
            bound = f"[0, {num_values})" if num_values is not None else ">= 0"
            raise ValueError(f"{name} must lie in {bound}, got values in [{lo}, {hi}]")
    return ids_T.long()
