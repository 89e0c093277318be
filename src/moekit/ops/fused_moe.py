"""Fused SwiGLU MoE experts as an autograd op, beside the unfused reference.

Legend: T tokens, D model dim, F expert hidden, E experts, N kept (token, expert) pairs.

``y_TD[t] = Σ_{pairs r of t} w_r · W_down[e_r] (silu(W_g[e_r] x_t) ⊙ W_u[e_r] x_t)``
(Shazeer 2020 SwiGLU experts; MegaBlocks-style dropless grouped GEMMs, Gale et al. 2023;
the fusions follow ScatterMoE, Tan et al. 2024). What the kernels fuse and what they never
materialise is described in `moekit.kernels.fused_moe`, which holds the launch sequences
this op calls; saved for backward: x (the caller's), the weights, the (N, 2F) pre-activations.

`fused_moe_forward(x_TD, routing, bank)` and `fused_moe_reference` (the unfused eager path:
dispatch → ``bank(..., backend="eager")`` → combine) share one signature; tests compare
outputs and gradients. Importing this module imports triton.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from moekit.kernels.fused_moe import swiglu_experts_backward, swiglu_experts_forward, swiglu_experts_forward_with_pre
from moekit.kernels.launch import check_tiles
from moekit.ops.dispatch import LocalDispatcher, sort_by_expert
from moekit.validate import check_choice

__all__ = ["fused_moe_forward", "fused_moe_reference", "fused_swiglu_experts", "sort_pairs", "COMBINES"]

_SILU_NAMES = ("silu", "swish")
COMBINES = ("atomic", "slots")
Tiles = Optional[Mapping[str, int]]


def sort_pairs(token_ids_N: torch.Tensor, expert_ids_N: torch.Tensor, weights_N: torch.Tensor, num_experts: int,
               keep_N: Optional[torch.Tensor] = None):
    """Pairs grouped by expert, stable (as `moekit.ops.dispatch.permute`).

    Returns ``(tok_N int32, weights_N, offs_E int32, order_N int32)`` in expert-sorted order;
    ``order_N[r]`` is the position of sorted row r in the routing's own pair order. Pairs
    with ``keep_N`` False sort after every expert's rows, past ``offs_E[-1]``, where no
    kernel reads them.
    """
    order_N, counts_E = sort_by_expert(expert_ids_N, num_experts, keep_N)
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return token_ids_N[order_N].to(torch.int32), weights_N[order_N], offs_E, order_N.to(torch.int32)


class _FusedSwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_gu_E2FD, w_down_EDF, weights_N, tok_N, offs_E, slot_N, top_k, tiles):
        y_TD, pre_N2F = swiglu_experts_forward_with_pre(x_TD, w_gu_E2FD, w_down_EDF, tok_N, weights_N, offs_E,
                                                        slot_N=slot_N, top_k=top_k, tiles=tiles)
        ctx.save_for_backward(x_TD, w_gu_E2FD, w_down_EDF, weights_N, tok_N, offs_E, pre_N2F, slot_N)
        ctx.top_k, ctx.tiles = top_k, tiles
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, w_gu_E2FD, w_down_EDF, weights_N, tok_N, offs_E, pre_N2F, slot_N = ctx.saved_tensors
        dx, d_gu, d_down, d_weights = swiglu_experts_backward(
            dy_TD, x_TD, w_gu_E2FD, w_down_EDF, tok_N, weights_N, offs_E, pre_N2F, slot_N=slot_N, top_k=ctx.top_k,
            need_dx=ctx.needs_input_grad[0], need_dw_gate_up=ctx.needs_input_grad[1],
            need_dw_down=ctx.needs_input_grad[2], tiles=ctx.tiles)
        d_weights = d_weights.to(weights_N.dtype) if ctx.needs_input_grad[3] else None
        return dx, d_gu, d_down, d_weights, None, None, None, None, None


def fused_swiglu_experts(x_TD: torch.Tensor, w_gate_up_E2FD: torch.Tensor, w_down_EDF: torch.Tensor,
                         tok_N: torch.Tensor, weights_N: torch.Tensor, offs_E: torch.Tensor,
                         slot_N: Optional[torch.Tensor] = None, top_k: int = 0, *,
                         tiles: Tiles = None) -> torch.Tensor:
    """``y_TD = Σ_r w_r · expert_{e(r)}(x[tok_r])`` for expert-sorted pairs (see `sort_pairs`).

    Weight layout as `GLUExperts`: gate_up (E, 2F, D) with the gate rows first, down (E, D, F).
    Differentiable in x, both weights and the combine weights. ``slot_N`` (with ``top_k``):
    each sorted row's slot ``t·K + k`` for the deterministic slot combine (exactly K rows per
    token); without it the combine uses fp32 atomics. ``tiles``: tile sizes forced in every
    launch (`moekit.kernels.launch.check_tiles`), None for the heuristic's.
    """
    if x_TD.dim() != 2:
        raise ValueError(f"x must be (T, D), got shape {tuple(x_TD.shape)}")
    E, F2, D = w_gate_up_E2FD.shape
    if D != x_TD.shape[1] or w_down_EDF.shape != (E, D, F2 // 2) or F2 % 2:
        raise ValueError(f"weights must be gate_up (E, 2F, D={x_TD.shape[1]}) and down (E, D, F); got "
                         f"{tuple(w_gate_up_E2FD.shape)} and {tuple(w_down_EDF.shape)}")
    if tok_N.shape != weights_N.shape or offs_E.numel() != E:
        raise ValueError(f"tok {tuple(tok_N.shape)}, weights {tuple(weights_N.shape)} and offs "
                         f"({offs_E.numel()} for E={E}) disagree")
    if slot_N is not None and (slot_N.shape != tok_N.shape or top_k <= 0 or tok_N.numel() != x_TD.shape[0] * top_k):
        raise ValueError(f"the slot combine needs exactly top_k rows per token: {tok_N.numel()} rows, "
                         f"T={x_TD.shape[0]}, top_k={top_k}, slots {tuple(slot_N.shape)}")
    check_tiles(tiles)
    dt = x_TD.dtype
    w_gu, w_down = w_gate_up_E2FD.to(dt), w_down_EDF.to(dt)
    tok_N, offs_E = tok_N.to(torch.int32), offs_E.to(torch.int32)
    slot_N = None if slot_N is None else slot_N.to(torch.int32)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, w_gu, w_down, weights_N))):
        # Inference: no pre-activations to keep for a backward pass.
        return swiglu_experts_forward(x_TD, w_gu, w_down, tok_N, weights_N, offs_E, slot_N=slot_N,
                                      top_k=int(top_k), tiles=tiles)
    return _FusedSwiGLUExperts.apply(x_TD, w_gu, w_down, weights_N, tok_N, offs_E, slot_N, int(top_k), tiles)


def _check_bank(bank) -> None:
    gu, down = getattr(bank, "gate_up_proj", None), getattr(bank, "down_proj", None)
    if gu is None or down is None:
        raise TypeError(f"fused_moe_forward needs a GLU expert bank (gate_up_proj, down_proj), "
                        f"got {type(bank).__name__}")
    if getattr(bank, "activation", None) not in _SILU_NAMES:
        raise ValueError(f"the fused kernel implements SwiGLU (activation 'silu'), got "
                         f"activation={getattr(bank, 'activation', None)!r}; use the unfused path")


def fused_moe_forward(x_TD: torch.Tensor, routing, bank, *, combine: str = "atomic",
                      tiles: Tiles = None) -> torch.Tensor:
    """Routed SwiGLU experts on x_TD with combine and scatter fused in: (T, D) in x's dtype.

    combine: ``"atomic"`` (any routing; fp32 atomic adds, so not bitwise reproducible) or
    ``"slots"`` (deterministic; needs the dropless token-choice layout, pair p belonging to
    token ``p // K`` — checked on the device without a host sync — and every pair kept).
    A routing in the static layout (`Routing.keep`) runs its kept pairs only.
    tiles: tile sizes forced in every kernel launch (a benchmark's sweep); None for the heuristic's.
    """
    _check_bank(bank)
    check_choice("combine", combine, COMBINES)
    keep_N = getattr(routing, "keep", None)
    if combine == "slots" and keep_N is not None:
        raise ValueError("combine='slots' writes every slot: a routing with dropped slots (keep) needs 'atomic'")
    tok_N, weights_N, offs_E, order_N = sort_pairs(routing.token_ids, routing.expert_ids, routing.weights,
                                                   routing.num_experts, keep_N)
    if combine == "atomic":
        return fused_swiglu_experts(x_TD, bank.gate_up_proj, bank.down_proj, tok_N, weights_N, offs_E, tiles=tiles)
    T, N = x_TD.shape[0], routing.token_ids.numel()
    if T == 0 or N % T:
        raise ValueError(f"combine='slots' needs K pairs for every token; got {N} pairs for {T} tokens")
    K = N // T
    expected = torch.arange(N, device=x_TD.device) // K
    torch._assert_async((routing.token_ids == expected).all(),
                        "combine='slots' needs token_ids == arange(T).repeat_interleave(K)")
    return fused_swiglu_experts(x_TD, bank.gate_up_proj, bank.down_proj, tok_N, weights_N, offs_E,
                                slot_N=order_N, top_k=K, tiles=tiles)


def fused_moe_reference(x_TD: torch.Tensor, routing, bank) -> torch.Tensor:
    """The unfused eager path with the same signature: dispatch → experts (eager) → combine."""
    disp = LocalDispatcher()
    x_ND, counts_E, meta = disp.dispatch(x_TD, routing)
    y_ND = bank(x_ND, counts_E, backend="eager")
    return disp.combine(y_ND, meta, out_dtype=x_TD.dtype)
