"""Gradient-norm clipping across expert shards: the norm one process would compute.

``torch.nn.utils.clip_grad_norm_`` on one rank sees the replicated gradients and only this
rank's expert shards, so each rank would compute a different norm, scale its replicated
gradients differently, and the replicas would drift apart. Here the expert part of
``‖g‖²`` is summed over the expert-parallel group (replicated parts are identical on every
rank after gradient averaging and counted once), which gives every rank the single-process
norm and the same clipping coefficient.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch
import torch.distributed as dist
from torch import nn

from moekit.parallel.sharding import expert_shard_of, is_dtensor
from moekit.validate import check_number

__all__ = ["clip_grad_norm_", "grad_norm"]



@torch.no_grad()
def grad_norm(parameters: Union[nn.Module, Iterable[torch.Tensor]], norm_type: float = 2.0) -> torch.Tensor:
    """The global gradient norm (float32 scalar) over replicated parameters and expert shards."""
    norm_type = check_number("norm_type", norm_type, min=0, min_open=True, allow_inf=True)
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    grads = [(p.grad, expert_shard_of(p)) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0][0].device
    norm_type = float(norm_type)
    inf = norm_type == float("inf")

    def part(gs):
        if not gs:
            return torch.zeros((), device=device, dtype=torch.float32)
        norms = torch.stack([torch.linalg.vector_norm(g.float(), norm_type) for g in gs])
        return norms.max() if inf else norms.pow(norm_type).sum()

    # FSDP2 parameters (DTensor grads): each rank holds a disjoint shard of the same tensor.
    fsdp = [g for g, s in grads if is_dtensor(g)]
    grads = [(g, s) for g, s in grads if not is_dtensor(g)]
    total = part([g for g, s in grads if s is None])
    fsdp_by_group: dict = {}
    for g in fsdp:
        group = g.device_mesh.get_group()
        fsdp_by_group.setdefault(id(group), (group, []))[1].append(g.to_local())
    for group, gs in fsdp_by_group.values():
        e = part(gs)
        dist.all_reduce(e, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
        total = torch.maximum(total, e) if inf else total + e
    by_group: dict = {}
    for g, s in grads:
        if s is not None:
            by_group.setdefault(id(s.group), (s.group, []))[1].append(g)
    for group, gs in by_group.values():
        e = part(gs)
        dist.all_reduce(e, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
        total = torch.maximum(total, e) if inf else total + e
    return total if inf else total.pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Union[nn.Module, Iterable[torch.Tensor]], max_norm: float,
                    norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for expert-parallel models: same arguments, returns the
    global norm before clipping; every rank applies the same coefficient."""
    max_norm = check_number("max_norm", max_norm, min=0)
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    total = grad_norm(params, norm_type)
    coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if is_dtensor(p.grad) else p.grad      # in place on the shard
            g.mul_(coef.to(g.device, g.dtype))
    return total
