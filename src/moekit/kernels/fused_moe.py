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

This file holds the launch sequences of the two passes over expert-sorted pairs, tensors in
and tensors out (`swiglu_experts_forward`, `swiglu_experts_forward_with_pre`,
`swiglu_experts_backward`); the autograd op, the pair sort and the layer-level
`fused_moe_forward` with its reference live in `moekit.ops.fused_moe`.
The atomic combine's order of the K additions per token is not fixed, so its results are
not bitwise reproducible run to run (they agree within fp32 rounding); the slot combine is.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from moekit.kernels.grouped_gemm import (
    gmm_scatter,
    gmm_scatter_add,
    gmm_swiglu,
    gmm_swiglu_backward,
    gmm_swiglu_with_pre,
    gmm_wgrad,
)

__all__ = ["combine_rows", "swiglu_experts_forward", "swiglu_experts_forward_with_pre", "swiglu_experts_backward"]

Tiles = Optional[Mapping[str, int]]


def combine_rows(a_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, tok_N: torch.Tensor,
                 num_tokens: int, out_dtype: torch.dtype, *, scale_N: Optional[torch.Tensor] = None,
                 slot_N: Optional[torch.Tensor] = None, top_k: int = 0, tiles: Tiles = None) -> torch.Tensor:
    """``Σ_{rows r of token t} scale_r · (a_r @ W[e_r])`` into (T, O) in ``out_dtype``: fp32
    atomics at the token row, or (``slot_N`` given) a plain store to the pair's own slot of a
    (T·K, O) buffer and a K-way sum — deterministic, and half the bytes of fp32
    read-modify-writes."""
    if slot_N is None:
        return gmm_scatter_add(a_NI, w_EIO, offs_E, tok_N, num_tokens, scale_N=scale_N, tiles=tiles).to(out_dtype)
    y_TKO = gmm_scatter(a_NI, w_EIO, offs_E, slot_N, num_tokens * top_k, scale_N=scale_N, tiles=tiles)
    # torch's sum over a half-precision dim accumulates in fp32 and rounds once.
    return y_TKO.view(num_tokens, top_k, -1).sum(1).to(out_dtype)


def swiglu_experts_forward(x_TD, w_gu_E2FD, w_down_EDF, tok_N, weights_N, offs_E, *,
                           slot_N: Optional[torch.Tensor] = None, top_k: int = 0, tiles: Tiles = None) -> torch.Tensor:
    """``y_TD`` for expert-sorted pairs (inference: no pre-activations kept).

    tok_N, offs_E (and slot_N) int32; weight layout as `GLUExperts`, in x's dtype.
    """
    h_NF = gmm_swiglu(x_TD, w_gu_E2FD.transpose(1, 2), offs_E, a_idx_N=tok_N, tiles=tiles)
    return combine_rows(h_NF, w_down_EDF.transpose(1, 2), offs_E, tok_N, x_TD.shape[0], x_TD.dtype,
                        scale_N=weights_N, slot_N=slot_N, top_k=top_k, tiles=tiles)


def swiglu_experts_forward_with_pre(x_TD, w_gu_E2FD, w_down_EDF, tok_N, weights_N, offs_E, *,
                                    slot_N: Optional[torch.Tensor] = None, top_k: int = 0, tiles: Tiles = None):
    """`swiglu_experts_forward` that also returns the (N, 2F) pre-activations for
    `swiglu_experts_backward`: ``(y_TD, pre_N2F)``."""
    # (E, D, 2F) view of the (E, 2F, D) weights: no copy.
    h_NF, pre_N2F = gmm_swiglu_with_pre(x_TD, w_gu_E2FD.transpose(1, 2), offs_E, a_idx_N=tok_N, tiles=tiles)
    y_TD = combine_rows(h_NF, w_down_EDF.transpose(1, 2), offs_E, tok_N, x_TD.shape[0], x_TD.dtype,
                        scale_N=weights_N, slot_N=slot_N, top_k=top_k, tiles=tiles)
    return y_TD, pre_N2F


def swiglu_experts_backward(dy_TD, x_TD, w_gu_E2FD, w_down_EDF, tok_N, weights_N, offs_E, pre_N2F, *,
                            slot_N: Optional[torch.Tensor] = None, top_k: int = 0, need_dx: bool = True,
                            need_dw_gate_up: bool = True, need_dw_down: bool = True, tiles: Tiles = None):
    """Gradients of `swiglu_experts_forward_with_pre`'s output:
    ``(dx_TD, d_gate_up_E2FD, d_down_EDF, d_weights_N fp32)``, each of the first three None
    when not needed."""
    dy_TD = dy_TD.contiguous()
    # g = dy[tok] @ W_down[e] (dy read through the index list); the epilogue turns it into
    # d(gate, up) (N, 2F) and the combine weights' gradient Σ_f g · h.
    d_gu_N2F, d_weights_N = gmm_swiglu_backward(dy_TD, w_down_EDF, offs_E, pre_N2F, weights_N, a_idx_N=tok_N,
                                                tiles=tiles)
    dx = d_gu = d_down = None
    if need_dw_down:
        # dW_down[e] (D, F) = Σ_r (w_r · dy[tok_r])ᵀ h_r, h recomputed from the pre-activations on the fly.
        d_down = gmm_wgrad(dy_TD, pre_N2F, offs_E, out_dtype=w_down_EDF.dtype, a_idx_N=tok_N, scale_N=weights_N,
                           b_swiglu=True, tiles=tiles)
    if need_dw_gate_up:
        # dW_gu[e] (2F, D) = Σ_r d_gu_rᵀ x[tok_r]
        d_gu = gmm_wgrad(d_gu_N2F, x_TD, offs_E, out_dtype=w_gu_E2FD.dtype, b_idx_N=tok_N, tiles=tiles)
    if need_dx:
        dx = combine_rows(d_gu_N2F, w_gu_E2FD, offs_E, tok_N, x_TD.shape[0], x_TD.dtype, slot_N=slot_N,
                          top_k=top_k, tiles=tiles)
    return dx, d_gu, d_down, d_weights_N
