"""DynMoE's expert pool adaptation (Guo et al. 2024) — METHODS.md G16.

Legend: D model dim, E experts.

`dynmoe_adapt` is called every so many training steps on a `moekit.MoE` whose router is
`moekit.routing.DynMoERouter`. From what the router recorded since the last call:

- **grow**: when more than ``grow_fraction`` of the training tokens fired no expert (they fell
  back to their best one), one expert is appended; its router row is the mean direction of
  those tokens' inputs (so they would fire it), its threshold logit 0, its weights freshly
  initialised — at most ``max_experts``;
- **prune**: experts that took no pair at all are removed (keeping at least ``min_experts``).

Parameters are replaced: build the optimizer again after a call that changed the pool.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moekit.layers.grow import slice_expert_rows
from moekit.layers.moe import MoE
from moekit.routing.dynmoe import DynMoERouter
from moekit.validate import check_int, check_probability

__all__ = ["dynmoe_adapt"]


def _resize(moe: MoE, index: torch.Tensor, new_router_rows: Optional[torch.Tensor] = None) -> None:
    """Keep experts `index` (in order), then append fresh experts with `new_router_rows` (n, D)."""
    E = moe.num_experts
    router, experts = moe.router, moe.experts
    keep_router = slice_expert_rows(router, E, index)
    keep_experts = slice_expert_rows(experts, E, index)
    E2 = index.numel()
    n = 0 if new_router_rows is None else new_router_rows.shape[0]
    if n:
        fresh = slice_expert_rows(experts, E, torch.zeros(n, dtype=torch.long))
        fresh.reset_parameters()
        for (m, k, p), (_, _, q) in zip(_rows(keep_experts, E2), _rows(fresh, n)):
            m._parameters[k] = nn.Parameter(torch.cat([p.detach(), q.detach().to(p)]), requires_grad=p.requires_grad)
        keep_router.weight = nn.Parameter(torch.cat([keep_router.weight.detach(),
                                                     new_router_rows.to(keep_router.weight)]))
        keep_router.threshold_logit = nn.Parameter(torch.cat([keep_router.threshold_logit.detach(),
                                                              keep_router.threshold_logit.new_zeros(n)]))
        keep_router.routed_count = torch.zeros(E2 + n, device=keep_router.routed_count.device)
    keep_router.num_experts = keep_experts.num_experts = E2 + n
    keep_router.reset_records()
    moe.router, moe.experts = keep_router, keep_experts
    moe.num_experts = E2 + n
    moe.last_stats, moe.last_routing = None, None


def _rows(bank: nn.Module, E: int):
    return [(m, k, p) for m in bank.modules() for k, p in m._parameters.items()
            if p is not None and p.dim() >= 1 and p.shape[0] == E]


@torch.no_grad()
def dynmoe_adapt(moe: MoE, *, grow_fraction: float = 0.05, max_experts: Optional[int] = None,
                 min_experts: int = 1) -> dict:
    """Grow and prune the expert pool of a DynMoE layer; returns ``{"added": [ids], "removed":
    [old ids], "num_experts": E'}`` (ids of added experts are in the new numbering)."""
    if not isinstance(moe, MoE) or not isinstance(moe.router, DynMoERouter):
        raise TypeError(f"dynmoe_adapt needs a moekit MoE with router='dynmoe', got "
                        f"{type(moe).__name__} with {type(getattr(moe, 'router', None)).__name__}")
    check_probability("grow_fraction", grow_fraction)
    check_int("min_experts", min_experts, min=1)
    check_int("max_experts", max_experts, min=min_experts, allow_none=True)
    r = moe.router
    E = moe.num_experts
    seen = float(r.seen_tokens)
    if seen == 0:
        return {"added": [], "removed": [], "num_experts": E}
    unused = [e for e in range(E) if float(r.routed_count[e]) == 0]
    removable = unused[:max(0, E - min_experts)]
    keep = torch.tensor([e for e in range(E) if e not in removable], dtype=torch.long)
    grow = float(r.unrouted_count) / seen > grow_fraction and (max_experts is None or keep.numel() < max_experts)
    rows = None
    if grow:
        direction = r.unrouted_sum / r.unrouted_sum.norm().clamp_min(1e-12)
        rows = (direction * r.weight.norm(dim=-1).mean()).unsqueeze(0)
    if not removable and rows is None:
        r.reset_records()
        return {"added": [], "removed": [], "num_experts": E}
    _resize(moe, keep, rows)
    added = [keep.numel()] if rows is not None else []
    return {"added": added, "removed": removable, "num_experts": moe.num_experts}
