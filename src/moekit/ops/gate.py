"""The top-k gate of the softmax and sigmoid routers: scores, top-k choice, combine weights.

Legend: T tokens, E experts, K experts per token.

For each row of float32 ``logits_TE``::

    s      = softmax(logits)   (score="softmax")   or   sigmoid(logits)   (score="sigmoid")
    choice = s + bias          (the bias only steers the choice, never the weights)
    ids    = the K largest of choice, ties to the lowest expert index (METHODS.md §0.2 contract 2)
    w      = s[ids] / Σ s[ids] if normalize else s[ids];   w *= route_scale
    probs  = s  (softmax)   or   s / Σ_E s  (sigmoid, DeepSeek-V3's normalised affinities)

`topk_gate_reference` is that, in PyTorch. `topk_gate` runs the one-kernel Triton gate
(`moekit.ops.topk_gate.fused_topk_gate`) where it applies — ``fused="auto"``: float32 logits on a CUDA
device that the kernels support, with triton installed, K ≤ 16 and E ≤ 1024 — and the
reference otherwise; both
give the same ids and, within float32 rounding, the same weights and gradients (tests).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from moekit.ops.topk import topk_stable, topk_stable_nonnegative

__all__ = ["topk_gate", "topk_gate_reference", "gate_weights_probs", "check_fused_option", "SCORES"]

SCORES = ("softmax", "sigmoid")
# "auto" takes the kernel up to these sizes: it holds a row of E scores in registers and
# makes K passes over it (sized for the benchmark shapes, K ≤ 8, E ≤ 256).
AUTO_MAX_K, AUTO_MAX_E = 16, 1024


def check_fused_option(fused) -> None:
    if not (isinstance(fused, bool) or fused == "auto"):      # 1 and 0 are not switches
        raise ValueError(f"fused_gate must be 'auto', True or False, got {fused!r}")


def check_gate_args(logits_TE, top_k, score, bias_E) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if logits_TE.dim() != 2 or not logits_TE.is_floating_point():
        raise ValueError(f"logits must be a float (T, E) tensor, got {logits_TE.dtype} {tuple(logits_TE.shape)}")
    E = logits_TE.shape[1]
    if not isinstance(top_k, int) or not 0 < top_k <= E:
        raise ValueError(f"top_k must be an int in [1, {E}], got {top_k!r}")
    if bias_E is not None and bias_E.shape != (E,):
        raise ValueError(f"bias must have shape ({E},), got {tuple(bias_E.shape)}")


def _scores(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    return _softmax_experts(logits_TE) if score == "softmax" else torch.sigmoid(logits_TE)


def _softmax_experts(logits_TE: torch.Tensor) -> torch.Tensor:
    """Softmax over the expert dim. The CPU kernel is slow for rows shorter than one AVX-512
    vector (E < 16), and the same softmax over the transposed view is not (measured at T 3072,
    E 8, two threads, forward + backward: 98 against 292 µs; from E 16 on the plain call wins)."""
    if logits_TE.device.type == "cpu" and logits_TE.dim() == 2 and logits_TE.shape[-1] < 16:
        return torch.softmax(logits_TE.t(), dim=0).t().contiguous()
    return torch.softmax(logits_TE, dim=-1)


def gate_weights_probs(logits_TE, ids_TK, score, normalize, route_scale, s_TE=None):
    """The differentiable part given the choice: ``(weights_TK, probs_TE)``; `s_TE`, the scores
    of `logits_TE` when the caller has them."""
    s_TE = _scores(logits_TE, score) if s_TE is None else s_TE
    w_TK = s_TE.gather(1, ids_TK)
    if normalize:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    w_TK = w_TK * route_scale
    probs_TE = s_TE if score == "softmax" else s_TE / s_TE.sum(-1, keepdim=True).clamp_min(1e-30)
    return w_TK, probs_TE


def topk_gate_reference(logits_TE: torch.Tensor, top_k: int, *, score: str = "softmax", normalize: bool = True,
                        route_scale: float = 1.0, bias_E: Optional[torch.Tensor] = None):
    """``(ids_TK int64, weights_TK, probs_TE)`` in PyTorch (logits' dtype; float32 or float64)."""
    check_gate_args(logits_TE, top_k, score, bias_E)
    s_TE = _scores(logits_TE, score)
    if bias_E is None:           # softmax / sigmoid scores: ≥ 0 or NaN
        _, ids_TK = topk_stable_nonnegative(s_TE.detach(), top_k)
    else:
        _, ids_TK = topk_stable(s_TE.detach() + bias_E.to(s_TE.dtype), top_k)
    w_TK, probs_TE = gate_weights_probs(logits_TE, ids_TK, score, normalize, route_scale, s_TE)
    return ids_TK, w_TK, probs_TE


def _kernel_runs_here(logits_TE: torch.Tensor) -> bool:
    """float32 logits on a device the Triton kernels run on in this process (triton installed)."""
    if logits_TE.dtype != torch.float32:
        return False
    try:
        from moekit.ops.triton_backend import triton_device_supported
    except ImportError:                  # triton not installed
        return False
    return triton_device_supported(logits_TE.device, logits_TE.dtype)


def topk_gate(logits_TE: torch.Tensor, top_k: int, *, score: str = "softmax", normalize: bool = True,
              route_scale: float = 1.0, bias_E: Optional[torch.Tensor] = None,
              fused: Union[str, bool] = "auto"):
    """The gate, through the Triton kernel when ``fused`` is True (it must apply) or "auto"
    (where it applies), else `topk_gate_reference`. Same signature and results."""
    check_fused_option(fused)
    if fused is True and not _kernel_runs_here(logits_TE):
        raise ValueError(f"fused_gate=True needs float32 logits on a device the Triton kernels run on "
                         f"(CUDA, or the CPU under TRITON_INTERPRET=1), got {logits_TE.dtype} on {logits_TE.device}")
    if fused is True or (fused == "auto" and logits_TE.device.type == "cuda" and top_k <= AUTO_MAX_K
                         and logits_TE.shape[-1] <= AUTO_MAX_E and _kernel_runs_here(logits_TE)):
        from moekit.ops.topk_gate import fused_topk_gate

        return fused_topk_gate(logits_TE, top_k, score=score, normalize=normalize, route_scale=route_scale,
                               bias_E=bias_E)
    return topk_gate_reference(logits_TE, top_k, score=score, normalize=normalize, route_scale=route_scale,
                               bias_E=bias_E)

