"""Per-expert counts without a host synchronisation.

``torch.bincount`` sizes its output from the largest id, which it reads on the host (a
device sync on a GPU); with the number of bins known, a scatter-add of ones gives the same
counts on the device alone.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["count_ids"]


def count_ids(ids: torch.Tensor, num_bins: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(num_bins,) int64: how many entries of `ids` (any shape, values in [0, num_bins)) equal
    each bin, counting only entries where `valid` (bool, broadcastable to ids) is True."""
    flat = ids.reshape(-1).to(torch.int64)
    ones = torch.ones_like(flat) if valid is None else valid.expand_as(ids).reshape(-1).to(torch.int64)
    counts = torch.zeros(num_bins, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, flat, ones)
