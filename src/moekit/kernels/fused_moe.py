"""Fused SwiGLU MoE experts: gather → gate/up GEMM + SwiGLU → down GEMM + combine + scatter.

Legend: T tokens, D model dim, F expert hidden, E experts, N kept (token, expert) pairs.

``y_TD[t] = Σ_{pairs r of t} w_r · W_down[e_r] (silu(W_g[e_r] x_t) ⊙ W_u[e_r] x_t)``
(Shazeer 2020 SwiGLU experts; MegaBlocks-style dropless grouped GEMMs, Gale et al. 2023;
the fusions follow ScatterMoE, Tan et al. 2024).

What is fused and what is not materialised:

- forward GEMM 1 reads token rows through the expert-sorted index list (no (N, D) permuted
  copy) and applies SwiGLU in its epilogue; it stores the (N, 2F) pre-activations for backward;
- forward GEMM 2 multiplies by the combine weight and atomically adds into an fp32 (T, D)
  buffer (no (N, D) expert output, no separate unpermute) — or, with ``combine="slots"`` for
  dropless top-k routing, stores each row into its pair's slot of a (T·K, D) buffer that a
  K-way sum reduces (deterministic, half the bytes of fp32 read-modify-writes);
- backward: ``g = dy[tok] @ W_down`` reads dy through the index list, and its epilogue
  applies the SwiGLU derivative (writing d(gate, up)) and the combine weight's gradient
  ``Σ_f g ⊙ h`` (no saved expert output, no saved h); dW_down reads dy through the index list
  with the combine weight as a row scale and recomputes h from the pre-activations on the
  fly; dx scatter-adds ``d(gate, up) @ W_gu`` into (T, D); dW_gu reads x through the index list.
  Saved for backward: x (the caller's), the weights, the (N, 2F) pre-activations.

`fused_moe_forward(x_TD, routing, bank)` and `fused_moe_reference` (the unfused eager path:
dispatch → ``bank(..., backend="eager")`` → combine) share one signature.
The atomic combine's order of the K additions per token is not fixed, so its results are
not bitwise reproducible run to run (they agree within fp32 rounding); the slot combine is.
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.ops.dispatch import sort_by_expert
from moekit.kernels.grouped_gemm import gmm, gmm_wgrad

__all__ = ["fused_moe_forward", "fused_moe_reference", "fused_swiglu_experts", "sort_pairs", "COMBINES"]

_SILU_NAMES = ("silu", "swish")


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


def _combine(a_NI, w_EIO, offs_E, tok_N, slot_N, top_k, T, out_dtype, scale_N=None):
    """``Σ_{rows r of token t} scale_r · (a_r @ W[e_r])`` into (T, O): fp32 atomics at the token
    row, or (``slot_N`` given) a plain store to the pair's own slot of a (T·K, O) buffer and a
    K-way sum — deterministic, and half the bytes of fp32 read-modify-writes."""
    if slot_N is None:
        return gmm(a_NI, w_EIO, offs_E, scale_N=scale_N, scatter_idx_N=tok_N, out_rows=T).to(out_dtype)
    y_TKO = gmm(a_NI, w_EIO, offs_E, scale_N=scale_N, scatter_idx_N=slot_N, out_rows=T * top_k,
                scatter_add=False)
    # torch's sum over a half-precision dim accumulates in fp32 and rounds once.
    return y_TKO.view(T, top_k, -1).sum(1).to(out_dtype)


def _forward(x_TD, w_gu_E2FD, w_down_EDF, weights_N, tok_N, offs_E, slot_N, top_k, store_pre: bool):
    w_gu_EDF2 = w_gu_E2FD.transpose(1, 2)                       # (E, D, 2F) view, no copy
    out = gmm(x_TD, w_gu_EDF2, offs_E, a_idx_N=tok_N, swiglu=True, store_pre=store_pre)
    h_NF, gu_N2F = out if store_pre else (out, None)
    y_TD = _combine(h_NF, w_down_EDF.transpose(1, 2), offs_E, tok_N, slot_N, top_k, x_TD.shape[0], x_TD.dtype,
                    scale_N=weights_N)
    return y_TD, gu_N2F


class _FusedSwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_gu_E2FD, w_down_EDF, weights_N, tok_N, offs_E, slot_N, top_k):
        y_TD, gu_N2F = _forward(x_TD, w_gu_E2FD, w_down_EDF, weights_N, tok_N, offs_E, slot_N, top_k,
                                store_pre=True)
        ctx.save_for_backward(x_TD, w_gu_E2FD, w_down_EDF, weights_N, tok_N, offs_E, gu_N2F, slot_N)
        ctx.top_k = top_k
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, w_gu_E2FD, w_down_EDF, weights_N, tok_N, offs_E, gu_N2F, slot_N = ctx.saved_tensors
        dy_TD = dy_TD.contiguous()
        T = x_TD.shape[0]
        # g = dy[tok] @ W_down[e] (dy read through the index list); the epilogue turns it into
        # d(gate, up) (N, 2F) and the combine weights' gradient Σ_f g · h.
        d_gu_N2F, d_weights = gmm(dy_TD, w_down_EDF, offs_E, a_idx_N=tok_N, scale_N=weights_N,
                                  dswiglu_pre_N2O=gu_N2F)
        d_down = d_gu = dx = None
        if ctx.needs_input_grad[2]:
            # dW_down[e] (D, F) = Σ_r (w_r · dy[tok_r])ᵀ h_r, h recomputed from gu on the fly.
            d_down = gmm_wgrad(dy_TD, gu_N2F, offs_E, out_dtype=w_down_EDF.dtype, a_idx_N=tok_N,
                               scale_N=weights_N, b_swiglu=True)
        if ctx.needs_input_grad[1]:
            # dW_gu[e] (2F, D) = Σ_r d_gu_rᵀ x[tok_r]
            d_gu = gmm_wgrad(d_gu_N2F, x_TD, offs_E, out_dtype=w_gu_E2FD.dtype, b_idx_N=tok_N)
        if ctx.needs_input_grad[0]:
            dx = _combine(d_gu_N2F, w_gu_E2FD, offs_E, tok_N, slot_N, ctx.top_k, T, x_TD.dtype)
        d_weights = d_weights.to(weights_N.dtype) if ctx.needs_input_grad[3] else None
        return dx, d_gu, d_down, d_weights, None, None, None, None


def fused_swiglu_experts(x_TD: torch.Tensor, w_gate_up_E2FD: torch.Tensor, w_down_EDF: torch.Tensor,
                         tok_N: torch.Tensor, weights_N: torch.Tensor, offs_E: torch.Tensor,
                         slot_N: Optional[torch.Tensor] = None, top_k: int = 0) -> torch.Tensor:
    """``y_TD = Σ_r w_r · expert_{e(r)}(x[tok_r])`` for expert-sorted pairs (see `sort_pairs`).

    Weight layout as `GLUExperts`: gate_up (E, 2F, D) with the gate rows first, down (E, D, F).
    Differentiable in x, both weights and the combine weights. ``slot_N`` (with ``top_k``):
    each sorted row's slot ``t·K + k`` for the deterministic slot combine (exactly K rows per
    token); without it the combine uses fp32 atomics.
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
    dt = x_TD.dtype
    args = (x_TD, w_gate_up_E2FD.to(dt), w_down_EDF.to(dt), weights_N, tok_N.to(torch.int32),
            offs_E.to(torch.int32), None if slot_N is None else slot_N.to(torch.int32), int(top_k))
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in args[:4])):
        # Inference: no pre-activations to keep for a backward pass.
        return _forward(*args, store_pre=False)[0]
    return _FusedSwiGLUExperts.apply(*args)


def _check_bank(bank) -> None:
    gu, down = getattr(bank, "gate_up_proj", None), getattr(bank, "down_proj", None)
    if gu is None or down is None:
        raise TypeError(f"fused_moe_forward needs a GLU expert bank (gate_up_proj, down_proj), "
                        f"got {type(bank).__name__}")
    if getattr(bank, "activation", None) not in _SILU_NAMES:
        raise ValueError(f"the fused kernel implements SwiGLU (activation 'silu'), got "
                         f"activation={getattr(bank, 'activation', None)!r}; use the unfused path")


COMBINES = ("atomic", "slots")


def fused_moe_forward(x_TD: torch.Tensor, routing, bank, *, combine: str = "atomic") -> torch.Tensor:
    """Routed SwiGLU experts on x_TD with combine and scatter fused in: (T, D) in x's dtype.

    combine: ``"atomic"`` (any routing; fp32 atomic adds, so not bitwise reproducible) or
    ``"slots"`` (deterministic; needs the dropless token-choice layout, pair p belonging to
    token ``p // K`` — checked on the device without a host sync — and every pair kept).
    A routing in the static layout (`Routing.keep`) runs its kept pairs only.
    """
    _check_bank(bank)
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    keep_N = getattr(routing, "keep", None)
    if combine == "slots" and keep_N is not None:
        raise ValueError("combine='slots' writes every slot: a routing with dropped slots (keep) needs 'atomic'")
    tok_N, weights_N, offs_E, order_N = sort_pairs(routing.token_ids, routing.expert_ids, routing.weights,
                                                   routing.num_experts, keep_N)
    if combine == "atomic":
        return fused_swiglu_experts(x_TD, bank.gate_up_proj, bank.down_proj, tok_N, weights_N, offs_E)
    T, N = x_TD.shape[0], routing.token_ids.numel()
    if T == 0 or N % T:
        raise ValueError(f"combine='slots' needs K pairs for every token; got {N} pairs for {T} tokens")
    K = N // T
    expected = torch.arange(N, device=x_TD.device) // K
    torch._assert_async((routing.token_ids == expected).all(),
                        "combine='slots' needs token_ids == arange(T).repeat_interleave(K)")
    return fused_swiglu_experts(x_TD, bank.gate_up_proj, bank.down_proj, tok_N, weights_N, offs_E,
                                slot_N=order_N, top_k=K)


def fused_moe_reference(x_TD: torch.Tensor, routing, bank) -> torch.Tensor:
    """The unfused eager path with the same signature: dispatch → experts (eager) → combine."""
    from moekit.ops.dispatch import LocalDispatcher

    disp = LocalDispatcher()
    x_ND, counts_E, meta = disp.dispatch(x_TD, routing)
    y_ND = bank(x_ND, counts_E, backend="eager")
    return disp.combine(y_ND, meta, out_dtype=x_TD.dtype)
