"""Router registry: one name per router family, usable as ``MoE(router="name")``.

A new router is one file in `moekit/routing/` that calls `register_router` (or a line in
`_BUILTIN` below); nothing else changes.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Dict

from moekit.routing.base import Router

__all__ = ["register_router", "build_router", "available", "get_router_class"]

_REGISTRY: Dict[str, Callable[..., Router]] = {}

# name -> "module:Class", imported on first use so optional routers cost nothing at import.
_BUILTIN = {
    "topk": "moekit.routing.topk:TopKRouter",
    "noisy_topk": "moekit.routing.noisy_topk:NoisyTopKRouter",
    "switch": "moekit.routing.switch:SwitchRouter",
    "sampled_top1": "moekit.routing.sampled_top1:SampledTop1Router",
    "sigmoid": "moekit.routing.sigmoid:SigmoidRouter",
    "gshard": "moekit.routing.gshard:GShardRouter",
    "expert_choice": "moekit.routing.expert_choice:ExpertChoiceRouter",
    "top_p": "moekit.routing.top_p:TopPRouter",
    "hash": "moekit.routing.hash:HashRouter",
    "dense": "moekit.routing.dense:DenseRouter",
    "cosine": "moekit.routing.cosine:CosineRouter",
    "relu": "moekit.routing.relu:ReLURouter",
    "dselect_k": "moekit.routing.dselect_k:DSelectKRouter",
    "sinkhorn": "moekit.routing.sinkhorn:SinkhornRouter",
    "base": "moekit.routing.balanced_assignment:BaseLayerRouter",
    "thor": "moekit.routing.thor:ThorRouter",
    "null_experts": "moekit.routing.null_experts:NullExpertsRouter",
    "task": "moekit.routing.task:TaskRouter",
    "task_topk": "moekit.routing.task_token:TaskTokenRouter",
    "random": "moekit.routing.random:RandomRouter",
    "gaussian": "moekit.routing.gaussian:GaussianRouter",
    "dense_to_sparse": "moekit.routing.schedules:DenseToSparseRouter",
    "stable_moe": "moekit.routing.schedules:StableMoERouter",
    "vmoe": "moekit.routing.vmoe:VMoERouter",
    "multihash": "moekit.routing.multihash:MultiHashRouter",
    "dynmoe": "moekit.routing.dynmoe:DynMoERouter",
}


def register_router(name: str, cls: Callable[..., Router] | None = None):
    """Register `cls` under `name`; usable as a decorator."""
    def deco(c):
        if name in _REGISTRY and _REGISTRY[name] is not c:
            raise ValueError(f"router name {name!r} is already registered to {_REGISTRY[name]}")
        _REGISTRY[name] = c
        return c
    return deco(cls) if cls is not None else deco


def available() -> list[str]:
    """Sorted names accepted by ``router=``."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def get_router_class(name: str):
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN:
        module, cls = _BUILTIN[name].split(":")
        _REGISTRY[name] = getattr(importlib.import_module(module), cls)
        return _REGISTRY[name]
    raise ValueError(f"unknown router {name!r}; available: {', '.join(available())}")


def build_router(name: str, **kwargs) -> Router:
    """Build router `name`, passing only the keyword arguments its constructor takes.

    Common arguments the MoE layer passes (``capacity_factor`` …) must be accepted or be
    None/default; an explicitly set argument the router cannot honour is an error, never
    silently dropped.
    """
    cls = get_router_class(name)
    params = inspect.signature(cls.__init__).parameters
    takes_var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not takes_var_kw]
    if unknown:
        valid = [p for p in params if p not in ("self", "args", "kwargs")]
        raise ValueError(f"router {name!r} does not take {unknown}; it takes {valid}")
    return cls(**kwargs)
