"""Gradient averaging for expert + data parallelism, so N ranks train like one process.

With each rank's loss a mean over its own micro-batch, the single-process loss on the
concatenated batch is the mean of the ranks' losses, so the right gradient of every
parameter is ``(1 / W_total) · Σ_ranks (that rank's gradient)``:

- replicated (non-expert) parameters: all-reduce over every rank, divide by W_total;
- expert shards: the all-to-all backward already summed the contributions of every rank of
  the expert-parallel group into the owner; all-reduce over the ranks holding the same shard
  (the data dimension of a 2-D mesh; nobody on a 1-D expert mesh), divide by W_total.

`GradientSync` does this either in per-parameter autograd hooks (on each backward, before the
gradient is accumulated: linear, so gradient accumulation stays exact) or on demand
(`sync_gradients`, once before ``optimizer.step()``). Hooks need every parameter that
requires grad to get one on every rank each backward (as DDP without
``find_unused_parameters``); use manual mode otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moekit.parallel.comm import resolve_group
from moekit.parallel.sharding import expert_shard_of, is_dtensor
from moekit.validate import check_choice

__all__ = ["GradientSync", "sync_gradients", "broadcast_model", "GRAD_SYNC_MODES"]

GRAD_SYNC_MODES = ("hooks", "manual")


@torch.no_grad()
def broadcast_model(model: nn.Module, group=None, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank of `group` (before sharding)."""
    pg = resolve_group(group)
    src_global = dist.get_global_rank(pg, src) if pg is not dist.group.WORLD else src
    for t in list(model.parameters()) + list(model.buffers()):
        if expert_shard_of(t) is not None:
            raise ValueError("broadcast_model must run before apply_expert_parallel (shards differ by rank)")
        dist.broadcast(t.data, src=src_global, group=pg)



class GradientSync:
    """Averages gradients over `world_group`; expert shards over `expert_data_group` only.

    Args:
        model: a model after `apply_expert_parallel` (or without experts at all).
        world_group: every rank whose batch is part of the global batch (default: world).
        expert_data_group: ranks holding the same expert shard (None: none besides this one).
        mode: ``"hooks"`` (automatic, every backward) or ``"manual"`` (call `sync`).
    """

    def __init__(self, model: nn.Module, *, world_group=None, expert_data_group=None, mode: str = "hooks"):
        check_choice("mode", mode, GRAD_SYNC_MODES)
        self.world_group = resolve_group(world_group)
        self.expert_data_group = None if expert_data_group is None else resolve_group(expert_data_group)
        if self.expert_data_group is not None and dist.get_world_size(self.expert_data_group) == 1:
            self.expert_data_group = None
        self.scale = 1.0 / dist.get_world_size(self.world_group)
        self.mode = mode
        # Parameters managed by FSDP2 (DTensors) are reduce-scattered by FSDP itself.
        self.params = [p for p in model.parameters() if p.requires_grad and not is_dtensor(p)]
        self._handles = []
        self._enabled = True
        if mode == "hooks":
            for p in self.params:
                self._handles.append(p.register_hook(self._make_hook(p)))

    def group_of(self, p: torch.Tensor):
        return self.expert_data_group if expert_shard_of(p) is not None else self.world_group

    def _reduce_(self, g: torch.Tensor, group) -> torch.Tensor:
        if group is not None:
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
        return g.mul_(self.scale)

    def _make_hook(self, p):
        group = self.group_of(p)

        def hook(grad):
            if not self._enabled:
                return grad
            return self._reduce_(grad.clone(), group)
        return hook

    @torch.no_grad()
    def sync(self) -> None:
        """Average the accumulated ``.grad`` of every parameter (manual mode), bucketed by group."""
        if self.mode != "manual":
            raise RuntimeError("gradients are synchronised by hooks on every backward; sync() is for mode='manual'")
        buckets: dict = {}
        for p in self.params:
            if p.grad is None:                       # treated as zeros, so every rank joins
                p.grad = torch.zeros_like(p)
            key = (id(self.group_of(p)), p.grad.dtype, p.grad.device)
            buckets.setdefault(key, (self.group_of(p), []))[1].append(p.grad)
        for group, grads in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._reduce_(flat, group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def disabled(self):
        """Context manager: hooks pass gradients through unchanged (e.g. for a local-only backward)."""
        sync = self

        class _Ctx:
            def __enter__(self):
                sync._enabled = False

            def __exit__(self, *exc):
                sync._enabled = True
        return _Ctx()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def sync_gradients(model: nn.Module, sync: Optional[GradientSync] = None) -> None:
    """Average gradients now: with the model's `GradientSync` from `prepare_model(grad_sync="manual")`,
    or a given one."""
    sync = sync or getattr(model, "_moekit_grad_sync", None)
    if sync is None:
        raise ValueError("model has no GradientSync: call moekit.parallel.prepare_model(model, "
                         "grad_sync='manual') or pass sync=GradientSync(model, mode='manual')")
    sync.sync()
