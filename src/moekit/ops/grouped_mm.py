"""Grouped matrix multiply: each expert's contiguous row segment times that expert's matrix.

Legend: N rows (kept pairs, grouped by expert), E experts, I input dim, O output dim.

``grouped_mm(x_NI, w_EIO, offs_E)`` returns ``y_NO`` with
``y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]`` (``offs`` are cumulative row ends,
int32, ``offs[-1] <= N``; rows past ``offs[-1]`` belong to no expert: the reference returns
zeros there, fast paths leave them unspecified and callers mask them — the static layout of
sync-free routing parks dropped slots there). Two implementations of that one signature:

- `grouped_mm_reference`: a Python loop over experts (the eager reference; any dtype);
- `grouped_mm_fast`: ``torch._grouped_mm`` forward and backward, wrapped in an autograd
  function whose backward is itself two grouped matmuls (input grad ``gy @ wᵀ`` and weight
  grad ``x_eᵀ gy_e`` per group). The backward formula is checked in float64 by running the
  same function with the reference as its primitive.

``torch._grouped_mm`` needs float32/bf16/fp16 and every matrix row stride a multiple of 16
bytes (I and O multiples of 4 in float32, 8 in bf16); `fast_supported` says when it applies.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["grouped_mm_reference", "grouped_mm_fast", "fast_supported", "has_torch_grouped_mm",
           "offsets_from_counts"]


def has_torch_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def offsets_from_counts(counts_E: torch.Tensor) -> torch.Tensor:
    """Cumulative row ends (E,) int32 from per-expert counts."""
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


def fast_supported(x_NI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands here."""
    if not has_torch_grouped_mm() or x_NI.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x_NI.dtype != w_EIO.dtype or x_NI.device != w_EIO.device:
        return False
    if x_NI.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x_NI.device)
        if major < 8 or (x_NI.dtype == torch.float32 and major < 9):
            return False
    elif x_NI.device.type != "cpu":
        return False
    align = 16 // x_NI.element_size()
    I, O = w_EIO.shape[1], w_EIO.shape[2]
    return I % align == 0 and O % align == 0


def _segments(offs_E: torch.Tensor):
    ends = offs_E.tolist()
    start = 0
    for e, end in enumerate(ends):
        yield e, start, end
        start = end


def grouped_mm_reference(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-expert loop; differentiable by autograd; any float dtype."""
    segments = list(_segments(offs_E))
    outs = [x_NI[s:t] @ w_EIO[e] for e, s, t in segments if t > s]
    tail = x_NI.shape[0] - (segments[-1][2] if segments else 0)
    if tail or not outs:
        outs.append(x_NI.new_zeros(tail, w_EIO.shape[2]) + 0 * w_EIO.sum())
    return torch.cat(outs, dim=0)


def _weight_grad_reference(x_NI, gy_NO, offs_E, num_experts):
    gw = x_NI.new_zeros(num_experts, x_NI.shape[1], gy_NO.shape[1])
    for e, s, t in _segments(offs_E):
        if t > s:
            gw[e] = x_NI[s:t].t() @ gy_NO[s:t]
    return gw


def _grouped_mm_eager(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.shape[0] < w.shape[0]:
        return _grouped_mm_few_rows(x, w, offs)
    return torch._grouped_mm(x, w, offs=offs)


def _grouped_mm_few_rows(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` for fewer rows than groups (decoding): its CPU kernel visits every
    group, empty or not (at T = 1, K = 8, E = 128: 256 matmul calls and 256 host reads of the
    offsets a layer); this visits the non-empty ones only. Rows past the last offset are 0."""
    return _per_expert(x, w, offs, None)


def _per_expert(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, onednn) -> torch.Tensor:
    """One matmul per non-empty expert (`onednn`, when given, for experts with at least
    `_ONEDNN_MIN_ROWS` rows); rows past the last offset are 0."""
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end - start >= _ONEDNN_MIN_ROWS and onednn is not None:
            out[start:end] = onednn(x[start:end], w[e].t(), None, "none", [], "")
        elif end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    out[start:].zero_()
    return out


# Inference with a few rows per expert (decoding a batch of 16-64 tokens): MKL's GEMM streams
# weights at about 27 GB/s for 1-3 rows (its matrix-vector path) but 9-15 GB/s from 4 rows on,
# where it packs each weight panel; oneDNN's matmul on the unpacked weight keeps 16-20 GB/s
# there (measured on these CPUs at D 2048, F 768, fp32, two threads, 128 distinct experts).
_SMALL_GROUP_ROWS = 8        # average rows per expert up to which the per-expert path runs
_ONEDNN_MIN_ROWS = 4


def _onednn_linear():
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    return op if op is not None and torch.backends.mkldnn.is_available() else None


def _grouped_mm_small_groups(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The forward for inference on the CPU with at most `_SMALL_GROUP_ROWS` rows per expert on
    average: a loop over the non-empty experts, each through the matmul that streams its weight
    fastest for its row count (MKL for 1-3 rows; oneDNN from 4 rows, when the weight is the
    transposed view of an (E, O, I) parameter, as every bank's is). Rows past the last offset are 0."""
    onednn = _onednn_linear() if x.dtype == torch.float32 and w.transpose(-2, -1).is_contiguous() else None
    return _per_expert(x, w, offs, onednn)


def _fwd_inference(x, w, offs):
    if x.device.type == "cpu" and x.shape[0] <= _SMALL_GROUP_ROWS * w.shape[0] and not torch.compiler.is_compiling():
        return _grouped_mm_small_groups(x, w, offs)
    return _fwd_torch(x, w, offs)


def _grouped_wgrad_eager(x: torch.Tensor, gy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # Groups split the reduction (row) dimension: (I, N) x (N, O) -> (E, I, O). Experts with
    # no rows get zeros.
    return torch._grouped_mm(x.t(), gy, offs=offs)


# `torch.compile` traces `torch._grouped_mm` through its meta function, which (torch 2.13)
# accepts bf16 only, although the CPU kernel runs float32 exactly. Registered as custom ops
# with their own shape functions, the two primitives are opaque to the compiler, which calls
# the real kernel at run time: compile and export work for every dtype the kernel takes, with
# no graph break (the sync-free layer compiles with fullgraph=True).
if hasattr(torch, "library") and hasattr(torch.library, "custom_op") and has_torch_grouped_mm():
    _fwd_op = torch.library.custom_op("moekit::grouped_mm", _grouped_mm_eager, mutates_args=())
    _wgrad_op = torch.library.custom_op("moekit::grouped_mm_wgrad", _grouped_wgrad_eager, mutates_args=())

    @_fwd_op.register_fake
    def _(x, w, offs):
        return x.new_empty(x.shape[0], w.shape[2])

    @_wgrad_op.register_fake
    def _(x, gy, offs):
        return x.new_empty(offs.shape[0], x.shape[1], gy.shape[1])
else:                                                  # torch < 2.4: no custom ops, eager only
    _fwd_op, _wgrad_op = _grouped_mm_eager, _grouped_wgrad_eager


# Eager calls go straight to the kernel: the custom op's dispatch costs about 60 µs a call
# (measured on CPU), which a small layer pays six times per forward + backward.
def _fwd_torch(x, w, offs):
    return _fwd_op(x, w, offs) if torch.compiler.is_compiling() else _grouped_mm_eager(x, w, offs)


def _wgrad_torch(x, gy, offs, num_experts):
    return _wgrad_op(x, gy, offs) if torch.compiler.is_compiling() else _grouped_wgrad_eager(x, gy, offs)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, w_EIO, offs_E, fwd: Callable, wgrad: Callable):
        ctx.save_for_backward(x_NI, w_EIO, offs_E)
        ctx.fwd, ctx.wgrad = fwd, wgrad
        return fwd(x_NI, w_EIO, offs_E)

    @staticmethod
    def backward(ctx, gy_NO):
        x_NI, w_EIO, offs_E = ctx.saved_tensors
        gy_NO = gy_NO.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = ctx.fwd(gy_NO, w_EIO.transpose(-2, -1), offs_E)
        if ctx.needs_input_grad[1]:
            if w_EIO.transpose(-2, -1).is_contiguous():
                # w is the transposed view of an (E, O, I) parameter (nn.Linear layout): build
                # its gradient in that layout, gy_eᵀ x_e, so accumulating it needs no copy.
                gw = ctx.wgrad(gy_NO, x_NI, offs_E, w_EIO.shape[0]).transpose(-2, -1)
            else:
                gw = ctx.wgrad(x_NI, gy_NO, offs_E, w_EIO.shape[0])
        return gx, gw, None, None, None


def grouped_mm_fast(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` with a grouped-matmul backward. Raises if not `fast_supported`."""
    if not fast_supported(x_NI, w_EIO):
        raise ValueError(
            f"torch._grouped_mm cannot run x {x_NI.dtype} {tuple(x_NI.shape)} with w {w_EIO.dtype} "
            f"{tuple(w_EIO.shape)} on {x_NI.device}: it needs float32/bf16/fp16 and dims that are "
            f"multiples of {16 // x_NI.element_size()} (and torch >= 2.8); use backend='eager'")
    x_NI = x_NI.contiguous()
    training = torch.is_grad_enabled() and (x_NI.requires_grad or w_EIO.requires_grad)
    return _GroupedMM.apply(x_NI, w_EIO, offs_E, _fwd_torch if training else _fwd_inference, _wgrad_torch)


def grouped_mm_autograd_with_reference(x_NI, w_EIO, offs_E):
    """The fast path's autograd function over the reference primitive (for float64 gradcheck)."""
    return _GroupedMM.apply(x_NI, w_EIO, offs_E, grouped_mm_reference, _weight_grad_reference)
