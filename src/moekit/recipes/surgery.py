"""Small helpers for model surgery shared by the recipes: swapping submodules by dotted name,
naming an activation function by what it computes, and materialising modules built on ``meta``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moekit.experts.base import ACTIVATIONS

__all__ = ["get_submodule", "set_submodule", "identify_activation", "materialise_buffers"]

# Probe points for `identify_activation`: both signs, around the kinks of relu / gelu.
_PROBE = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model if name == "" else model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (``""`` is not allowed: no parent to set it on)."""
    if name == "":
        raise ValueError("cannot replace the root module in place; use the returned module instead")
    parent_name, _, attr = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def identify_activation(fn: Callable) -> str:
    """The name in `moekit.experts.ACTIVATIONS` of the function `fn` computes.

    Decided by evaluating `fn` on probe points rather than by class name, so it works for
    ``nn.SiLU``, transformers' ``ACT2FN`` objects, ``F.gelu`` or a lambda alike.
    Raises ValueError if no known activation matches to 1e-6.
    """
    x = _PROBE.float()
    with torch.no_grad():
        try:
            y = fn(x.clone()).double()
        except Exception as e:      # a module that cannot take a 1-D float tensor
            raise ValueError(f"cannot evaluate activation {fn!r}: {e}") from e
        for name in ("silu", "gelu", "gelu_tanh", "relu", "relu2", "identity"):
            ref = ACTIVATIONS[name](x.clone()).double()
            if y.shape == ref.shape and torch.allclose(y, ref, atol=1e-6, rtol=0):
                return name
    raise ValueError(f"activation {fn!r} matches none of {sorted(ACTIVATIONS)}")


def materialise_buffers(module: nn.Module, device: torch.device) -> None:
    """Replace buffers still on ``meta`` by zeros on `device` (running counters and the like)."""
    for mod in module.modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                mod._buffers[bname] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
