"""Sufficient statistics of one forward pass, and the balancing losses formed from them.

Legend: T tokens, E experts, K experts per token.

Every balancing loss and every routing statistic of the MoE layer is a function of a few sums
over the valid tokens: Σ_t p_te, the selections per expert, the number of valid tokens, Σ_t
lse_t², … `BalanceStats` holds those sums for one routing group; `balance_stats` computes
them once from a `Routing` and a mask, and the ``*_from_stats`` functions form the losses.
Because they are sums, the statistics of several routing groups (data-parallel ranks) add
up to the statistics of their concatenated batch: `BalanceStats.reduce` packs them into one
vector and hands it to a reduction — an all-reduce sum over the ranks in
`moekit.parallel`, so N ranks compute exactly the loss one process computes on the
concatenated batch (Qiu et al. 2025, "Demons in the Detail"; METHODS.md T1 (f)).

This module reads a `Routing` by its attributes (``probs``, ``topk_ids``, ``logits``,
``extras``, ``aux_losses``, ``dropped``, ``tokens_per_expert()``) and imports nothing from
`moekit.routing`, which comes after `moekit.losses`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import torch

from moekit.losses.balance import (
    acc,
    check_devices,
    check_ids,
    check_mask,
    cv_squared_from_sums,
    device_from_sums,
    entropy_rows,
    logsumexp_sq,
    masked_row_sum,
    masked_sum,
    mean_from_sums,
    num_valid,
    sequence_sums,
    switch_from_sums,
)
from moekit.ops.counting import count_ids
from moekit.validate import check_bool, check_choice, check_int

__all__ = ["BalanceStats", "balance_stats", "balance_loss", "balance_loss_from_stats", "z_loss_from_stats",
           "router_terms_from_stats", "BALANCE_LOSSES", "COUNT_LOSSES", "BALANCE_SCOPES", "CountWindow",
           "reset_balance_windows"]

BALANCE_LOSSES = ("switch", "importance_load", "sequence", "gshard", "device", "none")
# The losses whose f is a count of selections, which a global-batch window can accumulate.
COUNT_LOSSES = ("switch", "gshard", "device")

Reducer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BalanceStats:
    """Sums over the valid tokens of one routing group (None where not computed).

    balance: the balancing loss the sums serve (one of `BALANCE_LOSSES`).
    num_experts: E.
    device: where the sums live.
    n_valid: () valid (unmasked) tokens; None only when the routing has no per-token tensor.
    prob_sum: (E,) ``Σ_t p_te`` (with gradient for ``"switch"``).
    select_counts: (E,) pre-capacity selections per expert (``"switch"``, ``"device"``; kept
        pairs for routers without a pre-capacity selection); ``"gshard"``: first choices only.
    num_devices: expert groups of the ``"device"`` loss (1 otherwise).
    gate_sum, load_sum: (E,) ``Σ_t G_te`` and the smooth (or hard) load (``"importance_load"``).
    seq_loss_sum, seq_count: () ``Σ_b loss_b`` over sequences and how many hold a valid token
        (``"sequence"``).
    z_sum: () ``Σ_t (logsumexp_e logits_te)²`` (z-loss).
    router_terms_sum: () ``n_valid · Σ routing.aux_losses`` (router-specific terms, taken as
        means over tokens).
    kept_counts: (E,) kept pairs per expert; dropped: () pairs dropped by capacity;
    entropy_sum: () ``Σ_t H(p_t)`` — the statistics (`moekit.layers.stats.moe_stats`).
    """

    balance: str
    num_experts: int
    device: torch.device
    num_devices: int = 1
    n_valid: Optional[torch.Tensor] = None
    prob_sum: Optional[torch.Tensor] = None
    select_counts: Optional[torch.Tensor] = None
    gate_sum: Optional[torch.Tensor] = None
    load_sum: Optional[torch.Tensor] = None
    seq_loss_sum: Optional[torch.Tensor] = None
    seq_count: Optional[torch.Tensor] = None
    z_sum: Optional[torch.Tensor] = None
    router_terms_sum: Optional[torch.Tensor] = None
    kept_counts: Optional[torch.Tensor] = None
    dropped: Optional[torch.Tensor] = None
    entropy_sum: Optional[torch.Tensor] = None

    def tensor_fields(self) -> list:
        """Names of the sums present, in packing order."""
        return [f.name for f in fields(self) if f.name not in ("balance", "num_experts", "device", "num_devices")
                and getattr(self, f.name) is not None]

    @property
    def has_statistics(self) -> bool:
        return self.kept_counts is not None

    def reduce(self, reduce: Reducer) -> "BalanceStats":
        """The sums after ``reduce(packed)`` — one call on one float64 vector of every sum present.

        `reduce` maps a 1-D tensor to a tensor of the same shape: the identity for one routing
        group, a (differentiable) all-reduce sum over ranks for the global batch. float64 keeps
        counts exact far beyond float32's 2^24.
        """
        names = self.tensor_fields()
        if not names:
            return self
        parts = [getattr(self, n) for n in names]
        packed = torch.cat([p.reshape(-1).double() for p in parts])
        out = reduce(packed)
        if not isinstance(out, torch.Tensor) or out.shape != packed.shape:
            raise ValueError(f"stats reducer must return a tensor of the shape it was given {tuple(packed.shape)}, "
                             f"got {type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape)}")
        values, i = {}, 0
        for n, p in zip(names, parts):
            # Back to each sum's own dtype: the float64 packing keeps counts exact, not the result.
            values[n] = out[i:i + p.numel()].reshape(p.shape).to(p.dtype)
            i += p.numel()
        return replace(self, **values)


def _num_tokens(routing, mask: Optional[torch.Tensor]) -> Optional[int]:
    for t in (routing.probs, routing.logits, routing.topk_ids, mask):
        if t is not None:
            return t.shape[0]
    return None


def balance_stats(routing, mask: Optional[torch.Tensor] = None, *, balance: str = "none",
                  seq_len: Optional[int] = None, z_loss: bool = False, router_terms: bool = False,
                  statistics: bool = False, num_tokens: Optional[int] = None,
                  num_devices: Optional[int] = None) -> BalanceStats:
    """The sums of `routing` (one routing group) that the asked-for losses and statistics need.

    balance: which balancing loss (``"switch"`` uses ``routing.probs`` and the pre-capacity
        ``routing.topk_ids``, or the kept pairs without them; ``"importance_load"`` the noisy
        router's ``extras["gates"]`` and ``extras["load_probs"]`` (hard selection counts when
        there is no smooth estimate, e.g. in eval); ``"sequence"`` ``probs`` and ``topk_ids``
        over sequences of `seq_len` tokens (default: all T tokens form one sequence);
        ``"gshard"`` ``probs`` and the first choices ``topk_ids[:, 0]``; ``"device"`` what
        ``"switch"`` reads, grouped into `num_devices` devices). A router
        without probabilities (hash, random) contributes nothing.
    z_loss: the z-loss sum (when the router has logits). router_terms: ``routing.aux_losses``.
    statistics: the sums `moekit.layers.stats.moe_stats` needs (kept counts, drops, entropy).
    num_tokens: T, needed when neither the mask nor the routing has a per-token tensor.

    Only shapes are checked: nothing here reads a tensor on the host (sync-free layers call it).
    """
    check_choice("balance", balance, BALANCE_LOSSES)
    for name, v in (("z_loss", z_loss), ("router_terms", router_terms), ("statistics", statistics)):
        check_bool(name, v)
    check_int("num_tokens", num_tokens, min=0, allow_none=True)
    E = routing.num_experts
    probs, topk, logits = routing.probs, routing.topk_ids, routing.logits
    T = _num_tokens(routing, mask) if num_tokens is None else num_tokens
    for name, t in (("routing.probs", probs), ("routing.logits", logits)):
        if t is not None and (t.dim() != 2 or (T is not None and t.shape[0] != T) or t.shape[1] != E):
            raise ValueError(f"{name} must have shape ({T}, {E}), got {tuple(t.shape)}")
    if T is not None:
        check_mask(mask, T, "the routing's tokens")
        if topk is not None:
            check_ids("routing.topk_ids", topk, T, "the routing's tokens")
    device = routing.weights.device
    out = dict(balance=balance, num_experts=E, device=device)
    if balance == "device":
        if num_devices is None:
            raise ValueError("balance loss 'device' needs num_devices (the number of expert groups), got None")
        out["num_devices"] = check_devices(num_devices, E)
    if T is not None:
        out["n_valid"] = num_valid(T, mask, device)
    if probs is not None and balance in ("switch", "device"):
        out["prob_sum"] = masked_row_sum(probs, mask)
        out["select_counts"] = routing.tokens_per_expert() if topk is None else \
            count_ids(topk, E, None if mask is None else mask.unsqueeze(-1))
    elif probs is not None and balance == "gshard":
        if topk is None:
            raise ValueError("balance loss 'gshard' counts first choices and needs a token-choice router "
                             "(routing.topk_ids)")
        out["prob_sum"] = masked_row_sum(probs, mask)
        out["select_counts"] = count_ids(topk[:, :1], E, None if mask is None else mask.unsqueeze(-1))
    elif probs is not None and balance == "importance_load":
        gates, load = routing.extras.get("gates"), routing.extras.get("load_probs")
        if gates is None:
            raise ValueError("balance loss 'importance_load' needs routing.extras['gates'] (noisy_topk router)")
        out["gate_sum"] = masked_row_sum(gates, mask)
        if load is not None:
            out["load_sum"] = masked_row_sum(load, mask)
        elif topk is not None:
            out["load_sum"] = count_ids(topk, E, None if mask is None else mask.unsqueeze(-1)).float()
        else:
            raise ValueError("balance loss 'importance_load' needs routing.extras['load_probs'] or routing.topk_ids")
    elif probs is not None and balance == "sequence":
        if topk is None:
            raise ValueError("balance loss 'sequence' needs a token-choice router (routing.topk_ids)")
        S = T if seq_len is None else check_int("seq_len", seq_len, min=1)
        if T % S:
            raise ValueError(f"seq_len must divide the token count T={T}, got {S}")
        out["seq_loss_sum"], out["seq_count"] = sequence_sums(probs, topk, S, mask)
    if z_loss and logits is not None:
        out["z_sum"] = masked_sum(logsumexp_sq(logits), mask)
    if router_terms and routing.aux_losses:
        if T is None:
            raise ValueError("num_tokens is needed: the routing has router terms but no per-token tensor")
        total = sum(acc(v) for v in routing.aux_losses.values())
        out["router_terms_sum"] = total * out["n_valid"]
    if statistics:
        if T is None:
            raise ValueError("num_tokens is needed for statistics: the routing has no per-token tensor")
        out["kept_counts"] = routing.tokens_per_expert()
        dropped = routing.dropped
        out["dropped"] = (dropped.detach() if torch.is_tensor(dropped) else
                          torch.tensor(int(dropped), device=device)).reshape(())
        if probs is not None:
            p = probs.detach()
            if "prob_sum" not in out:
                out["prob_sum"] = masked_row_sum(p, mask)
            out["entropy_sum"] = masked_sum(entropy_rows(p), mask)
    return BalanceStats(**out)


# -- losses from the sums ---------------------------------------------------------------------
def balance_loss_from_stats(s: BalanceStats) -> torch.Tensor:
    """The balancing loss ``s.balance`` (unweighted, float32 scalar; 0 when nothing applies)."""
    if s.balance in ("switch", "gshard") and s.select_counts is not None:
        # "gshard": E · Σ f¹ P with first-choice fractions f¹ = E² × GShard's raw form.
        return switch_from_sums(s.prob_sum, s.select_counts, s.n_valid)
    if s.balance == "device" and s.select_counts is not None:
        return device_from_sums(s.prob_sum, s.select_counts, s.n_valid, s.num_devices)
    if s.balance == "importance_load" and s.gate_sum is not None:
        return cv_squared_from_sums(s.gate_sum) + cv_squared_from_sums(s.load_sum)
    if s.balance == "sequence" and s.seq_loss_sum is not None:
        return mean_from_sums(s.seq_loss_sum, s.seq_count)
    return torch.zeros((), device=s.device)


def z_loss_from_stats(s: BalanceStats) -> torch.Tensor:
    """Router z-loss ``mean_t lse_t²`` (0 without logits)."""
    return torch.zeros((), device=s.device) if s.z_sum is None else mean_from_sums(s.z_sum, s.n_valid)


def router_terms_from_stats(s: BalanceStats) -> torch.Tensor:
    """The router's own loss terms (``routing.aux_losses``) averaged over the valid tokens."""
    if s.router_terms_sum is None:
        return torch.zeros((), device=s.device)
    return mean_from_sums(s.router_terms_sum, s.n_valid)


def balance_loss(kind: str, routing, *, mask: Optional[torch.Tensor] = None,
                 seq_len: Optional[int] = None, num_devices: Optional[int] = None) -> torch.Tensor:
    """The balancing loss `kind` of one `Routing` (unweighted; see `balance_stats` for what
    each kind reads). Returns 0 when the router provides nothing the loss needs (hash, random)."""
    check_choice("kind", kind, BALANCE_LOSSES)
    s = balance_stats(routing, mask, balance=kind, seq_len=seq_len, num_devices=num_devices)
    return balance_loss_from_stats(s)


# -- global-batch balancing over the micro-batches of one optimizer step ------------------------
BALANCE_SCOPES = ("micro_batch", "global_batch")


class CountWindow:
    """The selection counts of the micro-batches seen since the last optimizer step (METHODS.md
    T1 (f), Qiu et al. 2025).

    A layer with ``balance_scope="global_batch"`` adds each training micro-batch's counts and
    forms its count-based loss (`COUNT_LOSSES`) with the running total, so f covers the step's
    micro-batches so far (the last micro-batch of a step sees the counts of the whole step;
    P stays the micro-batch's own, the differentiable part). `reset_balance_windows` — called by
    `moekit.optim.UpdateStep` after each update — starts the next step's window. The counts are
    detached and stay on the device (no host sync).
    """

    def __init__(self):
        self.counts: Optional[torch.Tensor] = None
        self.micro_batches = 0

    def add(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Add one micro-batch's counts; returns the running total (E,)."""
        c = counts_E.detach()
        self.counts = c.clone() if self.counts is None else self.counts + c.to(self.counts.dtype)
        self.micro_batches += 1
        return self.counts

    def reset(self) -> None:
        self.counts, self.micro_batches = None, 0


def reset_balance_windows(model) -> int:
    """Start a new global-batch window in every layer of `model` that keeps one (after each
    optimizer step); returns how many were reset."""
    n = 0
    for m in model.modules():
        w = getattr(m, "balance_window", None)
        if isinstance(w, CountWindow):
            w.reset()
            n += 1
    return n
