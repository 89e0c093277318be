"""Permute tokens into per-expert segments and combine expert outputs back.

Legend: T tokens, D model dim, E experts, N kept pairs.

The dispatcher is not an ``nn.Module``: ``dispatch`` and ``combine`` are joined by a frozen
`DispatchMeta`. Expert parallelism (`moekit.parallel`) subclasses `LocalDispatcher` and only
adds communication between the two.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DispatchMeta", "LocalDispatcher", "permute", "unpermute"]


@dataclass(frozen=True)
class DispatchMeta:
    token_ids_N: torch.Tensor    # token of each row, in expert-sorted order
    weights_N: torch.Tensor      # combine weight of each row, in expert-sorted order
    num_tokens: int


def permute(x_TD: torch.Tensor, token_ids_N: torch.Tensor, expert_ids_N: torch.Tensor, num_experts: int):
    """Rows of x grouped by expert (stable: token order kept within an expert).

    Returns ``(x_ND, counts_E, order_N)`` with ``x_ND = x_TD[token_ids_N[order_N]]``.
    """
    order_N = torch.argsort(expert_ids_N, stable=True)
    counts_E = torch.bincount(expert_ids_N, minlength=num_experts)
    return x_TD.index_select(0, token_ids_N[order_N]), counts_E, order_N


def unpermute(y_ND: torch.Tensor, token_ids_N: torch.Tensor, weights_N: torch.Tensor, num_tokens: int,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y_TD[t] = Σ_{rows r of t} weights[r] · y_ND[r]``, accumulated in float32 for half types."""
    acc = torch.float32 if y_ND.dtype in (torch.float16, torch.bfloat16) else y_ND.dtype
    weighted = y_ND.to(acc) * weights_N.to(acc).unsqueeze(-1)
    out = torch.zeros(num_tokens, y_ND.shape[-1], dtype=acc, device=y_ND.device)
    out = out.index_add(0, token_ids_N, weighted)
    return out.to(out_dtype or y_ND.dtype)


class LocalDispatcher:
    """Single-process dispatch: sort pairs by expert, gather rows, scatter-add them back."""

    def dispatch(self, x_TD: torch.Tensor, routing):
        x_ND, counts_E, order_N = permute(x_TD, routing.token_ids, routing.expert_ids, routing.num_experts)
        meta = DispatchMeta(token_ids_N=routing.token_ids[order_N], weights_N=routing.weights[order_N],
                            num_tokens=x_TD.shape[0])
        return x_ND, counts_E, meta

    def combine(self, y_ND: torch.Tensor, meta: DispatchMeta, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return unpermute(y_ND, meta.token_ids_N, meta.weights_N, meta.num_tokens, out_dtype)
