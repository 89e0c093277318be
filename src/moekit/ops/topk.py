"""Top-k selection with a deterministic tie-break.

Legend: T tokens, E experts, K selected.

`torch.topk` does not promise which of several equal scores wins. Routing must be
reproducible and identical on every backend and rank, so ties go to the lowest expert index
(METHODS.md contract 2). Fast path: ``torch.topk`` of k+1 values; only when two of them are
equal (rare for float scores, common for hand-made or zero-initialised ones) does the whole
call fall back to a stable descending sort, which gives the lowest-index rule exactly.
"""
from __future__ import annotations

import torch

__all__ = ["topk_stable"]


def topk_stable(scores_TE: torch.Tensor, k: int):
    """``(values_TK, indices_TK)`` of the k largest scores per row, ties to the lowest index."""
    if not 0 < k <= scores_TE.shape[-1]:
        raise ValueError(f"k must be in [1, {scores_TE.shape[-1]}], got {k}")
    if k == 1:
        # argmax returns the first maximal index.
        idx = scores_TE.argmax(dim=-1, keepdim=True)
        return scores_TE.gather(-1, idx), idx
    E = scores_TE.shape[-1]
    if scores_TE.numel():
        v, i = torch.topk(scores_TE, min(k + 1, E), dim=-1)
        if not bool((v[..., 1:] == v[..., :-1]).any()):
            return v[..., :k], i[..., :k]
    values, indices = torch.sort(scores_TE, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]
