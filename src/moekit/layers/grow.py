"""Growing an MoE layer's expert bank at run time, and freezing single experts.

Legend: T tokens, D model dim, E experts before growth, n experts added, K experts per token.

The library hooks continual learning needs (METHODS.md §7 (i), (ii)): `add_experts` appends n
fresh experts and n router rows to a `moekit.MoE` in place, keeping the old experts' weights and
router rows as they were (Lifelong-MoE, Chen et al. 2023, "Lifelong Language Pretraining with
Distribution-Specialized Experts", ICML: "expand the experts and the gating dimensions");
`freeze_experts` stops single experts (and their router rows) from learning, although the bank
stores all experts in one stacked tensor per weight.

Invariant of `add_experts` (tested): a token whose top-K old experts still outrank every new
expert is routed exactly as before, and under ``norm="renorm"`` its output is unchanged — the
renormalised weights ``p_e / Σ_{top-K} p`` do not depend on the other experts' probabilities.
New router rows whose logits never win (a bias of ``-1e4``, or a task router's mask) make this
hold for every token.
"""
from __future__ import annotations

import copy
import weakref
from typing import Iterable, Optional

import torch
from torch import nn

from moekit.layers.moe import MoE
from moekit.routing.dense import DenseRouter
from moekit.routing.task import TaskRouter
from moekit.routing.topk import TopKRouter
from moekit.validate import check_int, check_number

__all__ = ["add_experts", "freeze_experts", "slice_expert_rows"]

# Router tensors with one row per expert; the allowed routers keep no other per-expert state.
_ROUTER_ROWS = ("weight", "bias")


def slice_expert_rows(module: nn.Module, E: int, index: torch.Tensor) -> nn.Module:
    """A copy of `module` whose per-expert tensors (leading dim E) keep only rows `index`.

    Shared by growing (fresh experts of the bank's kind) and `moekit.recipes.prune_experts`.
    """
    out = copy.deepcopy(module)
    for mod in out.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in list(store.items()):
                if t is not None and t.dim() >= 1 and t.shape[0] == E:
                    new = t.detach()[index.to(t.device)].clone()
                    store[k] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return out


def _check_growable(moe: MoE) -> None:
    if not isinstance(moe, MoE):
        raise TypeError(f"moe must be a moekit MoE, got {type(moe).__name__}")
    r = moe.router
    if not isinstance(r, (TopKRouter, TaskRouter)) or isinstance(r, DenseRouter):
        raise ValueError(f"growing needs a router whose only per-expert state is a (E, ·) weight and an optional "
                         f"(E,) bias (top-k / switch / gshard / task routers); got {type(r).__name__}")


def _bank_rows(bank: nn.Module, E: int) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, name, parameter) of every bank parameter with one row per expert (leading dim E)."""
    return [(m, k, p) for m in bank.modules() for k, p in m._parameters.items()
            if p is not None and p.dim() >= 1 and p.shape[0] == E]


def _per_expert_tensors(moe: MoE) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """The bank's per-expert parameters, then the router's rows."""
    rows = [(moe.router, k, getattr(moe.router, k)) for k in _ROUTER_ROWS if getattr(moe.router, k, None) is not None]
    return _bank_rows(moe.experts, moe.num_experts) + rows


@torch.no_grad()
def add_experts(moe: MoE, n: int, *, router_rows: Optional[torch.Tensor] = None, router_bias: float = 0.0) -> list[int]:
    """Append `n` freshly initialised experts to `moe` in place; return their ids ``[E, E + n)``.

    router_rows: (n, R) initial router rows of the new experts (R = the router weight's width);
        default zeros (logit 0, or the task-embedding dot product 0 for a task router).
    router_bias: the new entries of the router's bias, when it has one (``-1e4``: never chosen
        until trained — exp(-1e4) is 0 in float32, so even the softmax over E + n is unchanged).

    Parameters are replaced by larger ones: build the optimizer after growing. Experts frozen
    with `freeze_experts` stay frozen.
    """
    _check_growable(moe)
    check_int("n", n, min=1)
    check_number("router_bias", router_bias)
    E, router = moe.num_experts, moe.router
    R = router.weight.shape[1]
    if router_rows is None:
        router_rows = router.weight.new_zeros(n, R)
    if not isinstance(router_rows, torch.Tensor) or tuple(router_rows.shape) != (n, R):
        got = tuple(router_rows.shape) if isinstance(router_rows, torch.Tensor) else type(router_rows).__name__
        raise ValueError(f"router_rows must be a tensor of shape ({n}, {R}), got {got}")
    # Fresh experts: a bank of the same kind, sliced to n rows, then re-initialised as new.
    fresh = slice_expert_rows(moe.experts, E, torch.zeros(n, dtype=torch.long))
    if not hasattr(fresh, "reset_parameters"):
        raise ValueError(f"{type(moe.experts).__name__} has no reset_parameters() to initialise new experts")
    fresh.reset_parameters()
    new_rows = {id(p): q for (_, _, p), (_, _, q) in zip(_bank_rows(moe.experts, E), _bank_rows(fresh, n))}
    new_rows[id(router.weight)] = router_rows.to(router.weight)
    if getattr(router, "bias", None) is not None:
        new_rows[id(router.bias)] = router.bias.new_full((n,), float(router_bias))
    for module, name, p in _per_expert_tensors(moe):
        grown = torch.cat([p.detach(), new_rows[id(p)].to(p)], dim=0)
        module._parameters[name] = nn.Parameter(grown, requires_grad=p.requires_grad)
    moe.num_experts = router.num_experts = moe.experts.num_experts = E + n
    moe.last_stats, moe.last_routing = None, None
    _install_freeze_hooks(moe)
    return list(range(E, E + n))


class _ZeroFrozenRows:
    """Gradient hook: zero the rows of the experts in ``moe.frozen_experts`` (read at backward time)."""

    def __init__(self, moe: MoE):
        self.moe = weakref.ref(moe)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        moe = self.moe()
        ids = () if moe is None else getattr(moe, "frozen_experts", ())
        if not ids:
            return grad
        return grad.index_fill(0, torch.tensor(ids, device=grad.device), 0)


def _install_freeze_hooks(moe: MoE) -> None:
    if not getattr(moe, "frozen_experts", ()):
        return
    for _, _, p in _per_expert_tensors(moe):
        hooks = p._backward_hooks or {}
        if not any(isinstance(h, _ZeroFrozenRows) for h in hooks.values()):
            p.register_hook(_ZeroFrozenRows(moe))


def freeze_experts(moe: MoE, ids: Iterable[int]) -> tuple[int, ...]:
    """Freeze experts `ids` of `moe` and their router rows; return all frozen ids (sorted).

    Per-expert weights are rows of stacked tensors, so freezing is a gradient hook that zeroes
    those rows: an optimizer whose update is 0 for a zero gradient and zero state (SGD, Adam or
    AdamW with ``weight_decay=0``, built after the call) leaves them bit-identical. Weight decay,
    or momentum carried over from before the freeze, would still move them. Growing keeps the
    freeze; a deep copy keeps ``frozen_experts`` but not the hooks (PyTorch does not copy tensor
    hooks): call ``freeze_experts(copy, ())`` to re-install them. Whole-layer freezing is
    `moekit.routing.freeze_moe_parameters`.
    """
    _check_growable(moe)
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < moe.num_experts]
    if bad:
        raise ValueError(f"expert ids must lie in [0, {moe.num_experts}), got {bad}")
    moe.frozen_experts = tuple(sorted(set(getattr(moe, "frozen_experts", ())) | set(ids)))
    _install_freeze_hooks(moe)
    return moe.frozen_experts
