"""Input checks shared by the layers: one wording for every ValueError / TypeError."""
from __future__ import annotations

import torch

__all__ = ["check_float_input"]


def check_float_input(x, dim: int, name: str = "d_model") -> None:
    """A float tensor whose last dimension is `dim` (named `name` in the message)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"x must have last dimension {name}={dim}, got shape {tuple(x.shape)}")
