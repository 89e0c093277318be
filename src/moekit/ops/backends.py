"""Backends of the grouped expert computation, chosen by name.

Every backend computes `grouped_mm_reference`'s function with the same signature
``(x_NI, w_EIO, offs_E) -> y_NO``; tests compare each against ``"eager"``.

- ``"eager"``: the per-expert loop (reference; any dtype and shape).
- ``"grouped_mm"``: ``torch._grouped_mm`` (CPU and GPU; float32/bf16/fp16, aligned dims).
- ``"auto"``: the fastest backend that is correct for the operands here — a registered
  accelerator backend whose ``supported`` says yes (e.g. Triton on CUDA), else
  ``"grouped_mm"`` where supported, else ``"eager"``.

Further backends register with `register_backend`; ``"triton"`` (`moekit.ops.triton_backend`)
is registered on first use of this registry when triton is importable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch

from moekit.ops.grouped_mm import fast_supported, grouped_mm_fast, grouped_mm_reference

__all__ = ["Backend", "register_backend", "available_backends", "resolve_backend", "check_backend_name"]


@dataclass(frozen=True)
class Backend:
    name: str
    grouped_mm: Callable          # (x_NI, w_EIO, offs_E) -> y_NO
    supported: Callable           # (x_NI, w_EIO) -> bool
    auto_priority: int = 0        # higher wins under "auto"


_BACKENDS: Dict[str, Backend] = {
    "eager": Backend("eager", grouped_mm_reference, lambda x, w: True, auto_priority=0),
    "grouped_mm": Backend("grouped_mm", grouped_mm_fast, fast_supported, auto_priority=10),
}
# name -> (module, attribute holding its Backend); imported on first use, left out on ImportError.
_LAZY = {"triton": ("moekit.ops.triton_backend", "TRITON_BACKEND")}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def _load_lazy() -> None:
    import importlib

    for name, (module, attr) in list(_LAZY.items()):
        if name not in _BACKENDS:
            try:
                register_backend(getattr(importlib.import_module(module), attr))
            except ImportError:
                pass
        _LAZY.pop(name, None)


def available_backends() -> list[str]:
    _load_lazy()
    return ["auto"] + sorted(_BACKENDS)


def check_backend_name(name: str) -> None:
    if name == "auto":
        return
    _load_lazy()
    if not isinstance(name, str) or name not in _BACKENDS:
        hint = " (install the 'triton' extra)" if name == "triton" else ""
        raise ValueError(f"backend must be one of {available_backends()}, got {name!r}{hint}")


def resolve_backend(name: str, x_NI: torch.Tensor, w_EIO: torch.Tensor) -> Backend:
    """The backend that runs these operands; ValueError if a named one cannot."""
    check_backend_name(name)
    _load_lazy()          # "auto" must see lazily registered backends (triton)
    if name != "auto":
        b = _BACKENDS[name]
        if not b.supported(x_NI, w_EIO):
            raise ValueError(f"backend {name!r} cannot run x {x_NI.dtype} {tuple(x_NI.shape)} with "
                             f"w {tuple(w_EIO.shape)} on {x_NI.device}; use backend='auto' or 'eager'")
        return b
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.auto_priority):
        if b.supported(x_NI, w_EIO):
            return b
    return _BACKENDS["eager"]
