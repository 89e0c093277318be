"""Fused top-k gate: scores (softmax or sigmoid), top-k selection and weight normalisation in
one kernel over rows of router logits (Shazeer et al. 2017 softmax top-k; DeepSeek-V3 sigmoid
scores with a selection-only bias) — the `select` step of `TopKRouter` / `SigmoidRouter`.

Legend: T tokens, E experts, K experts per token.

The function is `moekit.ops.gate`'s (see its docstring), for float32 logits.

Selection is by repeated row maxima (K passes over a row held in registers), fine for the
K ≤ 8 and E ≤ a few hundred of the benchmark shapes. `topk_gate_forward` launches it (no
autograd); the differentiable op is `moekit.ops.topk_gate.fused_topk_gate`, whose backward
recomputes the differentiable part in PyTorch, beside its reference
`moekit.ops.gate.topk_gate_reference`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moekit.kernels.launch import launch_context

__all__ = ["topk_gate_forward"]


@triton.jit
def _topk_gate_kernel(
    logits_ptr, bias_ptr, ids_ptr, w_ptr, probs_ptr,
    T, E, stride_lt, route_scale,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    r_ok = rows < T
    c_ok = cols < E
    m2 = r_ok[:, None] & c_ok[None, :]
    lg = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :], mask=m2,
                 other=0.0).to(tl.float32)
    # Padding columns must lose every comparison; padding rows stay finite (no NaN).
    lg = tl.where(c_ok[None, :], lg, float("-inf"))
    if SIGMOID:
        s = tl.where(c_ok[None, :], tl.sigmoid(lg), 0.0)
        probs = s / tl.maximum(tl.sum(s, axis=1), 1e-30)[:, None]
    else:
        mx = tl.max(lg, axis=1)
        ex = tl.where(c_ok[None, :], tl.exp(lg - mx[:, None]), 0.0)
        s = ex / tl.sum(ex, axis=1)[:, None]
        probs = s
    tl.store(probs_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], probs, mask=m2)
    choice = s
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    # NaN competes as +inf (the reference ranks NaN first too), so every pick is a real
    # column; padding columns lose every comparison.
    choice = tl.where(choice != choice, float("inf"), choice)
    choice = tl.where(c_ok[None, :], choice, float("-inf"))
    kk = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for k in tl.static_range(K):
        best = tl.max(choice, axis=1)
        # Lowest index among the maxima: the deterministic tie-break.
        idx = tl.minimum(tl.min(tl.where(choice == best[:, None], cols[None, :], BLOCK_E), axis=1), E - 1)
        hit = cols[None, :] == idx[:, None]
        val = tl.sum(tl.where(hit, s, 0.0), axis=1)
        top_w = tl.where(kk[None, :] == k, val[:, None], top_w)
        top_i = tl.where(kk[None, :] == k, idx[:, None], top_i)
        choice = tl.where(hit, float("-inf"), choice)
    if NORMALIZE:
        top_w = top_w / tl.maximum(tl.sum(top_w, axis=1), 1e-20)[:, None]
    top_w = top_w * route_scale
    mk = r_ok[:, None] & (kk[None, :] < K)
    out = rows[:, None].to(tl.int64) * K + kk[None, :]
    tl.store(ids_ptr + out, top_i.to(tl.int64), mask=mk)
    tl.store(w_ptr + out, top_w, mask=mk)


def topk_gate_forward(logits_TE: torch.Tensor, top_k: int, *, sigmoid: bool, normalize: bool,
                      route_scale: float, bias_E: Optional[torch.Tensor] = None):
    """Launch the gate kernel: ``(ids_TK int64, weights_TK float32, probs_TE float32)``.

    logits_TE: (T, E) float32 (any row stride, unit column stride after ``contiguous``);
    sigmoid: sigmoid scores (else softmax); bias_E: float32 (E,) added to the scores for the
    choice only. No autograd: see `moekit.ops.topk_gate.fused_topk_gate`.
    """
    if logits_TE.dim() != 2 or logits_TE.dtype != torch.float32:
        raise ValueError(f"the gate kernel takes float32 (T, E) logits, got {logits_TE.dtype} "
                         f"{tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k <= E:
        raise ValueError(f"top_k must be an int in [1, {E}], got {top_k!r}")
    if bias_E is not None and (bias_E.shape != (E,) or bias_E.dtype != torch.float32):
        raise ValueError(f"bias_E must be float32 ({E},), got {bias_E.dtype} {tuple(bias_E.shape)}")
    logits_TE = logits_TE.contiguous()
    dev = logits_TE.device
    ids = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    probs = torch.empty(T, E, dtype=torch.float32, device=dev)
    if T == 0:
        return ids, w, probs
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(64, 4096 // block_e)) if dev.type == "cuda" else 16
    block_t = triton.next_power_of_2(block_t)
    bias = None if bias_E is None else bias_E.contiguous()
    with launch_context(dev):
        _topk_gate_kernel[(triton.cdiv(T, block_t),)](
            logits_TE, bias if bias is not None else logits_TE, ids, w, probs,
            T, E, logits_TE.stride(0), float(route_scale),
            SIGMOID=bool(sigmoid), HAS_BIAS=bias is not None, NORMALIZE=bool(normalize), K=top_k,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        )
    return ids, w, probs
