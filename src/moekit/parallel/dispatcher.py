"""Expert-parallel dispatch: the local dispatcher plus two all-to-alls (GShard; Switch) — METHODS.md S1.

Legend: T tokens, D model dim, E experts (global), L = E / W experts per rank, W ranks,
N rows this rank sends, M rows this rank receives.

Experts are sharded in contiguous blocks: rank r owns global experts ``[r·L, (r+1)·L)``.
`LocalDispatcher.dispatch` already sorts rows by global expert, so rows are grouped by
destination rank as well. This subclass only adds communication:

1. exchange per-expert counts (an all-to-all of L ints per rank pair), which gives the
   uneven splits of
2. the rows' all-to-all there (autograd: the reverse all-to-all),
3. a local regroup: rows arrive source-major, the expert bank wants them expert-major,
4. after the experts, the inverse regroup and the all-to-all back, then the local combine.

Routing, capacity and the combine weights never cross ranks: each rank routes its own
tokens, so capacity is per routing group (the rank's micro-batch), as in GShard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist

from moekit.ops.dispatch import DispatchMeta, LocalDispatcher
from moekit.parallel.comm import all_to_all_single, resolve_group
from moekit.validate import check_int

__all__ = ["ExpertParallelDispatcher", "ExpertParallelMeta"]


@dataclass(frozen=True)
class ExpertParallelMeta:
    local: DispatchMeta             # the local dispatcher's meta (rows in global-expert order)
    order_M: torch.Tensor           # received row i of the expert-major layout is arrival row order_M[i]
    send_splits: List[int]          # rows sent to each rank
    recv_splits: List[int]          # rows received from each rank


class ExpertParallelDispatcher(LocalDispatcher):
    """`LocalDispatcher` with the rows of each expert moved to the rank that owns it.

    Args:
        group: process group (or 1-D DeviceMesh) of W ranks sharing the experts.
        num_experts: E, the global number of experts; must divide by W.
    """

    def __init__(self, group, num_experts: int):
        self.group = resolve_group(group)
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        check_int("num_experts", num_experts, min=1)
        if num_experts % self.world_size:
            raise ValueError(f"num_experts must be a positive multiple of the expert-parallel group size "
                             f"{self.world_size}, got num_experts={num_experts!r}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world_size

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """(W, L): entry [s, j] = rows rank s sends to this rank's local expert j."""
        recv = torch.empty_like(counts_E)
        dist.all_to_all_single(recv, counts_E.contiguous(), group=self.group)
        return recv.view(self.world_size, self.num_local_experts)

    def dispatch(self, x_TD: torch.Tensor, routing):
        if routing.num_experts != self.num_experts:
            raise ValueError(f"routing has num_experts={routing.num_experts}, the dispatcher was built "
                             f"for {self.num_experts}")
        W, L = self.world_size, self.num_local_experts
        # The all-to-all needs its splits on the host anyway: list the kept pairs only.
        routing = routing.compact()
        x_ND, counts_E, local_meta = super().dispatch(x_TD, routing)
        recv_WL = self.exchange_counts(counts_E)
        # One host sync for both split lists (the all-to-all needs them on the host).
        splits = torch.cat([counts_E.view(W, L).sum(1), recv_WL.sum(1)]).tolist()
        send_splits, recv_splits = splits[:W], splits[W:]
        x_MD = all_to_all_single(x_ND, recv_splits, send_splits, self.group)    # source-major
        # Arrival row → local expert: blocks (s, j) of recv_WL[s, j] rows in (s, j) order.
        local_expert_M = torch.arange(L, device=x_TD.device).repeat(W).repeat_interleave(recv_WL.reshape(-1))
        order_M = torch.argsort(local_expert_M, stable=True)                    # expert-major, source order kept
        meta = ExpertParallelMeta(local=local_meta, order_M=order_M, send_splits=send_splits,
                                  recv_splits=recv_splits)
        return x_MD.index_select(0, order_M), recv_WL.sum(0), meta

    def combine(self, y_MD: torch.Tensor, meta: ExpertParallelMeta, out_dtype=None) -> torch.Tensor:
        inverse_M = torch.empty_like(meta.order_M)
        inverse_M[meta.order_M] = torch.arange(meta.order_M.numel(), device=meta.order_M.device)
        y_arrival_MD = y_MD.index_select(0, inverse_M)
        y_ND = all_to_all_single(y_arrival_MD, meta.send_splits, meta.recv_splits, self.group)
        return super().combine(y_ND, meta.local, out_dtype)

    def __repr__(self) -> str:
        return (f"ExpertParallelDispatcher(rank={self.rank}, world_size={self.world_size}, "
                f"num_experts={self.num_experts}, local_experts=[{self.rank * self.num_local_experts}, "
                f"{(self.rank + 1) * self.num_local_experts}))")
