"""Fused top-k gate: scores (softmax or sigmoid), top-k selection and weight normalisation in
one kernel over rows of router logits (Shazeer et al. 2017 softmax top-k; DeepSeek-V3 sigmoid
scores with a selection-only bias) — the `select` step of `TopKRouter` / `SigmoidRouter`.

Legend: T tokens, E experts, K experts per token.

The function is `moekit.ops.gate`'s (see its docstring), for float32 logits.

Selection is by repeated row maxima (K passes over a row held in registers), fine for the
K ≤ 8 and E ≤ a few hundred of the benchmark shapes. The backward pass recomputes the
differentiable part (weights and probs from the logits, with the selected ids fixed) in
PyTorch. `moekit.ops.gate.topk_gate_reference` has the same signature and is the eager
reference (re-exported here).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moekit.kernels.launch import launch_context
from moekit.ops.gate import SCORES, check_gate_args, gate_weights_probs, topk_gate_reference

__all__ = ["fused_topk_gate", "topk_gate_reference", "SCORES"]

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


class _TopKGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, top_k, score, normalize, route_scale):
        T, E = logits_TE.shape
        logits_TE = logits_TE.contiguous()
        dev = logits_TE.device
        ids = torch.empty(T, top_k, dtype=torch.int64, device=dev)
        w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
        probs = torch.empty(T, E, dtype=torch.float32, device=dev)
        if T > 0:
            block_e = triton.next_power_of_2(E)
            block_t = max(1, min(64, 4096 // block_e)) if dev.type == "cuda" else 16
            block_t = triton.next_power_of_2(block_t)
            with launch_context(dev):
                _topk_gate_kernel[(triton.cdiv(T, block_t),)](
                    logits_TE, bias_E if bias_E is not None else logits_TE, ids, w, probs,
                    T, E, logits_TE.stride(0), float(route_scale),
                    SIGMOID=score == "sigmoid", HAS_BIAS=bias_E is not None, NORMALIZE=bool(normalize), K=top_k,
                    BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
                )
        ctx.save_for_backward(logits_TE, ids)
        ctx.cfg = (score, normalize, route_scale)
        ctx.mark_non_differentiable(ids)
        return ids, w, probs

    @staticmethod
    def backward(ctx, _d_ids, d_w, d_probs):
        logits_TE, ids = ctx.saved_tensors
        with torch.enable_grad():
            lg = logits_TE.detach().requires_grad_(True)
            w, probs = gate_weights_probs(lg, ids, *ctx.cfg)
            outs, grads = [], []
            for o, g in ((w, d_w), (probs, d_probs)):
                if g is not None:
                    outs.append(o)
                    grads.append(g)
            (d_logits,) = torch.autograd.grad(outs, (lg,), grads) if outs else (None,)
        return d_logits, None, None, None, None, None


def fused_topk_gate(logits_TE: torch.Tensor, top_k: int, *, score: str = "softmax", normalize: bool = True,
                    route_scale: float = 1.0, bias_E: Optional[torch.Tensor] = None):
    """Triton gate with `topk_gate_reference`'s signature and results.

    `TopKRouter(norm=...)` maps to ``score="softmax"`` with normalize = (norm != "raw") and
    route_scale; `SigmoidRouter` (num_groups=1) to ``score="sigmoid"``, ``normalize=renorm``,
    ``bias_E=expert_bias``.
    """
    check_gate_args(logits_TE, top_k, score, bias_E)
    if logits_TE.dtype != torch.float32:
        raise ValueError(f"the fused gate takes float32 logits, got {logits_TE.dtype}")
    bias = None if bias_E is None else bias_E.detach().float().contiguous()
    return _TopKGate.apply(logits_TE, bias, top_k, score, normalize, route_scale)
