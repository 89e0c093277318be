"""`MoEConfig`: every argument of `moekit.MoE` but the model width, as one frozen value.

A model config holds one ``MoEConfig`` and builds each of its MoE layers with
``moe.build(d_model)``, instead of re-declaring and re-checking the layer's arguments. The
checks are the layer's own: `MoEConfig.check` builds the layer on the meta device (no memory,
no random draws), so a config is valid exactly when `moekit.MoE` accepts it. What needs no
``d_model`` is checked when the config is made: the router name, the shape of
``router_kwargs`` and that it does not repeat a layer argument.

    >>> cfg = MoEConfig(num_experts=8, router="top_p", router_kwargs={"p": 0.5})
    >>> moe = cfg.build(64)                       # == moekit.MoE(d_model=64, **fields)
    >>> MoEConfig.from_dict(cfg.to_dict()) == cfg
    True
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from moekit.layers.moe import ROUTE_BY, MoE
from moekit.routing import available as available_routers
from moekit.validate import check_choice, check_instance, check_int

__all__ = ["MoEConfig"]

# `moekit.MoE` arguments that router_kwargs must not repeat: the layer passes them to the router
# itself, and a second value in router_kwargs would silently win over the field.
_LAYER_ARGS = ("d_model", "num_experts", "top_k", "capacity_factor", "eval_capacity_factor", "drop_policy")


@dataclass(frozen=True)
class MoEConfig:
    """The keyword arguments of `moekit.MoE` except ``d_model`` (given to `build`) and the
    instance-only ``experts=`` and ``pool=`` (objects, not values a run file can hold);
    ``router`` is a registered name. Defaults are the layer's.

    ``router_kwargs`` is stored as a sorted tuple of ``(name, value)`` pairs (hashable, so the
    config is too); a dict is accepted. See `moekit.MoE` for the meaning of every field.
    """

    num_experts: int
    top_k: Optional[int] = None
    d_hidden: Optional[int] = None
    router: str = "topk"
    expert: Optional[str] = None
    activation: Optional[str] = None
    capacity_factor: Optional[float] = None
    eval_capacity_factor: Union[float, str, None] = "same"
    drop_policy: str = "position"
    num_shared_experts: int = 0
    shared_d_hidden: Optional[int] = None
    shared_expert_gate: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    balance_loss: str = "auto"
    balance_devices: Optional[int] = None
    balance_scope: str = "micro_batch"
    backend: str = "auto"
    router_kwargs: tuple = ()
    sync_free: bool = False
    route_by: str = "token"

    def __post_init__(self):
        check_int("num_experts", self.num_experts, min=1)
        check_instance("router", self.router, str, what="a registered router name (str)")
        check_choice("router", self.router, available_routers())
        check_choice("route_by", self.route_by, ROUTE_BY)
        kw = self.router_kwargs
        if isinstance(kw, dict):
            kw = tuple(sorted(kw.items()))
        check_instance("router_kwargs", kw, tuple, what="a dict or a tuple of (name, value) pairs")
        if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in kw):
            raise ValueError(f"router_kwargs must be a dict or a tuple of (name, value) pairs, got {kw!r}")
        names = [n for n, _ in kw]
        if len(set(names)) != len(names):
            raise ValueError(f"router_kwargs names each argument once, got {names}")
        for n, v in kw:
            if n in _LAYER_ARGS:
                hint = "it is the layer's width, given to build()" if n == "d_model" else f"set the field {n}= instead"
                raise ValueError(f"router_kwargs must not set {n!r} ({n}={v!r}): {hint}")
        object.__setattr__(self, "router_kwargs", tuple(sorted(kw)))

    # -- building --------------------------------------------------------------------------
    def kwargs(self) -> dict:
        """Keyword arguments of `moekit.MoE` (without ``d_model``)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw["router_kwargs"] = dict(self.router_kwargs) or None
        return kw

    def build(self, d_model: int) -> MoE:
        """``moekit.MoE(d_model=d_model, **fields)``."""
        return MoE(d_model=d_model, **self.kwargs())

    def check(self, d_model: int) -> MoE:
        """Raise as `moekit.MoE` would for this config at width `d_model`, and return the layer
        built on the meta device (its router and experts can be inspected; it holds no memory).

        The global random state is left as it was, so checking a config never changes the
        weights of a model built after it.
        """
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return self.build(d_model)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["router_kwargs"] = dict(self.router_kwargs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        check_instance("d", d, dict, what="a dict of MoEConfig fields")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown MoEConfig keys {unknown}; valid: {valid}")
        return cls(**d)
