"""Compressing an MoE layer: drop the least-used experts, or merge similar ones.

Legend: T tokens, D model dim, E experts before, E' after, K experts per token.

Pruning (task-agnostic expert pruning by routing frequency, e.g. Lu et al. 2024 "Not All
Experts are Equal"; Muzio et al. 2024 "SEER-MoE"): count how often each expert is selected on
calibration data (`expert_usage`), keep the E' most used. The router keeps only the kept
experts' rows, so a token whose top-K never contained a dropped expert is routed exactly as
before and — under ``renorm`` — gets exactly the same output.

Merging (M-SMoE, Li et al. 2024 "Merge, Then Compress"): group similar experts, replace each
group g by one expert whose weights are the usage-weighted mean ``W_g = Σ_{e∈g} u_e W_e / Σ u_e``.
The router is kept whole and wrapped (`GroupedRouter`): expert e's pairs go to its group,
pairs of one token that land in one group are summed, and the group's probability is
``Σ_{e∈g} p_e`` (logit ``logsumexp_{e∈g} h_e``). Merging identical experts is thus exact.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from moekit.layers.grow import slice_expert_rows as _slice_experts
from moekit.layers.moe import MoE
from moekit.routing.base import Router, Routing
from moekit.validate import check_int, check_number

__all__ = ["expert_usage", "prune_experts", "prune_model", "merge_experts", "similar_expert_groups",
           "GroupedRouter"]


@torch.no_grad()
def expert_usage(model: nn.Module, batches: Iterable, forward: Optional[Callable] = None) -> dict[str, torch.Tensor]:
    """(E,) selections per expert, summed over `batches`, for every MoE layer of `model` by name.

    forward(model, batch) runs one batch (default ``model(batch)``). The model is run as it is
    (train or eval mode); the counts are the kept (token, expert) pairs of `last_stats`.
    """
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, MoE)}
    if not names:
        raise ValueError(f"{type(model).__name__} has no moekit MoE layer")
    counts: dict[str, torch.Tensor] = {}

    def hook(mod, args, out):
        if mod.last_stats is not None:
            c = mod.last_stats.tokens_per_expert.detach().cpu()
            key = names[id(mod)]
            counts[key] = counts[key] + c if key in counts else c.clone()

    handles = [m.register_forward_hook(hook) for m in model.modules() if id(m) in names]
    try:
        for batch in batches:
            forward(model, batch) if forward is not None else model(batch)
    finally:
        for h in handles:
            h.remove()
    return counts


def prune_experts(moe: MoE, keep: Sequence[int]) -> MoE:
    """A new MoE layer with only experts `keep` (in that order); top_k becomes min(K, E')."""
    if not isinstance(moe, MoE):
        raise TypeError(f"moe must be a moekit MoE, got {type(moe).__name__}")
    E = moe.num_experts
    keep = [check_int(f"keep[{j}]", i) for j, i in enumerate(keep)]
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < E for i in keep):
        raise ValueError(f"keep must be distinct expert indices in [0, {E}), got {keep}")
    if getattr(moe.router, "num_groups", 1) > 1:
        raise ValueError("pruning a group-limited router would unbalance its expert groups; "
                         f"{type(moe.router).__name__} has num_groups={moe.router.num_groups}")
    if not hasattr(moe.router, "weight"):
        raise ValueError(f"cannot prune {type(moe.router).__name__}: it has no per-expert weight")
    idx = torch.tensor(keep)
    router = _slice_experts(moe.router, E, idx)
    router.num_experts = len(keep)
    if router.top_k is not None:
        router.top_k = min(router.top_k, len(keep))
    experts = _slice_experts(moe.experts, E, idx)
    experts.num_experts = len(keep)
    out = copy.copy(moe)            # shallow: then give it its own module dicts
    out._modules = dict(moe._modules)
    out._parameters, out._buffers = dict(moe._parameters), dict(moe._buffers)
    out._forward_hooks = type(moe._forward_hooks)()
    out.router, out.experts = router, experts
    out.num_experts, out.top_k = len(keep), router.top_k or moe.top_k
    if hasattr(out, "hf_origin"):
        # A pruned layer no longer fits its transformers config; saving it must fail loudly.
        del out.hf_origin
    out.last_stats, out.last_routing = None, None
    return out


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, m in model.named_modules():
        for cname, child in m.named_children():
            if child is old:
                setattr(m, cname, new)
                return
    raise ValueError("layer not found in model")


def prune_model(model: nn.Module, usage: dict[str, torch.Tensor], keep: Union[int, float]) -> dict[str, list[int]]:
    """Keep, in every MoE layer named in `usage`, its `keep` most-used experts (an int, or a
    fraction of E), in place. Ties keep the lower index. Returns the kept indices per layer."""
    kept = {}
    for name, counts in usage.items():
        moe = model.get_submodule(name)
        E = moe.num_experts
        n = check_int("keep", keep) if isinstance(keep, int) and not isinstance(keep, bool) \
            else int(round(check_number("keep", keep, min=0, max=1) * E))
        if not 1 <= n <= E:
            raise ValueError(f"keep must give between 1 and {E} experts, got {keep!r} -> {n}")
        order = sorted(range(E), key=lambda e: (-int(counts[e]), e))
        kept[name] = sorted(order[:n])
        _replace(model, moe, prune_experts(moe, kept[name]))
    return kept


# -- merging ---------------------------------------------------------------------------------

class GroupedRouter(Router):
    """Wraps a router over E experts so that expert e routes to group ``groups_E[e]`` of E'.

    Pairs of one token that fall in one group are summed into one pair; the group's
    probability is the sum of its members' and its logit their logsumexp.
    """

    def __init__(self, inner: Router, groups_E: torch.Tensor):
        E2 = int(groups_E.max()) + 1
        super().__init__(inner.d_model, E2, None)
        self.inner = inner
        self.top_k = inner.top_k
        self.default_balance_loss = inner.default_balance_loss
        self.register_buffer("groups_E", groups_E.long().clone())

    def forward(self, x_TD, *, mask=None, **router_inputs) -> Routing:
        r = self.inner(x_TD, mask=mask, **router_inputs)
        E2, g = self.num_experts, self.groups_E.to(r.expert_ids.device)
        gid = g[r.expert_ids]
        key = r.token_ids * E2 + gid
        uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
        weights = torch.zeros(uniq.numel(), dtype=r.weights.dtype, device=r.weights.device).index_add(0, inv, r.weights)
        T = x_TD.shape[0]

        def group(t_TE, how):
            if t_TE is None:
                return None
            idx = g.to(t_TE.device).expand(T, -1)
            if how == "sum":
                return torch.zeros(T, E2, dtype=t_TE.dtype, device=t_TE.device).scatter_add(1, idx, t_TE)
            m = torch.full((T, E2), float("-inf"), dtype=t_TE.dtype, device=t_TE.device).scatter_reduce(
                1, idx, t_TE, "amax")
            return m + torch.zeros_like(m).scatter_add(1, idx, torch.exp(t_TE - m.gather(1, idx))).log()

        return Routing(token_ids=uniq // E2, expert_ids=uniq % E2, weights=weights, logits=group(r.logits, "lse"),
                       dropped=r.dropped, num_experts=E2, probs=group(r.probs, "sum"),
                       topk_ids=None if r.topk_ids is None else g.to(r.topk_ids.device)[r.topk_ids],
                       aux_losses=r.aux_losses, extras={})


@torch.no_grad()
def similar_expert_groups(moe: MoE, num_groups: int) -> list[list[int]]:
    """Agglomerative grouping of experts by cosine similarity of their flattened weights
    (average linkage) into `num_groups` groups."""
    E = moe.num_experts
    check_int("num_groups", num_groups)
    if not 1 <= num_groups <= E:
        raise ValueError(f"num_groups must be in [1, {E}], got {num_groups}")
    flat = torch.cat([p.detach().reshape(E, -1).float() for p in moe.experts.parameters() if p.shape[0] == E], 1)
    flat = nn.functional.normalize(flat, dim=1)
    sim = flat @ flat.T
    groups = [[e] for e in range(E)]
    while len(groups) > num_groups:
        best, pair = -float("inf"), None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                s = sim[groups[a]][:, groups[b]].mean().item()
                if s > best:
                    best, pair = s, (a, b)
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups)


@torch.no_grad()
def merge_experts(moe: MoE, groups: Sequence[Sequence[int]], usage: Optional[torch.Tensor] = None) -> MoE:
    """A new MoE layer with one expert per group: the usage-weighted mean of its members
    (uniform weights without `usage`, or for a group nobody used)."""
    E = moe.num_experts
    members = sorted(e for grp in groups for e in grp)
    if members != list(range(E)):
        raise ValueError(f"groups must partition range({E}), got {groups}")
    u = torch.ones(E) if usage is None else usage.detach().float().cpu()
    groups_E = torch.empty(E, dtype=torch.long)
    for gi, grp in enumerate(groups):
        groups_E[list(grp)] = gi
    first = torch.tensor([grp[0] for grp in groups])
    experts = _slice_experts(moe.experts, E, first)
    for (name, p_new), p_old in zip(experts.named_parameters(), moe.experts.parameters()):
        if p_old.shape[0] != E:
            continue
        for gi, grp in enumerate(groups):
            w = u[list(grp)]
            w = torch.ones_like(w) if w.sum() == 0 else w
            w = (w / w.sum()).to(p_old.device)
            shape = (-1,) + (1,) * (p_old.dim() - 1)
            p_new[gi] = (p_old[list(grp)].float() * w.view(shape)).sum(0).to(p_new.dtype)
    experts.num_experts = len(groups)
    out = copy.copy(moe)
    out._modules = dict(moe._modules)
    out._parameters, out._buffers = dict(moe._parameters), dict(moe._buffers)
    out._forward_hooks = type(moe._forward_hooks)()
    out.router = GroupedRouter(moe.router, groups_E)
    out.experts = experts
    out.num_experts = len(groups)
    if hasattr(out, "hf_origin"):
        del out.hf_origin
    out.last_stats, out.last_routing = None, None
    return out
