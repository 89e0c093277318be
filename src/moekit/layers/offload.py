"""Offload every MoE layer's experts of a model to host memory for inference (METHODS.md S4).

Legend: T tokens, D model dim, E experts, S cache slots per layer.

``offload_experts(model, cache_size=S)`` swaps each `MoE` layer's MLP / GLU bank for an
`moekit.experts.OffloadedExperts`: the weights stay in (pinned) host memory and each layer
holds S experts on the compute device in an LRU cache. Outputs equal the same model's with
``backend="eager"`` (the same matmuls on the same rows) up to float rounding of the activation,
and any other backend's within rounding.

``prefetch=True`` adds speculative loading (Eliseev & Mazur 2023; the idea of Pre-gated MoE,
Hwang et al. 2024, without its trained pre-gate): before layer l runs, the router of the next
MoE layer is applied to layer l's input, and the experts it picks are copied into the next
layer's cache while layer l computes — after layer l's own copies, so they never wait behind
the guess. Residual streams change slowly from layer to layer, so the guess is often right;
`offload_stats` reports how often (``prefetch_precision``) and the hit rates.
"""
from __future__ import annotations

import functools
import inspect
from typing import Dict, Optional

import torch
from torch import nn

from moekit.experts.base import StackedFFNExperts
from moekit.experts.offload import CacheStats, OffloadedExperts, check_offloadable
from moekit.layers.moe import MoE
from moekit.ops.dispatch import LocalDispatcher
from moekit.routing.base import TokenChoiceRouter
from moekit.validate import check_bool

__all__ = ["offload_experts", "restore_experts", "offload_stats", "OffloadedExperts", "CacheStats"]


def _moe_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def offload_experts(model: nn.Module, *, cache_size: int, device=None, prefetch: bool = False,
                    pin_memory: Optional[bool] = None) -> nn.Module:
    """Keep every MoE layer's experts on the host with `cache_size` of them cached on `device`.

    Args:
        model: any module containing `moekit.MoE` layers with MLP / GLU expert banks. For a
            model whose experts do not fit on the device: build or load it on the host, cast
            it, offload with ``device=``, then move the rest with ``model.to(device)`` (which
            leaves offloaded experts where they are).
        cache_size: S, experts cached per layer (1 ≤ S ≤ E of every layer).
        device: where experts compute (default: the device of each layer's router).
        prefetch: start copying the experts the next MoE layer's router picks on the current
            layer's input (in eval mode; needs token-choice routers that route from the hidden
            state alone, equal d_model and the same device; other layers are not prefetched into).
        pin_memory: pin host weights (default: when computing on CUDA).

    Returns `model`, changed in place; nothing changes when an argument is refused: sync-free
    and expert-parallel layers (ValueError), other expert banks (TypeError).
    """
    check_bool("prefetch", prefetch)
    if pin_memory is not None:
        check_bool("pin_memory", pin_memory)
    layers = _moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no moekit.MoE layer to offload")
    for name, layer in layers:                       # every check before any change
        if isinstance(layer.experts, OffloadedExperts):
            raise ValueError(f"MoE layer {name!r} is already offloaded")
        if not isinstance(layer.experts, StackedFFNExperts):
            raise TypeError(f"MoE layer {name!r} has a {type(layer.experts).__name__} bank; offloading takes "
                            f"MLP / GLU banks (StackedFFNExperts)")
        if layer.sync_free:
            raise ValueError(f"MoE layer {name!r} is sync_free; offloaded experts read counts on the host")
        if type(layer.dispatcher) is not LocalDispatcher:
            raise ValueError(f"MoE layer {name!r} is expert-parallel; offload a single-process model")
        try:
            check_offloadable(layer.experts, cache_size)
        except ValueError as err:
            raise ValueError(f"MoE layer {name!r}: {err}") from None
    for name, layer in layers:
        dev = device if device is not None else next(layer.router.parameters(), layer.experts.projections()[0]).device
        layer.experts = OffloadedExperts(layer.experts, device=dev, cache_size=cache_size, pin_memory=pin_memory)
    if prefetch:
        for (_, layer), (_, nxt) in zip(layers, layers[1:]):
            if (_predictable(nxt.router) and nxt.d_model == layer.d_model
                    and nxt.experts.device == layer.experts.device):
                # Not a submodule (no duplicate parameters); deepcopy remaps it with the model.
                object.__setattr__(layer, "_offload_next", nxt)
                layer._offload_prefetch_hook = layer.register_forward_pre_hook(_prefetch_pre_hook, with_kwargs=True)
    return model


def _predictable(router) -> bool:
    """A token-choice router that picks experts from the hidden state alone (``logits`` +
    ``select``, no per-token inputs such as task ids)."""
    if not isinstance(router, TokenChoiceRouter) or type(router).logits is TokenChoiceRouter.logits:
        return False
    extra = set(inspect.signature(router.forward).parameters) - {"x_TD", "mask"}
    return not extra


def _prefetch_pre_hook(module, args, kwargs):
    """Before MoE layer l runs: guess the next layer's experts from l's input with the next
    router, to be prefetched once l has started its own copies. Skipped in training mode (a
    noisy router would draw random numbers) and on inputs the layer itself will refuse."""
    nxt = module.__dict__.get("_offload_next")
    if (module.training or nxt is None or not isinstance(module.experts, OffloadedExperts)
            or not isinstance(nxt.experts, OffloadedExperts)):
        return None
    x = args[0] if args else kwargs.get("x")
    mask = kwargs.get("mask")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape[-1] != nxt.d_model:
        return None
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or mask.shape != x.shape[:-1]):
        return None
    with torch.no_grad():
        x_TD = x.reshape(-1, nxt.d_model)
        if mask is not None:
            x_TD = x_TD[mask.reshape(-1)]
        if x_TD.shape[0] == 0:
            return None
        ids_TK = nxt.router.select(nxt.router.logits(x_TD))[0]
        counts = torch.bincount(ids_TK.reshape(-1), minlength=nxt.num_experts).tolist()
    wanted = sorted((e for e in range(nxt.num_experts) if counts[e]), key=lambda e: -counts[e])
    module.experts.pending_prefetch = functools.partial(nxt.experts.prefetch, wanted)
    return None


def restore_experts(model: nn.Module, device=None) -> nn.Module:
    """Undo `offload_experts`: each layer gets its bank back on `device` (default: the cache's
    device) with the ``requires_grad`` flags it had; prefetch hooks are removed."""
    for _, layer in _moe_layers(model):
        hook = getattr(layer, "_offload_prefetch_hook", None)
        if hook is not None:
            hook.remove()
            del layer._offload_prefetch_hook
        layer.__dict__.pop("_offload_next", None)
        if isinstance(layer.experts, OffloadedExperts):
            off = layer.experts
            bank = off.unwrap()
            target = torch.device(device if device is not None else off.device)
            for p in bank.parameters():
                if p.is_pinned() and target.type == "cpu":
                    p.data = p.data.clone()          # an unpinned copy, so the pinned buffer can be freed
            layer.experts = bank.to(target)
    return model


def offload_stats(model: nn.Module) -> Dict[str, dict]:
    """``{layer name: CacheStats.as_dict(), ..., "total": ...}`` for every offloaded layer."""
    out, total = {}, CacheStats()
    for name, layer in _moe_layers(model):
        if isinstance(layer.experts, OffloadedExperts):
            out[name] = layer.experts.cache_stats.as_dict()
            total += layer.experts.cache_stats
    if not out:
        raise ValueError(f"{type(model).__name__} has no offloaded MoE layer")
    out["total"] = total.as_dict()
    return out
