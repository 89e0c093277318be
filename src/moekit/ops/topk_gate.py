"""The fused top-k gate as an autograd op: one Triton kernel forward
(`moekit.kernels.router.topk_gate_forward`), the differentiable part recomputed in PyTorch
backward.

Legend: T tokens, E experts, K experts per token.

`fused_topk_gate` has the signature and results of `moekit.ops.gate.topk_gate_reference`
(see `moekit.ops.gate` for the function); `moekit.ops.gate.topk_gate` picks between them.
Importing this module imports triton.
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.kernels.router import topk_gate_forward
from moekit.ops.gate import check_gate_args, gate_weights_probs

__all__ = ["fused_topk_gate"]


class _TopKGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, top_k, score, normalize, route_scale):
        ids, w, probs = topk_gate_forward(logits_TE, top_k, sigmoid=score == "sigmoid", normalize=normalize,
                                          route_scale=route_scale, bias_E=bias_E)
        ctx.save_for_backward(logits_TE, ids)
        ctx.cfg = (score, normalize, route_scale)
        ctx.mark_non_differentiable(ids)
        return ids, w, probs

    @staticmethod
    def backward(ctx, _d_ids, d_w, d_probs):
        # The ids are fixed; weights and probs are recomputed from the logits and differentiated.
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
    """Triton gate with `topk_gate_reference`'s signature and results:
    ``(ids_TK int64, weights_TK, probs_TE)``, float32.

    `TopKRouter(norm=...)` maps to ``score="softmax"`` with normalize = (norm != "raw") and
    route_scale; `SigmoidRouter` (num_groups=1) to ``score="sigmoid"``, ``normalize=renorm``,
    ``bias_E=expert_bias``.
    """
    check_gate_args(logits_TE, top_k, score, bias_E)
    if logits_TE.dtype != torch.float32:
        raise ValueError(f"the fused gate takes float32 logits, got {logits_TE.dtype}")
    bias = None if bias_E is None else bias_E.detach().float().contiguous()
    return _TopKGate.apply(logits_TE, bias, top_k, score, normalize, route_scale)
