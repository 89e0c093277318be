"""The `Routing` format every router returns, and the router base classes.

Legend: T tokens, D model dim, E experts, K experts per token, N kept (token, expert) pairs.

A router maps tokens ``x_TD`` to a `Routing`: the (token, expert, weight) pairs that are kept
after capacity, plus the float32 logits and probabilities the balancing losses need. Whatever
the rule (top-k, top-p, expert choice, hash, balanced assignment, random), routers speak this
one format, so the dispatcher, the losses and the statistics never look inside a router.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn

from moekit.ops.counting import count_ids
from moekit.routing.capacity import DROP_POLICIES, apply_capacity, apply_capacity_static, capacity_for, capacity_tensor
from moekit.validate import check_choice, check_int, check_number

__all__ = ["Routing", "Router", "TokenChoiceRouter", "check_router_args", "check_no_top_k", "router_float"]


def router_float(t: torch.Tensor) -> torch.Tensor:
    """Router math runs in float32 at least (Switch's "selective precision"); float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


@dataclass
class Routing:
    """Kept (token, expert, weight) pairs of one routing group.

    Attributes:
        token_ids: (N,) int64, the token of each kept pair.
        expert_ids: (N,) int64, the expert of each kept pair.
        weights: (N,) float32, the combine weight of each kept pair (with gradient).
        logits: (T, E) float32 router logits (float64 for float64 input), or None for routers without logits (hash,
                                                                                                              random).
        dropped: 0-d int64 tensor, pairs the router selected but capacity dropped.
        num_experts: E.
        probs: (T, E) float32 scores the balancing losses use (softmax probabilities, or
            normalised sigmoid scores), or None.
        topk_ids: (T, K) int64, the selection before capacity (token-choice routers), or None.
        aux_losses: router-specific loss terms, already weighted by the router's own
            coefficients (e.g. top-p's entropy loss); the layer adds them to `aux_loss`.
        extras: router-specific tensors a balancing loss may need (e.g. noisy top-k's
            smooth load estimate under ``"load_probs"``).
        slots_per_token: K when the pairs are exactly every token × K slots in token-major
            order (dropless, unmasked token choice) — lets the dispatcher gather and reduce
            instead of scatter; None otherwise.
        keep: None (every pair listed is kept), or — in the static layout of sync-free routing
            (``sync_free=True``) — an (N,) bool tensor over all T·K slots marking the kept
            pairs; the others (capacity drops, padding) carry weight 0 and contribute nothing.
            The static layout has shapes that do not depend on the data, so no host sync;
            `compact` turns it into the kept-pairs-only form.
    """

    token_ids: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    logits: Optional[torch.Tensor]
    dropped: torch.Tensor
    num_experts: int
    probs: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    aux_losses: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    slots_per_token: Optional[int] = None
    keep: Optional[torch.Tensor] = None

    @property
    def num_pairs(self) -> int:
        """Pairs listed (in the static layout: all slots, kept or not)."""
        return self.token_ids.numel()

    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) int64: kept pairs per expert (no host sync)."""
        return count_ids(self.expert_ids, self.num_experts, self.keep)

    def compact(self) -> "Routing":
        """This routing with only the kept pairs listed (itself when `keep` is None).

        Boolean indexing: a host sync on a GPU. For consumers that need the standard form
        (expert parallelism, analysis); the local dispatch and the kernels read `keep` as is.
        """
        if self.keep is None:
            return self
        k = self.keep
        return replace(self, token_ids=self.token_ids[k], expert_ids=self.expert_ids[k], weights=self.weights[k],
                       keep=None, slots_per_token=None, aux_losses=dict(self.aux_losses), extras=dict(self.extras))


def check_router_args(d_model: int, num_experts: int, top_k: Optional[int] = None) -> None:
    """Raise ValueError / TypeError for an empty or inconsistent router configuration."""
    check_int("d_model", d_model, min=1)
    check_int("num_experts", num_experts, min=1)
    if top_k is not None:
        check_int("top_k", top_k, min=1)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got top_k={top_k}")


def check_no_top_k(router_name: str, top_k: Optional[int], natural: Optional[int]) -> None:
    """Routers without a free K (the count is decided by the rule) refuse an explicit top_k."""
    if top_k is not None and top_k != natural:
        what = "a variable number of experts per token" if natural is None else f"{natural} expert(s) per token"
        raise ValueError(f"router {router_name!r} routes {what}; top_k does not apply (got top_k={top_k})")


def _check_capacity_factor(name: str, value: Optional[float]) -> None:
    check_number(name, value, min=0, min_open=True, allow_none=True)        # None: dropless


class Router(nn.Module):
    """Base class of every router: ``forward(x_TD, *, mask=None, **router_inputs) -> Routing``.

    ``mask`` (T,) bool marks real tokens (False = padding): padding is never routed and never
    counted in losses or statistics. ``token_ids`` (T,) carries vocabulary ids for routers that
    route by id (hash routing). Subclasses set `top_k` where a token takes a fixed number of
    experts and `default_balance_loss`, the balancing loss the MoE layer uses by default.
    """

    default_balance_loss: str = "switch"
    # Routers whose output for one token depends on other tokens (expert choice, BASE)
    # set this so autoregressive models can refuse them.
    causal_safe: bool = True
    # Routers that can route without a host sync (static layout, see `Routing.keep`) set
    # this; `sync_free` then switches it on (the MoE layer's ``sync_free=True`` does).
    supports_sync_free: bool = False
    sync_free: bool = False

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None):
        super().__init__()
        check_router_args(d_model, num_experts, top_k)
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, x_TD: torch.Tensor, *, mask: Optional[torch.Tensor] = None, **router_inputs) -> Routing:
        """Subclasses name the per-token inputs they take (``token_ids``, ``task_ids`` …) as
        keyword arguments; passing one a router does not take is a TypeError, never ignored."""
        raise NotImplementedError

    def check_input(self, x_TD: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.d_model:
            raise ValueError(f"router expects x of shape (T, {self.d_model}), got {tuple(x_TD.shape)}")
        if not x_TD.is_floating_point():
            raise ValueError(f"router expects a float tensor, got dtype {x_TD.dtype}")
        if mask is not None and (mask.shape != x_TD.shape[:1] or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor of shape ({x_TD.shape[0]},), "
                             f"got {mask.dtype} {tuple(mask.shape)}")


class TokenChoiceRouter(Router):
    """A router in which each token picks K experts from its logits, with optional capacity.

    Subclasses implement `logits(x_TD)` (float32 (T, E)) and `select(logits_TE)`, which returns
    ``(topk_ids_TK, weights_TK, probs_TE)``: the K chosen experts in preference order, their
    combine weights and the (T, E) probabilities used by balancing losses.

    Capacity (Switch / GShard): each expert takes at most ``C = ceil(cf · K · T / E)`` pairs,
    with ``capacity_factor`` in training and ``eval_capacity_factor`` in eval (``None`` means
    dropless). ``drop_policy`` decides who is dropped (see `moekit.routing.capacity`).

    With ``sync_free = True`` the routing comes in the static layout (every token's K slots,
    `Routing.keep` marking the kept ones) whenever capacity or a padding mask would make the
    number of kept pairs data-dependent; the kept pairs are the same.
    """

    supports_sync_free = True

    def __init__(self, d_model: int, num_experts: int, top_k: int, *,
                 capacity_factor: Optional[float] = None, eval_capacity_factor: Optional[float] = "same",
                 drop_policy: str = "position"):
        super().__init__(d_model, num_experts, top_k)
        self.set_capacity(capacity_factor, eval_capacity_factor, drop_policy)

    def set_capacity(self, capacity_factor: Optional[float], eval_capacity_factor="same",
                     drop_policy: str = "position") -> None:
        """Set the capacity factors (``eval_capacity_factor="same"`` reuses the training one)."""
        if eval_capacity_factor == "same":
            eval_capacity_factor = capacity_factor
        _check_capacity_factor("capacity_factor", capacity_factor)
        _check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
        check_choice("drop_policy", drop_policy, DROP_POLICIES)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.drop_policy = drop_policy

    # -- to implement -------------------------------------------------------------------
    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, logits_TE: torch.Tensor):
        raise NotImplementedError

    def fallback_weights(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor,
                         topk_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """(T, E) combine weight a token would get from any expert it is re-routed to.

        Default: the expert's probability scaled by the same factor the token's top-K got,
        so a fallback expert weighs what it would have weighed had it been chosen.
        """
        chosen_p = probs_TE.gather(1, topk_ids_TK)
        scale_T1 = (weights_TK.sum(-1, keepdim=True) / chosen_p.sum(-1, keepdim=True).clamp_min(1e-20))
        return probs_TE * scale_T1

    def preference(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
        """(T, E) scores whose descending order is the token's preference over experts."""
        return probs_TE

    # -- shared machinery ---------------------------------------------------------------
    def current_capacity_factor(self) -> Optional[float]:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        logits_TE = self.logits(x_TD)
        topk_ids_TK, weights_TK, probs_TE = self.select(logits_TE)
        return self.build_routing(logits_TE, probs_TE, topk_ids_TK, weights_TK, mask)

    def build_routing(self, logits_TE, probs_TE, topk_ids_TK, weights_TK, mask, **routing_kwargs) -> Routing:
        """Apply padding mask and capacity to a (T, K) selection and pack a `Routing`."""
        T, K = topk_ids_TK.shape
        E = self.num_experts
        cf = self.current_capacity_factor()
        if self.sync_free and (cf is not None or mask is not None):
            return self._build_static(logits_TE, probs_TE, topk_ids_TK, weights_TK, mask, cf, **routing_kwargs)
        if cf is None:
            token_ids = torch.arange(T, device=topk_ids_TK.device).repeat_interleave(K)
            expert_ids = topk_ids_TK.reshape(-1)
            weights = weights_TK.reshape(-1)
            if mask is not None:
                keep = mask.repeat_interleave(K)
                token_ids, expert_ids, weights = token_ids[keep], expert_ids[keep], weights[keep]
            else:
                routing_kwargs.setdefault("slots_per_token", K)
            dropped = torch.zeros((), dtype=torch.long, device=topk_ids_TK.device)
        else:
            n_valid = T if mask is None else int(mask.sum())
            capacity = capacity_for(cf, K, n_valid, E)
            fallback = self._reroute_fallback(logits_TE, probs_TE, topk_ids_TK, weights_TK)
            token_ids, expert_ids, weights, dropped = apply_capacity(
                topk_ids_TK, weights_TK, num_experts=E, capacity=capacity, policy=self.drop_policy,
                mask_T=mask, fallback=fallback)
        return Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights, logits=logits_TE,
                       dropped=dropped, num_experts=E, probs=probs_TE, topk_ids=topk_ids_TK,
                       **routing_kwargs)

    def _reroute_fallback(self, logits_TE, probs_TE, topk_ids_TK, weights_TK):
        """``(preference_TE, fallback_weights_TE)`` for the re-route policy, else None."""
        if self.drop_policy != "reroute":
            return None
        pref_TE = self.preference(logits_TE, probs_TE).detach()
        return pref_TE, self.fallback_weights(logits_TE, probs_TE, topk_ids_TK, weights_TK)

    def _build_static(self, logits_TE, probs_TE, topk_ids_TK, weights_TK, mask, cf, **routing_kwargs) -> Routing:
        T, K = topk_ids_TK.shape
        E = self.num_experts
        device = topk_ids_TK.device
        if cf is None:          # dropless with padding: only the mask decides
            keep_TK = mask.unsqueeze(1).expand(T, K)
            expert_TK, w_TK = topk_ids_TK, torch.where(keep_TK, weights_TK, torch.zeros_like(weights_TK))
            dropped = torch.zeros((), dtype=torch.long, device=device)
        else:
            capacity = capacity_for(cf, K, T, E) if mask is None else capacity_tensor(cf, K, mask.sum(), E)
            fallback = self._reroute_fallback(logits_TE, probs_TE, topk_ids_TK, weights_TK)
            expert_TK, w_TK, keep_TK, dropped = apply_capacity_static(
                topk_ids_TK, weights_TK, num_experts=E, capacity=capacity, policy=self.drop_policy,
                mask_T=mask, fallback=fallback)
        return Routing(token_ids=torch.arange(T, device=device).repeat_interleave(K),
                       expert_ids=expert_TK.reshape(-1), weights=w_TK.reshape(-1), logits=logits_TE,
                       dropped=dropped, num_experts=E, probs=probs_TE, topk_ids=topk_ids_TK,
                       slots_per_token=K, keep=keep_TK.reshape(-1), **routing_kwargs)

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else (
            f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
            f"drop_policy={self.drop_policy!r}")
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, {cap}"
