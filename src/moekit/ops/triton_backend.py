"""The Triton kernels as moekit backend ``"triton"``, and where they can run.

`moekit.ops.backends` imports this module lazily and registers `TRITON_BACKEND`; an
ImportError here (no triton installed) leaves the backend out. This module does not import
triton itself: the kernels are imported on the first `supported` or ``grouped_mm`` call that
may use them, so merely listing backends never fixes triton's compiled/interpreted mode.

``supported(x, w)``: float32/bf16/fp16 operands of one dtype and device, any shapes (masks
handle ragged sizes, strides any layout). On CUDA it needs compute capability ≥ 8 (bf16
``tl.dot``); on the CPU it runs only under the interpreter, and only while
``TRITON_INTERPRET=1`` is set, so ``backend="auto"`` never picks the (slow) interpreter
by accident. ``auto_priority`` 20 beats ``"grouped_mm"`` (10).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from moekit.ops.backends import Backend

if importlib.util.find_spec("triton") is None:
    raise ImportError("triton is not installed")

__all__ = ["triton_supported", "triton_device_supported", "fused_moe_applicable", "TRITON_BACKEND"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_device_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels can run `dtype` operands on `device` in this process."""
    if dtype not in _FLOAT_DTYPES:
        return False
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return False
        from moekit.kernels.launch import INTERPRET
        return not INTERPRET
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        from moekit.kernels.launch import INTERPRET
        return INTERPRET
    return False


def triton_supported(x_NI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    if x_NI.dtype != w_EIO.dtype or x_NI.device != w_EIO.device:
        return False
    if x_NI.dim() != 2 or w_EIO.dim() != 3 or x_NI.shape[1] != w_EIO.shape[1]:
        return False
    return triton_device_supported(x_NI.device, x_NI.dtype)


def fused_moe_applicable(x_TD: torch.Tensor, bank) -> bool:
    """Whether `moekit.ops.fused_moe.fused_moe_forward` can run this bank on these inputs
    here: a SwiGLU bank (``gate_up_proj``, ``down_proj``, activation silu) and a device the
    kernels run on (as `triton_supported`). Imports triton only when the answer may be yes."""
    gu = getattr(bank, "gate_up_proj", None)
    if gu is None or getattr(bank, "down_proj", None) is None:
        return False
    if getattr(bank, "activation", None) not in ("silu", "swish") or x_TD.dim() != 2 or gu.device != x_TD.device:
        return False
    return triton_device_supported(x_TD.device, x_TD.dtype)


def _triton_grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    from moekit.ops.grouped_mm_triton import grouped_mm_triton

    return grouped_mm_triton(x_NI, w_EIO, offs_E)


TRITON_BACKEND = Backend("triton", _triton_grouped_mm, triton_supported, auto_priority=20)
