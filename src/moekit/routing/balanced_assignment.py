"""BASE layers: balanced assignment of tokens to experts (Lewis, Bhosale, Dettmers, Goyal &
Zettlemoyer 2021, "BASE Layers: Simplifying Training of Large, Sparse Models") — METHODS.md G6.

Legend: T tokens, D model dim, E experts, C tokens per expert.

Scores ``s_{t,e} = x_t · w_e`` (learned expert embeddings ``w``). In training every expert takes
exactly its share of the group (``C = T/E``; when E does not divide T the first ``T mod E``
experts take one more) and the assignment ``a`` maximises the total affinity ``Σ_t s_{t,a(t)}``
— a balanced linear assignment problem (per group of ``group_size`` tokens, if set). In eval
each token takes its argmax expert (no balancing, so decoding stays causal).
The combine weight is ``σ(s_{t,a(t)})`` (the paper's
``x + σ(h·w_a) f_a(h)``; the residual is the model's). No auxiliary loss, no capacity factor.

The assignment is solved exactly by `balanced_assignment` (successive shortest augmenting
paths, see there) with no dependency (SciPy is not needed); the paper's auction algorithm
reaches the same optimum only up to its ε and parallelises better on accelerators, but at the
group sizes a CPU test or a small model uses the exact solver is cheap.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.base import Router, Routing, check_no_top_k, router_float
from moekit.routing.pairs import no_drops
from moekit.routing.topk import init_router_weight
from moekit.validate import check_int

__all__ = ["BaseLayerRouter", "balanced_assignment", "balanced_capacities"]


def balanced_capacities(num_tokens: int, num_experts: int) -> list[int]:
    """Tokens per expert: ``T // E`` each, one more for the first ``T mod E`` experts."""
    q, r = divmod(num_tokens, num_experts)
    return [q + (1 if e < r else 0) for e in range(num_experts)]


def balanced_assignment(scores_TE: torch.Tensor, capacities_E: Sequence[int]) -> torch.Tensor:
    """(T,) expert per token maximising ``Σ_t scores[t, a(t)]`` with exactly ``capacities[e]``
    tokens on expert e (``Σ capacities = T``). Exact.

    Min-cost flow by successive shortest paths: tokens are added one at a time; token t enters
    through the expert path of least total cost change, where moving an already placed token
    from expert e to e' costs ``cost[t', e'] − cost[t', e]`` (cost = −score). Adding a token with
    a shortest augmenting path keeps the partial assignment optimal (as in the Hungarian
    method), and the expert graph has no negative cycle, so Bellman–Ford over E nodes finds the
    path. O(T² E) time; equal to ``scipy.optimize.linear_sum_assignment`` on the score matrix
    with expert e's column repeated ``capacities[e]`` times.
    """
    T, E = scores_TE.shape
    caps = np.asarray(list(capacities_E), dtype=np.int64)
    if caps.shape != (E,) or (caps < 0).any() or int(caps.sum()) != T:
        raise ValueError(f"capacities must be {E} non-negative ints summing to T={T}, got {list(capacities_E)}")
    cost = -scores_TE.detach().double().cpu().numpy()
    assign = np.full(T, -1, dtype=np.int64)
    load = np.zeros(E, dtype=np.int64)
    rows = np.arange(T)
    for t in range(T):
        # Cheapest move of a placed token between each pair of experts, and which token it is.
        W = np.full((E, E), np.inf)
        W_tok = np.full((E, E), -1, dtype=np.int64)
        if t:
            placed = assign[:t]
            delta = cost[:t] - cost[rows[:t], placed][:, None]                 # (t, E)
            for e in np.unique(placed):
                idx = np.nonzero(placed == e)[0]
                sub = delta[idx]
                best = sub.argmin(0)
                W[e], W_tok[e] = sub[best, np.arange(E)], idx[best]
        dist = cost[t].copy()
        pred = np.full(E, -1, dtype=np.int64)          # -1: reached directly from token t
        for _ in range(E - 1):
            cand = dist[:, None] + W                                             # (E, E)
            src = cand.argmin(0)
            best = cand[src, np.arange(E)]
            better = best < dist - 1e-12
            if not better.any():
                break
            dist[better], pred[better] = best[better], src[better]
        end = int(np.argmin(np.where(load < caps, dist, np.inf)))
        e = end
        while pred[e] != -1:
            src = int(pred[e])
            assign[W_tok[src, e]] = e
            e = src
        assign[t] = e
        load[end] += 1
    return torch.from_numpy(assign).to(scores_TE.device)


class BaseLayerRouter(Router):
    """``top_k`` is not used (BASE gives each token one expert); an explicit ``top_k`` other than its
    own count is refused."""

    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None, *,
                 group_size: Optional[int] = None):
        check_no_top_k("base", top_k, 1)
        super().__init__(d_model, num_experts, None)
        check_int("group_size", group_size, min=1, allow_none=True)
        # Balance within groups of this many consecutive real tokens (None: the whole batch);
        # the exact solver costs O(S² E) per group of S tokens.
        self.group_size = group_size
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))   # expert embeddings w_e
        init_router_weight(self.weight.data)

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        logits_TE = F.linear(router_float(x_TD), router_float(self.weight))
        T, E = logits_TE.shape
        token_T = torch.arange(T, device=x_TD.device) if mask is None else mask.nonzero()[:, 0]
        if self.training:
            S = max(1, token_T.numel() if self.group_size is None else self.group_size)
            groups = logits_TE[token_T].split(S)
            expert_T = token_T.clone()          # empty when every token is padding
            if groups:
                expert_T = torch.cat([balanced_assignment(g, balanced_capacities(g.shape[0], E)) for g in groups])
        else:
            expert_T = logits_TE[token_T].argmax(-1)
        topk_ids_T1 = logits_TE.detach().argmax(-1, keepdim=True)
        topk_ids_T1[token_T, 0] = expert_T
        weights = torch.sigmoid(logits_TE[token_T, expert_T])
        return Routing(token_ids=token_T, expert_ids=expert_T, weights=weights, logits=logits_TE,
                       dropped=no_drops(x_TD.device), num_experts=E, probs=torch.softmax(logits_TE, -1),
                       topk_ids=topk_ids_T1)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, group_size={self.group_size}"
