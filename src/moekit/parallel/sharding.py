"""Shard every MoE layer's experts over a process group: `apply_expert_parallel` (DESIGN.md).

Legend: E experts (global), L = E / W experts per rank, W ranks in the expert-parallel group.

Rank r keeps rows ``[r·L, (r+1)·L)`` of every stacked (E, ...) expert parameter as new,
smaller Parameters, and the layer's dispatcher becomes an `ExpertParallelDispatcher`. The
router, shared experts and every non-expert parameter stay whole (replicated); their
gradients must be averaged over the ranks (`moekit.parallel.grad_sync`). Model code stays
single-device: parallelism is applied from outside.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from moekit.experts import ExpertBank
from moekit.layers.protocol import MoELayer
from moekit.ops.dispatch import LocalDispatcher
from moekit.parallel.balance import BALANCE_SCOPES, GlobalBatchSum
from moekit.parallel.comm import all_reduce_sum, resolve_group
from moekit.parallel.dispatcher import ExpertParallelDispatcher

__all__ = ["apply_expert_parallel", "ExpertShard", "expert_shard_of", "is_expert_param", "shard_expert_bank"]


@dataclass(frozen=True)
class ExpertShard:
    """Which slice of a stacked (E, ...) expert tensor this rank holds."""

    num_experts: int            # E, global
    rank: int                   # r in the expert-parallel group
    world_size: int             # W
    group: object               # the expert-parallel ProcessGroup

    @property
    def num_local(self) -> int:
        return self.num_experts // self.world_size

    @property
    def offset(self) -> int:
        return self.rank * self.num_local


# Every sharded tensor alive, so checkpoints recognise expert shards in plain state dicts.
_SHARDED: "weakref.WeakSet" = weakref.WeakSet()


def sharded_tensors():
    """The expert shards (parameters and buffers) of every expert-parallel model alive."""
    return list(_SHARDED)


def is_dtensor(t) -> bool:
    """Whether `t` is a DTensor (e.g. a parameter or gradient that FSDP2 shards)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:                                  # older torch: no FSDP2 either
        return False
    return isinstance(t, DTensor)


def expert_shard_of(t) -> Optional[ExpertShard]:
    """The `ExpertShard` tag of a sharded expert parameter or buffer, else None."""
    return getattr(t, "_moekit_expert_shard", None)


def is_expert_param(p: torch.Tensor) -> bool:
    return expert_shard_of(p) is not None


def _owner(root: nn.Module, name: str):
    *path, leaf = name.split(".")
    mod = root
    for part in path:
        mod = getattr(mod, part)
    return mod, leaf


def shard_expert_bank(bank: ExpertBank, shard: ExpertShard) -> None:
    """Replace every stacked (E, ...) parameter and buffer of `bank` by rows ``[r·L, (r+1)·L)``."""
    E, lo, hi = shard.num_experts, shard.offset, shard.offset + shard.num_local
    tensors = list(bank.named_parameters()) + list(bank.named_buffers())
    bad = [(n, tuple(t.shape)) for n, t in tensors if t.dim() == 0 or t.shape[0] != E]
    if bad:
        raise ValueError(f"cannot shard {type(bank).__name__}: every parameter and buffer must be stacked "
                         f"with leading dim num_experts={E}, but {bad} are not")
    for name, p in list(bank.named_parameters()):
        owner, leaf = _owner(bank, name)
        new = nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)
        new._moekit_expert_shard = shard
        _SHARDED.add(new)
        setattr(owner, leaf, new)
    for name, b in list(bank.named_buffers()):
        owner, leaf = _owner(bank, name)
        persistent = leaf not in owner._non_persistent_buffers_set
        new = b.detach()[lo:hi].clone()
        owner.register_buffer(leaf, new, persistent=persistent)
        new._moekit_expert_shard = shard
        _SHARDED.add(new)
    bank.num_experts = shard.num_local
    bank.expert_shard = shard


def _global_router_load_hook(group):
    # Aux-loss-free bias balancing (sigmoid router): the bias update must see the load of the
    # global batch, else ranks' biases drift apart. Add the other ranks' counts to load_accum.
    def hook(router, args, routing):
        if router.training and hasattr(router, "load_accum"):
            local = routing.tokens_per_expert().to(router.load_accum.dtype)
            router.load_accum += all_reduce_sum(local, group, differentiable=False) - local
    return hook


def apply_expert_parallel(model: nn.Module, group=None, *, balance_scope: str = "global",
                          balance_group=None) -> List[str]:
    """Shard every MoE layer's experts over `group` (default: the world); returns their names.

    Args:
        model: any module holding `moekit.MoE` layers; every rank must hold the same weights
            (same seed, or `moekit.parallel.broadcast_model` first).
        group: ProcessGroup, 1-D DeviceMesh (e.g. ``mesh["ep"]``) or None for the world. Each
            layer's ``num_experts`` must divide by its size.
        balance_scope: ``"global"``: balancing losses, the sigmoid router's load counts and
            ``last_stats`` cover the batch of every rank in `balance_group` (N ranks give the
            loss one process gives on the concatenated batch); ``"local"``: each rank's own.
        balance_group: ranks whose batches form the global batch (default: the world).

    Capacity stays per routing group: each rank routes its own tokens.
    """
    if balance_scope not in BALANCE_SCOPES:
        raise ValueError(f"balance_scope must be one of {BALANCE_SCOPES}, got {balance_scope!r}")
    pg = resolve_group(group)
    bal_pg = resolve_group(balance_group)
    W, r = dist.get_world_size(pg), dist.get_rank(pg)
    targets = []
    for name, layer in model.named_modules():
        if not isinstance(layer, MoELayer):
            continue
        dispatcher, bank = getattr(layer, "dispatcher", None), getattr(layer, "experts", None)
        if isinstance(dispatcher, ExpertParallelDispatcher) or getattr(bank, "expert_shard", None) is not None:
            raise ValueError(f"MoE layer {name!r} is already expert-parallel")
        if type(dispatcher) is not LocalDispatcher or not isinstance(bank, ExpertBank):
            warnings.warn(f"{type(layer).__name__} {name!r} has no LocalDispatcher + ExpertBank; its experts "
                          f"stay replicated (data parallel)", stacklevel=2)
            continue
        E = layer.num_experts
        if E % W:
            raise ValueError(f"MoE layer {name!r} has num_experts={E}, which does not divide by the "
                             f"expert-parallel group size {W}")
        if balance_scope == "global" and not hasattr(layer, "stats_reducer"):
            raise ValueError(f"{type(layer).__name__} {name!r} has no stats_reducer, so its balancing losses "
                             f"cannot cover the global batch; use balance_scope='local'")
        targets.append((name, layer))
    # All checks done before any change: a failure leaves the model untouched.
    for name, layer in targets:
        shard = ExpertShard(num_experts=layer.num_experts, rank=r, world_size=W, group=pg)
        shard_expert_bank(layer.experts, shard)
        layer.dispatcher = ExpertParallelDispatcher(pg, layer.num_experts)
        if balance_scope == "global":
            layer.stats_reducer = GlobalBatchSum(bal_pg)
            if hasattr(layer.router, "load_accum"):
                layer.router.register_forward_hook(_global_router_load_hook(bal_pg))
        layer.balance_scope = balance_scope
    return [name for name, _ in targets]
