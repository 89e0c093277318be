"""The sparse Mixture-of-Experts layer.

Legend: B examples, S tokens per example, T tokens, D model dim, F expert hidden dim, E experts,
K experts per token, N kept pairs.

``x (..., D) → flatten → router → permute → experts → combine (+ shared) → (..., D)``.
Each arrow is a separate, separately tested piece: the router returns a `Routing`, the
dispatcher (`moekit.ops.dispatch`) groups rows by expert, the expert bank runs each expert on
its segment through a named backend, and the combine scatters ``weight · output`` back.

Defining identity (tested for every router): in eval mode
``moe(x)[t] = Σ_{(t, e, w) kept} w · moe.experts[e](x[t]) + shared(x[t])``.

Per-example routing (``route_by="example"``, METHODS.md L3): the router sees one pooled row per
example and `expand_example_routing` hands each example's pairs to all of its tokens; the
dispatch, experts and combine are the token path's.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Optional, Union

import torch

from moekit.experts import ExpertBank, SharedExperts
from moekit.experts.build import resolve_experts
from moekit.experts.glu import GLU_ACTIVATIONS
from moekit.layers.checks import check_float_input
from moekit.layers.protocol import MoELayer, aux_loss, moe_layers
from moekit.layers.stats import MoEStats, moe_stats
from moekit.losses import (
    BALANCE_LOSSES,
    BALANCE_SCOPES,
    COUNT_LOSSES,
    BalanceStats,
    CountWindow,
    balance_loss_from_stats,
    balance_stats,
    router_terms_from_stats,
    z_loss_from_stats,
)
from moekit.ops.backends import check_backend_name
from moekit.ops.counting import count_ids
from moekit.ops.dispatch import LocalDispatcher
from moekit.ops.fused import fused_experts
from moekit.routing import Router, Routing, TokenChoiceRouter, build_router
from moekit.routing.base import check_router_args
from moekit.validate import check_bool, check_choice, check_instance, check_int, check_number, check_tensor

__all__ = ["MoE", "aux_loss", "default_hidden", "moe_layers", "expand_example_routing", "masked_mean_pool",
           "ROUTE_BY"]

ROUTE_BY = ("token", "example")

# Settings the layer itself gives its router; router_kwargs may not contradict them.
_LAYER_ROUTER_ARGS = {"d_model", "num_experts", "top_k", "capacity_factor", "eval_capacity_factor", "drop_policy"}


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:                                   # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()


def _router_precision(device: torch.device):
    """Routers compute in float32 (Switch's "selective precision"): inside ``torch.autocast``
    their linear layers would otherwise run in bf16/fp16, and a rounded logit flips the top-k
    choice of near-tied tokens."""
    return torch.autocast(device.type, enabled=False) if _autocast_on(device) else contextlib.nullcontext()


def default_hidden(d_model: int, expert: str) -> int:
    """4·D for MLP experts; ⅔·4·D rounded up to a multiple of 16 for GLU experts (equal params)."""
    if expert in GLU_ACTIVATIONS:
        return -(-(8 * d_model) // 3 // 16) * 16 if d_model >= 6 else max(1, (8 * d_model) // 3)
    return 4 * d_model


def masked_mean_pool(x_BSD: torch.Tensor, mask_BS: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, D): the mean of each example's tokens, padding (mask False) left out; an example
    with no valid token pools to 0."""
    if mask_BS is None:
        return x_BSD.mean(1)
    m_BS1 = mask_BS.unsqueeze(-1).to(x_BSD.dtype)
    return (x_BSD * m_BS1).sum(1) / m_BS1.sum(1).clamp_min(1)


def expand_example_routing(routing: Routing, num_examples: int, seq_len: int,
                           mask_BS: Optional[torch.Tensor] = None) -> Routing:
    """The routing of the B·S tokens of B examples (token ``b·S + s`` is token s of example b)
    that sends every valid token of example b to each pair ``(b, e, w)`` of `routing`, a
    token-choice routing of the B examples; padding tokens (``mask_BS`` False) get no pair.

    A uniform routing (each example's K slots, `Routing.slots_per_token`) stays uniform: token
    ``b·S + s`` takes example b's slots in their order, and a static layout (`Routing.keep`)
    stays static, so nothing here syncs with the host then. Otherwise the pairs are listed
    example by example. Per-token tensors (``logits``, ``probs``, ``topk_ids``) are the
    example's rows repeated; ``dropped`` counts token pairs (an example pair dropped by capacity
    drops it for each of the example's valid tokens). Router-specific ``aux_losses`` and
    ``extras`` stay with the example routing: losses are formed there.
    """
    B, S = num_examples, seq_len
    device = routing.expert_ids.device
    if routing.topk_ids is None:
        raise ValueError("expand_example_routing needs a token-choice routing (with topk_ids)")
    n_B = torch.full((B,), S, dtype=torch.long, device=device) if mask_BS is None else mask_BS.sum(1)
    kept_B = count_ids(routing.token_ids, B, routing.keep)
    dropped = (n_B * (routing.topk_ids.shape[1] - kept_B).clamp_min(0)).sum()
    K = routing.slots_per_token
    if K is not None and routing.num_pairs == B * K:
        expert_ids = routing.expert_ids.view(B, 1, K).expand(B, S, K).reshape(-1)
        weights = routing.weights.view(B, 1, K).expand(B, S, K).reshape(-1)
        token_ids = torch.arange(B * S, device=device).repeat_interleave(K)
        keep = None
        if routing.keep is not None or mask_BS is not None:
            keep_BSK = torch.ones(B, S, K, dtype=torch.bool, device=device)
            if routing.keep is not None:
                keep_BSK = keep_BSK & routing.keep.view(B, 1, K)
            if mask_BS is not None:
                keep_BSK = keep_BSK & mask_BS.unsqueeze(-1)
            keep = keep_BSK.reshape(-1)
            weights = torch.where(keep, weights, torch.zeros((), dtype=weights.dtype, device=device))
    else:
        b_N = routing.token_ids
        token_ids = (b_N.unsqueeze(1) * S + torch.arange(S, device=device)).reshape(-1)       # (N·S,)
        expert_ids = routing.expert_ids.unsqueeze(1).expand(-1, S).reshape(-1)
        weights = routing.weights.unsqueeze(1).expand(-1, S).reshape(-1)
        if mask_BS is not None:
            valid = mask_BS.index_select(0, b_N).reshape(-1)
            token_ids, expert_ids, weights = token_ids[valid], expert_ids[valid], weights[valid]
        K, keep = None, None
    example_T = torch.arange(B, device=device).repeat_interleave(S)
    per_token = (lambda t: None if t is None else t.index_select(0, example_T))
    return Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights, logits=per_token(routing.logits),
                   dropped=dropped, num_experts=routing.num_experts, probs=per_token(routing.probs),
                   topk_ids=per_token(routing.topk_ids), slots_per_token=K, keep=keep)


class MoE(MoELayer):
    """Sparse MoE layer (Shazeer et al. 2017; GShard; Switch; Mixtral; DeepSeekMoE).

    Args:
        d_model: D.
        num_experts: E routed experts.
        top_k: K experts per token. ``None`` (default) takes the router's own default: 2 for
            top-k routers, 1 for Switch; routers whose rule decides the count (dense, top-p,
            hash, BASE …) refuse an explicit value that differs from it.
        d_hidden: F, each routed expert's hidden size (default: see `default_hidden`).
        router: a registered name (`moekit.routing.available()`) or a `Router` instance.
        expert: ``"swiglu"`` | ``"geglu"`` | ``"reglu"`` | ``"mlp"``; ignored only when an
            ``experts`` instance is given, which is then an error if ``expert`` is also set.
        experts: an `ExpertBank` instance to use instead of building one.
        activation: override the experts' activation (e.g. ``"relu"`` for ``expert="mlp"``).
        capacity_factor: training capacity factor; ``None`` = dropless.
        eval_capacity_factor: capacity factor in eval (``"same"``: as in training).
        drop_policy: ``"position"`` | ``"probability"`` | ``"reroute"``.
        num_shared_experts: always-on shared experts (hidden ``shared_d_hidden`` each).
        shared_expert_gate: Qwen-MoE's sigmoid gate on the shared output.
        aux_loss_coef: weight of the balancing loss.
        z_loss_coef: weight of the router z-loss.
        balance_loss: ``"auto"`` (the router's default), ``"switch"``, ``"importance_load"``,
            ``"sequence"``, ``"gshard"`` (first-choice fractions, GShard), ``"device"``
            (DeepSeek's device-level loss over ``balance_devices`` expert groups) or ``"none"``
            (METHODS.md T1; each equals 1 at perfect balance except ``importance_load``, 0).
        balance_devices: the number of devices (contiguous equal expert groups) of the
            ``"device"`` loss; no process group needed. Only with ``balance_loss="device"``.
        balance_scope: ``"micro_batch"`` (default): f and P of each forward pass;
            ``"global_batch"`` (Qiu et al. 2025, METHODS.md T1 (f)): in training, f counts the
            selections of every micro-batch since the last optimizer step
            (`moekit.losses.CountWindow`; `moekit.optim.UpdateStep` resets it), so balance is
            asked of the step's whole batch, not of each micro-batch. For the count-based
            losses ``"switch"``, ``"gshard"``, ``"device"``.
        backend: ``"auto"`` | ``"eager"`` | ``"grouped_mm"`` | ``"triton"`` (when installed).
        router_kwargs: extra keyword arguments for a router built by name.
        sync_free: route and compute without any host synchronisation, so the layer can be
            captured in a CUDA graph (``torch.cuda.graph``) with capacity and padding masks
            too: the router returns the static layout (`Routing.keep`), capacity stays on the
            device. Needs a router with ``supports_sync_free`` (the token-choice family) and a
            backend that reads no counts on the host (``"grouped_mm"`` or ``"triton"``; under
            ``"auto"`` the operands must suit one of them). Same outputs as ``False``.
        route_by: ``"token"`` (default) routes each token; ``"example"`` (METHODS.md L3,
            Swin2-MoSE's MoE-SM) routes each example of an input ``(..., S, D)`` once, on its
            pooled tokens, and sends all its S tokens to the same experts. Needs a token-choice
            router (capacity then counts examples). A 2-D input ``(T, D)`` is T examples of one
            token, routed exactly as ``"token"``. The balancing losses, z-loss and `last_stats`
            are those of the example-level routing (counts are examples, and the ``"sequence"``
            loss takes the B examples as one group); ``last_routing`` holds the token pairs
            taken. Per-token router inputs (``token_ids``, ``task_ids`` …) are refused.
        pool: with ``route_by="example"``, ``pool(x_BSD, mask_BS) -> (B, D)`` replaces the
            default `masked_mean_pool` (``mask_BS`` is None without padding).

    ``last_stats`` is computed from the last routing when first read, so a forward pass does
    not pay for (or synchronise on) statistics nobody reads.

    ``stats_reducer``: None, or a callable ``reduce(packed) -> packed`` applied to the packed
    sufficient statistics of each forward pass (`moekit.losses.BalanceStats`) before the
    losses are formed. `moekit.parallel.apply_expert_parallel` sets it to a differentiable
    all-reduce sum over the ranks, which makes ``aux_loss`` and ``last_stats`` those of the
    global batch. The statistics' sums then travel in that same reduction (every rank takes
    part in it, in step), so reading ``last_stats`` later never waits for other ranks.
    """

    def __init__(self, *, d_model: int, num_experts: int, top_k: Optional[int] = None, d_hidden: Optional[int] = None,
                 router: Union[str, Router] = "topk", expert: Optional[str] = None,
                 experts: Optional[ExpertBank] = None, activation: Optional[str] = None,
                 capacity_factor: Optional[float] = None, eval_capacity_factor="same",
                 drop_policy: str = "position", num_shared_experts: int = 0,
                 shared_d_hidden: Optional[int] = None, shared_expert_gate: bool = False,
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0, balance_loss: str = "auto",
                 balance_devices: Optional[int] = None, balance_scope: str = "micro_batch",
                 backend: str = "auto", router_kwargs: Optional[dict] = None, sync_free: bool = False,
                 route_by: str = "token", pool: Optional[Callable] = None):
        super().__init__()
        check_router_args(d_model, num_experts, top_k)
        if balance_loss != "auto" and balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss must be 'auto' or one of {BALANCE_LOSSES}, got {balance_loss!r}")
        aux_loss_coef = check_number("aux_loss_coef", aux_loss_coef, min=0)
        z_loss_coef = check_number("z_loss_coef", z_loss_coef, min=0)
        check_int("num_shared_experts", num_shared_experts, min=0)
        check_int("shared_d_hidden", shared_d_hidden, min=1, allow_none=True)
        check_bool("shared_expert_gate", shared_expert_gate)
        check_backend_name(backend)
        check_bool("sync_free", sync_free)
        check_instance("router_kwargs", router_kwargs, dict, allow_none=True)
        check_choice("route_by", route_by, ROUTE_BY)
        if pool is not None and not callable(pool):
            raise TypeError("pool must be None or a callable pool(x_BSD, mask_BS) -> (B, D), "
                            f"got {type(pool).__name__}")
        if pool is not None and route_by != "example":
            raise ValueError(f"pool only applies with route_by='example', got route_by={route_by!r}")
        clash = sorted(set(router_kwargs or {}) & _LAYER_ROUTER_ARGS)
        if clash:
            raise ValueError(f"router_kwargs must not set {clash}: pass them to MoE(...) itself, which gives them "
                             f"to the router (router_kwargs holds only the router's own options)")
        self.d_model, self.num_experts = d_model, num_experts
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.backend = backend

        # Router: by name, or an instance (capacity settings given here are applied to it).
        if isinstance(router, Router):
            if router_kwargs:
                raise ValueError("router_kwargs only apply when router is given by name")
            if router.num_experts != num_experts or router.d_model != d_model:
                raise ValueError(f"router instance has d_model={router.d_model}, num_experts="
                                 f"{router.num_experts}; the layer has d_model={d_model}, num_experts={num_experts}")
            if capacity_factor is not None or drop_policy != "position":
                if not isinstance(router, TokenChoiceRouter):
                    raise ValueError(f"{type(router).__name__} takes no capacity settings")
                router.set_capacity(capacity_factor, eval_capacity_factor, drop_policy)
            self.router = router
        elif isinstance(router, str):
            kw = dict(d_model=d_model, num_experts=num_experts)
            if top_k is not None:
                kw["top_k"] = top_k
            if capacity_factor is not None or drop_policy != "position" or eval_capacity_factor != "same":
                kw.update(capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                          drop_policy=drop_policy)
            kw.update(router_kwargs or {})
            self.router = build_router(router, **kw)
        else:
            raise TypeError(f"router must be a name or a moekit Router, got {type(router).__name__}")
        if isinstance(router, Router) and top_k is not None and top_k != router.top_k:
            raise ValueError(f"top_k={top_k} differs from the router instance's top_k={router.top_k}")
        # A router instance already switched to sync-free routing makes the layer sync-free.
        sync_free = sync_free or bool(getattr(self.router, "sync_free", False))
        if sync_free:
            if not getattr(self.router, "supports_sync_free", False):
                from moekit.routing.registry import available, get_router_class
                ok = [n for n in available() if getattr(get_router_class(n), "supports_sync_free", False)]
                raise ValueError(f"sync_free=True needs a router that routes without a host sync, one of {ok}; "
                                 f"got {type(self.router).__name__}")
            if backend == "eager":
                raise ValueError("sync_free=True needs a backend that reads no counts on the host "
                                 "('grouped_mm', 'triton' or 'auto'), got backend='eager'")
            self.router.sync_free = True
        self.sync_free = sync_free
        if route_by == "example" and not isinstance(self.router, TokenChoiceRouter):
            raise ValueError(f"route_by='example' needs a token-choice router (each example picks its K experts), "
                             f"got {type(self.router).__name__}")
        self.route_by, self.pool = route_by, pool
        self.top_k = self.router.top_k
        self.balance_loss = self.router.default_balance_loss if balance_loss == "auto" else balance_loss
        check_choice("balance_scope", balance_scope, BALANCE_SCOPES)
        check_int("balance_devices", balance_devices, min=1, allow_none=True)
        if self.balance_loss == "device":
            if balance_devices is None or num_experts % balance_devices:
                raise ValueError(f"balance_loss='device' needs balance_devices, a divisor of num_experts={num_experts} "
                                 f"(the number of equal expert groups), got {balance_devices}")
        elif balance_devices is not None:
            raise ValueError(f"balance_devices applies only with balance_loss='device', got balance_loss="
                             f"{self.balance_loss!r} and balance_devices={balance_devices}")
        if balance_scope == "global_batch" and self.balance_loss not in COUNT_LOSSES:
            raise ValueError(f"balance_scope='global_batch' accumulates selection counts and needs a count-based "
                             f"balance_loss in {COUNT_LOSSES}, got {self.balance_loss!r}")
        self.balance_devices, self.balance_scope = balance_devices, balance_scope
        self.balance_window = CountWindow() if balance_scope == "global_batch" else None

        self.experts = resolve_experts(experts, expert=expert, d_hidden=d_hidden, activation=activation,
                                       num_experts=num_experts, d_model=d_model, default_expert="swiglu",
                                       default_hidden=default_hidden)
        self.d_hidden = getattr(self.experts, "d_hidden", None)
        if self.sync_free and not getattr(self.experts, "supports_static_layout", False):
            raise ValueError(f"sync_free=True needs an expert bank that takes the static layout (MLP/GLU banks); "
                             f"{type(self.experts).__name__} reads its counts on the host")
        allowed = getattr(self.experts, "supported_backends", None)
        if allowed is not None and backend not in allowed:
            raise ValueError(f"{type(self.experts).__name__} supports backend in {tuple(allowed)}, got {backend!r}")

        self.shared_experts = None
        if num_shared_experts:
            sh = shared_d_hidden or getattr(self.experts, "d_hidden", None) or default_hidden(d_model, "swiglu")
            self.shared_experts = SharedExperts(d_model, sh, num_shared_experts, expert=expert or "swiglu",
                                                activation=activation, gate=shared_expert_gate)
        elif shared_expert_gate:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")

        self.dispatcher = LocalDispatcher()
        self.stats_reducer = None
        self.last_stats = None
        self.last_routing = None

    @property
    def last_stats(self) -> Optional[MoEStats]:
        """Detached statistics of the last forward pass (computed on first read)."""
        if self._stats is None and self._stats_inputs is not None:
            pending = self._stats_inputs
            if not isinstance(pending, BalanceStats):           # (routing, mask, T): sums not taken yet
                routing, mask_T, T = pending
                pending = balance_stats(routing, mask_T, statistics=True, num_tokens=T)
            self._stats, self._stats_inputs = moe_stats(pending), None
        return self._stats

    @last_stats.setter
    def last_stats(self, value: Optional[MoEStats]) -> None:
        self._stats, self._stats_inputs = value, None

    # ------------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, mask, token_ids, router_inputs):
        check_float_input(x, self.d_model)
        p = next(self.parameters(), None)
        if p is not None and p.device != x.device:
            hint = " (materialise it first, e.g. layer.to_empty(device=...) and load weights)" \
                if p.device.type == "meta" else ""
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {p.device}{hint}")
        checks = [("mask", mask, torch.bool), ("token_ids", token_ids, None)]
        checks += [(k, v, None) for k, v in router_inputs.items()]
        for name, t, dt in checks:
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor of shape {tuple(x.shape[:-1])}, got {type(t).__name__}")
            if t.shape != x.shape[:-1]:
                raise ValueError(f"{name} must have shape {tuple(x.shape[:-1])} (x without its last dim), "
                                 f"got {tuple(t.shape)}")
            if dt is not None and t.dtype != dt:
                raise ValueError(f"{name} must be {dt}, got {t.dtype}")

    def forward(self, x: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                token_ids: Optional[torch.Tensor] = None, **router_inputs) -> torch.Tensor:
        """``(..., D) → (..., D)`` in x's dtype.

        mask: (...) bool, False for padding (not routed, not in losses or statistics).
        token_ids: (...) int vocabulary ids, for routers that route by id (hash).
        router_inputs: further per-token tensors of shape (...) for routers that take them
            (e.g. ``task_ids`` for task routing); a router that does not take one raises.
        """
        self._check(x, mask, token_ids, router_inputs)
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)                                   # (T, D)
        p = next(self.parameters(), None)
        if p is not None and p.is_floating_point() and x_TD.dtype != p.dtype and not _autocast_on(x.device):
            # Compute in the layer's dtype (float64 stays float64 end to end); y returns in x's dtype.
            x_TD = x_TD.to(p.dtype)
        T = x_TD.shape[0]
        mask_T = None if mask is None else mask.reshape(-1)
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        if T == 0:
            self.aux_loss = x.new_zeros((), dtype=torch.promote_types(torch.float32, x_TD.dtype))
            self.last_stats, self.last_routing = None, None
            return x.clone()

        seq_len = shape[-2] if x.dim() >= 3 else T
        if self.route_by == "example" and x.dim() >= 3:
            routing, stats_routing, stats_mask, n = self._route_examples(x_TD, seq_len, mask_T, token_ids,
                                                                         router_inputs)
            seq_len = n                               # the "sequence" loss: the B examples form one group
        else:
            extra = {k: v.reshape(-1) for k, v in router_inputs.items()}
            if ids_T is not None:
                extra["token_ids"] = ids_T
            with _router_precision(x_TD.device):
                routing = self.router(x_TD, mask=mask_T, **extra)
            stats_routing, stats_mask, n = routing, mask_T, T
        if self.sync_free:
            self.experts.check_sync_free_backend(x_TD, self.backend)
        y_TD = None
        if type(self.dispatcher) is LocalDispatcher:       # kernels fuse the local dispatch only
            y_TD = fused_experts(x_TD, routing, self.experts, backend=self.backend)
        if y_TD is None:
            x_ND, counts_E, meta = self.dispatcher.dispatch(x_TD, routing)
            y_ND = self.experts(x_ND, counts_E, backend=self.backend)
            y_TD = self.dispatcher.combine(y_ND, meta, out_dtype=x_TD.dtype)
        y_TD = y_TD.to(x_TD.dtype)                  # the compute dtype; x's dtype at the very end
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD).to(x_TD.dtype)

        # With a reducer, the statistics' sums join the losses' single reduction (all ranks
        # take part now); without one they wait until read. The mask is copied (a device copy,
        # no sync) so a caller reusing its buffer cannot change them.
        sums = self._sufficient_stats(stats_routing, stats_mask, seq_len, n, statistics=self.stats_reducer is not None)
        aux = self._aux_loss_from(sums)
        self.aux_loss = aux.to(torch.promote_types(aux.dtype, x_TD.dtype))      # float64 layers: float64
        self._stats = None
        self._stats_inputs = sums if sums.has_statistics else (
            stats_routing, None if stats_mask is None else stats_mask.clone(), n)
        self.last_routing = routing
        return y_TD.to(x.dtype).reshape(shape)

    def _route_examples(self, x_TD, seq_len: int, mask_T, token_ids, router_inputs):
        """``route_by="example"``: ``(token routing, example routing, example mask, B)``."""
        given = sorted(router_inputs) + (["token_ids"] if token_ids is not None else [])
        if given:
            raise ValueError(f"route_by='example' routes on pooled examples and takes no per-token router "
                             f"inputs, got {given}")
        S = seq_len
        B = x_TD.shape[0] // S
        x_BSD = x_TD.reshape(B, S, self.d_model)
        mask_BS = None if mask_T is None else mask_T.reshape(B, S)
        if self.pool is None:
            pooled_BD = masked_mean_pool(x_BSD, mask_BS)
        else:
            pooled_BD = check_tensor("pool(x_BSD, mask_BS)", self.pool(x_BSD, mask_BS), shape=(B, self.d_model),
                                     floating=True)
        mask_B = None if mask_BS is None else mask_BS.any(1)          # examples with a valid token
        with _router_precision(pooled_BD.device):
            routing_B = self.router(pooled_BD, mask=mask_B)
        return expand_example_routing(routing_B, B, S, mask_BS), routing_B, mask_B, B

    def _sufficient_stats(self, routing, mask_T, seq_len: int, T: Optional[int], *, statistics: bool) -> BalanceStats:
        """The sums this layer's losses (and, if asked, statistics) need, after `stats_reducer`."""
        sums = balance_stats(routing, mask_T, balance=self.balance_loss if self.aux_loss_coef > 0 else "none",
                             seq_len=seq_len, z_loss=self.z_loss_coef > 0, router_terms=True,
                             statistics=statistics, num_tokens=T, num_devices=self.balance_devices)
        sums = sums if self.stats_reducer is None else sums.reduce(self.stats_reducer)
        if self.balance_window is not None and self.training and sums.select_counts is not None:
            # Global batch: f from the counts of every micro-batch of this optimizer step so far.
            sums = replace(sums, select_counts=self.balance_window.add(sums.select_counts))
        return sums

    def _aux_loss_from(self, sums: BalanceStats) -> torch.Tensor:
        total = torch.zeros((), device=sums.device)
        if self.aux_loss_coef > 0 and self.balance_loss != "none":
            total = total + self.aux_loss_coef * balance_loss_from_stats(sums)
        if self.z_loss_coef > 0:
            total = total + self.z_loss_coef * z_loss_from_stats(sums)
        return total + router_terms_from_stats(sums)

    def compute_aux_loss(self, routing, mask_T, seq_len: int) -> torch.Tensor:
        """``aux_loss_coef · balance + z_loss_coef · z + router-specific terms`` (scalar, with grad)
        of `routing`, over the global batch when `stats_reducer` is set."""
        return self._aux_loss_from(self._sufficient_stats(routing, mask_T, seq_len, None, statistics=False))

    def __getstate__(self):
        # copy.deepcopy / pickle after a training forward: drop the autograd graph that
        # aux_loss and last_routing hold (they describe the last forward, not the model).
        state = self.__dict__.copy()
        if isinstance(state.get("aux_loss"), torch.Tensor):
            state["aux_loss"] = state["aux_loss"].detach()
        state["last_routing"] = None
        state["_stats"], state["_stats_inputs"] = self.last_stats, None      # computed now if pending
        return state

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"backend={self.backend!r}, aux_loss_coef={self.aux_loss_coef}, z_loss_coef={self.z_loss_coef}, "
                f"balance_loss={self.balance_loss!r}" + (", sync_free=True" if self.sync_free else "")
                + (f", balance_devices={self.balance_devices}" if self.balance_devices is not None else "")
                + (f", balance_scope={self.balance_scope!r}" if self.balance_scope != "micro_batch" else "")
                + (f", route_by={self.route_by!r}" if self.route_by != "token" else ""))
