"""Sinkhorn-balanced routing, S-BASE (Clark et al. 2022, "Unified Scaling Laws for Routed
Language Models") — METHODS.md G7.

Legend: T tokens, D model dim, E experts, K experts per token.

In training, the selection is made on a balanced version of ``exp(logits)``: a few Sinkhorn
iterations rescale rows and columns so that every token row sums to 1 and every expert column
to T/E (`sinkhorn_balance`, in log space), approximating BASE's balanced assignment. Each token
then takes its top-K experts of the balanced matrix, while the combine weights come from the
ordinary softmax of the logits (renormalised over the K, or raw with ``norm="raw"``), so the
router still learns from the task loss. In eval the selection is plain top-k of the softmax
(no coupling between tokens, so decoding stays causal).
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.ops.topk import topk_stable
from moekit.routing.topk import TopKRouter, normalise
from moekit.validate import check_int

__all__ = ["SinkhornRouter", "sinkhorn_balance"]


def sinkhorn_balance(logits_TE: torch.Tensor, num_iters: int = 8,
                     mask_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T, E) log of the Sinkhorn-balanced ``exp(logits)``: rows sum to 1, columns to ≈ T/E.

    Ends on a row step, so rows are exact and columns are within the tolerance the iterations
    reached. Padding rows (``mask_T`` False) are left out of the column sums and come back as −inf.
    """
    T, E = logits_TE.shape
    log_P = logits_TE.detach().float()
    if T == 0:
        return log_P
    n = torch.full((), float(T), dtype=torch.float64, device=log_P.device)   # a fill, not a host copy
    if mask_T is not None:
        log_P = log_P.masked_fill(~mask_T.unsqueeze(-1), float("-inf"))
        n = mask_T.sum().to(torch.float64)      # on the device: no host sync
    # (With every row padding the iterations produce NaN columns; the last mask covers them.)
    log_col_target = torch.log((n / E).to(torch.float32))
    for _ in range(num_iters):
        log_P = log_P - torch.logsumexp(log_P, dim=0, keepdim=True) + log_col_target
        log_P = log_P - torch.logsumexp(log_P, dim=1, keepdim=True)
    if mask_T is not None:
        log_P = log_P.masked_fill(~mask_T.unsqueeze(-1), float("-inf"))
    return log_P


class SinkhornRouter(TopKRouter):
    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, num_iters: int = 8,
                 norm: Optional[str] = None, capacity_factor=None, eval_capacity_factor="same",
                 drop_policy: str = "position"):
        # S-BASE is top-1 with the raw softmax gate (as Switch); top-k > 1 renormalises by default.
        norm = ("raw" if top_k == 1 else "renorm") if norm is None else norm
        super().__init__(d_model, num_experts, top_k, norm=norm, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy)
        check_int("num_iters", num_iters, min=1)
        self.num_iters = num_iters

    def select(self, logits_TE: torch.Tensor, mask: Optional[torch.Tensor] = None):
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.training:
            balanced_TE = sinkhorn_balance(logits_TE, self.num_iters, mask)
            _, topk_ids_TK = topk_stable(balanced_TE, self.top_k)
        else:
            _, topk_ids_TK = topk_stable(probs_TE, self.top_k)
        weights_TK = normalise(probs_TE.gather(1, topk_ids_TK), self.norm, self.route_scale)
        return topk_ids_TK, weights_TK, probs_TE

    def forward(self, x_TD, *, mask=None):
        self.check_input(x_TD, mask)
        logits_TE = self.logits(x_TD)
        # The balancing must leave padding rows out of the column sums.
        topk_ids_TK, weights_TK, probs_TE = self.select(logits_TE, mask)
        return self.build_routing(logits_TE, probs_TE, topk_ids_TK, weights_TK, mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_iters={self.num_iters}"
