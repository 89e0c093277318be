"""Branch-Train-MiX: several dense models trained from one seed → one MoE model — METHODS.md T7.

Legend: D model dim, F hidden dim, N branches (= experts).

Sukhbaatar et al. (2024), "Branch-Train-MiX": (1) branch — copy a seed model N times;
(2) train — each copy on its own domain, no synchronisation; (3) MiX — one model whose FFN in
every layer is an MoE with the N branch FFNs as its experts (expert i = branch i's FFN,
bit-exact) and whose every other parameter (attention, embeddings, norms) is the mean over
the branches, ``θ = (1/N) Σ_i θ_i``; a new router per layer is then trained, usually with
everything else, on the mixed data (top-2, Switch balance loss).

Special cases: identical branches reproduce sparse upcycling (and the seed's function);
Branch-Train-Merge's weight-averaged dense model is `average_models`.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from moekit.experts.glu import GLUExperts
from moekit.experts.mlp import MLPExperts
from moekit.layers.moe import MoE
from moekit.recipes.dense_ffn import DenseWeights, find_dense_ffns
from moekit.validate import check_bool, check_int

__all__ = ["btx", "average_models", "moe_from_ffns"]


def _check_same_architecture(models: Sequence[nn.Module]) -> None:
    ref = {k: (tuple(v.shape), v.dtype) for k, v in models[0].state_dict().items()}
    for i, m in enumerate(models[1:], 1):
        got = {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}
        if got != ref:
            diff = sorted(set(ref.items()) ^ set(got.items()))[:4]
            raise ValueError(f"model {i} does not have the architecture of model 0 (first differences: {diff})")


def moe_from_ffns(ffns: Sequence[DenseWeights], top_k: int, *, router: str = "topk",
                  router_kwargs: Optional[dict] = None, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0,
                  capacity_factor: Optional[float] = None, backend: str = "auto") -> MoE:
    """An MoE whose expert i is the dense FFN ``ffns[i]`` (bit-exact copies), with a new router."""
    if len(ffns) < 1:
        raise ValueError("need at least one FFN")
    f0 = ffns[0]
    for i, f in enumerate(ffns[1:], 1):
        if (f.kind, f.activation, f.w_in.shape, f.w_out.shape, f.b_in is None, f.b_out is None) != \
                (f0.kind, f0.activation, f0.w_in.shape, f0.w_out.shape, f0.b_in is None, f0.b_out is None):
            raise ValueError(f"FFN {i} ({f.kind}, {f.activation}, {tuple(f.w_in.shape)}) differs in form from FFN 0 "
                             f"({f0.kind}, {f0.activation}, {tuple(f0.w_in.shape)})")
    N, D, F = len(ffns), f0.d_model, f0.d_hidden
    stack = lambda ts: torch.stack([t for t in ts])       # noqa: E731
    if f0.kind == "glu":
        bank = GLUExperts(N, D, F, activation=f0.activation)
        new = {"gate_up_proj": stack(f.w_in for f in ffns)}
    else:
        has_bias = f0.b_in is not None or f0.b_out is not None
        bank = MLPExperts(N, D, F, activation=f0.activation, bias=has_bias)
        new = {"up_proj": stack(f.w_in for f in ffns)}
        if has_bias:
            new["up_bias"] = stack(f.b_in if f.b_in is not None else f.w_in.new_zeros(F) for f in ffns)
            new["down_bias"] = stack(f.b_out if f.b_out is not None else f.w_in.new_zeros(D) for f in ffns)
    new["down_proj"] = stack(f.w_out for f in ffns)
    bank = bank.to(device=f0.w_out.device, dtype=f0.w_out.dtype)
    with torch.no_grad():
        for k, v in new.items():
            getattr(bank, k).copy_(v)
    return MoE(d_model=D, num_experts=N, top_k=top_k, router=router, experts=bank, router_kwargs=router_kwargs,
               aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, capacity_factor=capacity_factor,
               backend=backend).to(f0.w_out.device)


@torch.no_grad()
def _average_into(target: nn.Module, models: Sequence[nn.Module], skip_prefixes: Sequence[str] = ()) -> list[str]:
    """target's float tensors (outside `skip_prefixes`) ← the mean over `models`. Returns the names averaged."""
    sds = [m.state_dict() for m in models]
    done = []
    for k, t in target.state_dict().items():
        if any(k.startswith(p) for p in skip_prefixes) or not t.is_floating_point():
            continue
        mean = torch.stack([sd[k].to(torch.float64) for sd in sds]).mean(0)
        t.copy_(mean.to(t.dtype))
        done.append(k)
    return done


def average_models(models: Sequence[nn.Module]) -> nn.Module:
    """The parameter-averaged dense model ``(1/N) Σ_i θ_i`` (a new model; integer buffers from model 0)."""
    if len(models) < 1:
        raise ValueError("need at least one model")
    _check_same_architecture(models)
    out = copy.deepcopy(models[0])
    _average_into(out, models)
    return out


def btx(base: nn.Module, experts: Sequence[nn.Module], *, top_k: int = 2, include_base: bool = False,
        layers: Optional[Sequence[int]] = None, router: str = "topk", router_kwargs: Optional[dict] = None,
        aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0, capacity_factor: Optional[float] = None,
        backend: str = "auto", seed: int = 0) -> nn.Module:
    """Branch-Train-MiX merge of `experts` (branches trained from the seed `base`) into one MoE model.

    Args:
        base: the seed model: the architecture of the result (it is not modified).
        experts: the trained branches, same architecture as `base`.
        top_k: experts per token in the merged layers.
        include_base: also make the seed's FFN an expert and include the seed in the average
            (the BTX paper's 4th expert).
        layers: indices of the dense FFNs (module order) to turn into MoE layers; default all.
            FFNs not selected are averaged like every other parameter.
        router, router_kwargs, aux_loss_coef, z_loss_coef, capacity_factor, backend: the new
            MoE layers' settings.
        seed: seeds the new routers.

    Returns a new model: MoE layers with expert i = branch i's FFN, all else averaged.
    """
    branches = ([base] if include_base else []) + list(experts)
    if len(branches) < 2:
        raise ValueError(f"need at least 2 branches to mix, got {len(branches)}")
    check_int("top_k", top_k, min=1)
    check_bool("include_base", include_base)
    check_int("seed", seed)
    if top_k > len(branches):
        raise ValueError(f"top_k must be an int in [1, {len(branches)}] (the number of branches), got {top_k!r}")
    _check_same_architecture([base] + list(experts))
    merged = copy.deepcopy(base)
    sites = find_dense_ffns(merged)
    if not sites:
        raise ValueError(f"found no dense FFN in {type(base).__name__}")
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < len(sites)]
        if bad:
            raise ValueError(f"layers {bad} out of range for {len(sites)} dense FFNs")
        sites = [sites[i] for i in sorted(set(layers))]
    branch_sites = [{s.name: s for s in find_dense_ffns(b)} for b in branches]
    skip = [p for s in sites for p in s.param_prefixes]
    _average_into(merged, branches, skip)

    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for site in sites:
            ffns = [bs[site.name].read() for bs in branch_sites]
            moe = moe_from_ffns(ffns, top_k, router=router, router_kwargs=router_kwargs,
                                aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
                                capacity_factor=capacity_factor, backend=backend)
            moe.train(site.module.training)
            if site.name == "":          # base is itself one FFN
                return moe
            site.put(merged, moe)
    finally:
        torch.random.set_rng_state(rng_state)
    return merged
