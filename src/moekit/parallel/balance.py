"""Global-batch balancing: the MoE layer's statistics summed over data-parallel ranks.

Global-batch balancing (Qiu et al. 2025, "Demons in the Detail", Qwen; METHODS.md T1 (f)):
every balancing loss and routing statistic of `moekit.MoE` is formed from sums over tokens
(`moekit.losses.BalanceStats`: Σ_t p_te, selections per expert, valid tokens, Σ lse², …).
The layer applies its ``stats_reducer`` to those sums, packed in one vector, before forming
the losses; `GlobalBatchSum` makes that reducer an all-reduce sum over a process group, so N
ranks compute exactly the losses and statistics one process computes on the concatenated
batch. Counts travel in float64 and exactly; the sums that carry gradient go through a
differentiable all-reduce whose backward sums the gradients over the ranks, so with
gradients averaged over ranks (`moekit.parallel.grad_sync`) the router gradient equals the
single-process one.

Scope is one micro-batch step of all ranks: under gradient accumulation each micro-step's
loss is global over the ranks of that micro-step, exactly like one process running the
same micro-steps on the concatenated micro-batches.
"""
from __future__ import annotations

import torch

from moekit.parallel.comm import all_reduce_sum, resolve_group

__all__ = ["GlobalBatchSum", "BALANCE_SCOPES"]

BALANCE_SCOPES = ("global", "local")


class GlobalBatchSum:
    """A layer's ``stats_reducer``: ``reduce(packed) = Σ_ranks packed`` over `group`.

    Differentiable when `packed` requires grad. Every rank of the group must run the layer's
    forward pass the same number of times (one all-reduce each), as expert parallelism already
    requires. Copies of a model share the group handle (it is not copied).
    """

    def __init__(self, group=None):
        self.group = resolve_group(group)

    def __call__(self, packed: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(packed, self.group)

    def __deepcopy__(self, memo) -> "GlobalBatchSum":
        return self

    def __repr__(self) -> str:
        return f"GlobalBatchSum(group_size={torch.distributed.get_world_size(self.group)})"
