"""Differentiable collectives over `torch.distributed` and process-group helpers.

Legend: N rows, D model dim, W ranks in the group.

`all_to_all_single` sends ``input_splits[r]`` consecutive rows to rank r and receives
``output_splits[s]`` rows from rank s, in source-rank order. Its backward is the reverse
exchange (the splits swapped): the adjoint of a permutation of rows across ranks.
`all_reduce_sum` sums a tensor over the group; its backward sums the incoming gradients over
the group, the adjoint when every rank's loss uses the reduced value.
`all_to_all_single_reference` is the plain reference (all-gather everything, keep what is
addressed to this rank) with the same signature, used by the tests.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["all_to_all_single", "all_to_all_single_reference", "all_reduce_sum", "resolve_group",
           "group_size", "group_rank"]


def resolve_group(group=None):
    """A ProcessGroup from None (the world), a ProcessGroup or a 1-D DeviceMesh."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call moekit.parallel.init_from_env() "
                           "(or torch.distributed.init_process_group) first")
    if group is None:
        return dist.group.WORLD
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:                                        # pragma: no cover - very old torch
        DeviceMesh = ()
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"expected a 1-D DeviceMesh (pick one dimension, e.g. mesh['ep']), "
                             f"got a {group.ndim}-D mesh with dims {group.mesh_dim_names}")
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"group must be None, a ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}")


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


def _check_splits(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group) -> None:
    W = dist.get_world_size(group)
    if len(output_splits) != W or len(input_splits) != W:
        raise ValueError(f"splits must have one entry per rank ({W}), got output_splits="
                         f"{list(output_splits)}, input_splits={list(input_splits)}")
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"input_splits sum to {sum(input_splits)} but x has {x.shape[0]} rows")


def _exchange(x_ND: torch.Tensor, output_splits, input_splits, group) -> torch.Tensor:
    x_ND = x_ND.contiguous()
    out = x_ND.new_empty((sum(output_splits),) + tuple(x_ND.shape[1:]))
    dist.all_to_all_single(out, x_ND, output_split_sizes=list(output_splits),
                           input_split_sizes=list(input_splits), group=group)
    return out


class _AllToAllSingle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _exchange(x_ND, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, g_ND):
        # Rows went input→output; their gradients travel the same routes backwards.
        return _exchange(g_ND, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all_single(x_ND: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                      group=None) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows (``torch.distributed.all_to_all_single``).

    x_ND: (N, ...) rows, the first ``input_splits[0]`` for rank 0, the next for rank 1, ….
    Returns (sum(output_splits), ...) rows, those from rank 0 first.
    """
    group = resolve_group(group)
    output_splits, input_splits = [int(s) for s in output_splits], [int(s) for s in input_splits]
    _check_splits(x_ND, output_splits, input_splits, group)
    return _AllToAllSingle.apply(x_ND, output_splits, input_splits, group)


def all_to_all_single_reference(x_ND: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                                group=None) -> torch.Tensor:
    """Same function as `all_to_all_single` built from an all-gather (no autograd; for tests)."""
    group = resolve_group(group)
    _check_splits(x_ND, output_splits, input_splits, group)
    W, me = dist.get_world_size(group), dist.get_rank(group)
    gathered: list = [None] * W
    dist.all_gather_object(gathered, (x_ND.detach().cpu(), [int(s) for s in input_splits]), group=group)
    pieces = []
    for x_s, splits_s in gathered:
        start = sum(splits_s[:me])
        pieces.append(x_s[start:start + splits_s[me]])
    out = torch.cat(pieces, 0).to(x_ND.device)
    if out.shape[0] != sum(output_splits):
        raise ValueError(f"output_splits sum to {sum(output_splits)} but {out.shape[0]} rows arrived")
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group=None, *, differentiable: Optional[bool] = None) -> torch.Tensor:
    """Sum of `x` over the group (a new tensor). Differentiable when `x` requires grad."""
    group = resolve_group(group)
    if differentiable is None:
        differentiable = x.requires_grad and torch.is_grad_enabled()
    if differentiable:
        return _AllReduceSum.apply(x, group)
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
