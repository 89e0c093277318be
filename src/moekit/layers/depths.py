"""Token selection: Mixture-of-Depths — METHODS.md CC1.

Raposo, Ritter, Richards, Lillicrap, Humphreys & Santoro (2024), "Mixture-of-Depths: Dynamically
allocating compute in transformer-based language models".

Legend: B batch, S sequence positions, D model dim, K tokens processed per sequence.

A router scores every token, ``r = w·x`` (a linear D → 1 map). In training only the top
``K = ⌈capacity·S⌉`` tokens of each sequence go through the wrapped block; the others ride the
residual stream unchanged:

    y_s = x_s + g(r_s) · f(x̃)_s     if s is among the top K of its sequence
    y_s = x_s                        otherwise

where ``x̃`` are the selected tokens in ascending position order (so a causal block sees them
causally) and ``f`` is the block's residual update. Scaling by the router score puts the router
on the gradient path. The paper multiplies by the raw router weight (``score_activation="none"``);
the default ``"sigmoid"`` scales by ``σ(r)`` ∈ (0, 1), which starts every update at half strength
rather than near zero. Selection is the same either way (σ is monotone).

Top-K over the sequence looks at future tokens, so it cannot decide during autoregressive
decoding. The paper gives two causal substitutes, both here, both trained against the top-K
membership of each training pass with binary cross-entropy (the layer's ``aux_loss``):

- ``predictor=True``: a small MLP on the stop-gradient input predicts "in the top K?"; at decoding
  a token is processed when the predictor's logit is > 0 (probability > 0.5). The BCE trains the
  predictor only; the language model does not feel it.
- ``predictor=False``: the BCE is put on the router logits themselves, and a token is processed
  when ``σ(r) > 0.5``.

``forward(x, causal=True)`` uses that per-token rule (no token looks at any other), so a prefix
gets the same decisions as the full sequence. A block that needs the tokens' positions (rotary
attention in a language model) is built with ``positions=True`` and called as
``block(x_BKD, pos_BK)``: the selected tokens keep their original positions, so a processed token
attends to the earlier processed tokens at their true distances. Wrapping an MoE FFN (MoDE) needs nothing special:
the inner MoE layers keep their own ``aux_loss``, which `moekit.aux_loss(model)` adds to this
layer's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.checks import check_float_input
from moekit.layers.protocol import LayerStats, MoELayer
from moekit.ops.topk import topk_stable
from moekit.validate import check_bool, check_choice, check_instance, check_int, check_number

__all__ = ["MixtureOfDepths", "DepthStats", "capacity_tokens"]


@dataclass
class DepthStats(LayerStats):
    """What one Mixture-of-Depths pass did (detached).

    processed_per_sequence: (B,) tokens that went through the block in each sequence.
    processed_fraction: processed / non-padding tokens.
    decision_accuracy: share of non-padding tokens where the causal rule (predictor, or router
        σ(r) > 0.5) agrees with top-K membership; None after a causal pass (no top-K there).
    """

    processed_per_sequence: torch.Tensor
    processed_fraction: torch.Tensor
    decision_accuracy: Optional[torch.Tensor]


def capacity_tokens(capacity: float, seq_len: int) -> int:
    """``K = ⌈capacity · S⌉`` (at least 1). The product is rounded to 1e-6 first, so that
    ``0.1 · 30`` (3.0000000000000004 in floats) gives 3, not 4."""
    return max(1, math.ceil(round(capacity * seq_len, 6)))


class MixtureOfDepths(MoELayer):
    """``(B, S, D) → (B, S, D)``: `block` runs on the ⌈capacity·S⌉ top-scored tokens of each sequence.

    Args:
        block: a module mapping the selected tokens ``(B, K, D)`` to their residual update
            ``(B, K, D)`` (for a transformer block ``h ↦ h + attn(h) + mlp(h)`` pass the update
            ``attn(h) + mlp(h)``; for MoDE pass an MoE FFN such as `moekit.MoE`).
        d_model: D.
        capacity: fraction c ∈ (0, 1] of each sequence processed in training (the paper uses 0.125).
        predictor: train an auxiliary MLP for causal decisions (True) or put the auxiliary BCE
            on the router itself (False); see the module docstring.
        predictor_hidden: hidden width of the predictor MLP (default D); only with predictor=True.
        aux_loss_coef: weight of the BCE of the causal rule against top-K membership.
        score_activation: ``"sigmoid"`` (default) or ``"none"`` (the raw router weight, as in
            the paper) applied to the router logit before it scales the block's update.
        positions: call ``block(x_BKD, pos_BK)`` with the (B, K) int64 sequence positions of the
            selected tokens (ascending per sequence), for blocks with positional encodings.

    After a call: ``last_selected`` (B, S) bool is the processed-token mask, ``last_scores``
    (B, S) the router logits, ``aux_loss`` the weighted BCE (zero after a causal pass) and
    ``last_stats`` a `DepthStats`.
    """

    def __init__(self, block: nn.Module, *, d_model: int, capacity: float, predictor: bool = True,
                 predictor_hidden: Optional[int] = None, aux_loss_coef: float = 0.01,
                 score_activation: str = "sigmoid", positions: bool = False):
        super().__init__()
        check_instance("block", block, nn.Module)
        self.d_model = check_int("d_model", d_model, min=1)
        self.capacity = check_number("capacity", capacity, min=0.0, max=1.0, min_open=True)
        self.use_predictor = check_bool("predictor", predictor)
        if predictor_hidden is not None and not predictor:
            raise ValueError("predictor_hidden applies to predictor=True only, "
                             f"got predictor_hidden={predictor_hidden!r}"
                             " with predictor=False")
        hidden = check_int("predictor_hidden", d_model if predictor_hidden is None else predictor_hidden, min=1)
        self.aux_loss_coef = check_number("aux_loss_coef", aux_loss_coef, min=0.0)
        self.score_activation = check_choice("score_activation", score_activation, ("sigmoid", "none"))
        self.positions = check_bool("positions", positions)
        self.block = block
        self.router = nn.Linear(d_model, 1, bias=False)
        # The predictor reads a stop-gradient copy of x: it learns to imitate the router, never steers it.
        self.predictor = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1)) \
            if predictor else None
        self.last_selected: Optional[torch.Tensor] = None
        self.last_scores: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------
    def router_logits(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """(B, S) router logits ``w·x``, in float32 (float64 for float64 inputs)."""
        dt = torch.promote_types(torch.float32, x_BSD.dtype)
        return F.linear(x_BSD.to(dt), self.router.weight.to(dt)).squeeze(-1)

    def decision_logits(self, x_BSD: torch.Tensor, r_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, S) logits of the causal rule, one token at a time: the predictor's on the
        stop-gradient input, or the router's own (`r_BS` when given)."""
        if self.predictor is None:
            return self.router_logits(x_BSD) if r_BS is None else r_BS
        p = next(self.predictor.parameters())
        return self.predictor(x_BSD.detach().to(p.dtype)).squeeze(-1).to(torch.promote_types(torch.float32, p.dtype))

    def causal_decisions(self, x_BSD: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, S) bool: the tokens a causal pass processes (decision logit > 0, padding never)."""
        sel = self.decision_logits(x_BSD) > 0
        return sel if mask is None else sel & mask

    def topk_selection(self, r_BS: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, K) positions of the top K router logits per sequence, ascending; ties to the lower
        position. Padding scores −inf, so it is picked only when a sequence has fewer than K tokens."""
        K = capacity_tokens(self.capacity, r_BS.shape[1])
        scores = r_BS if mask is None else r_BS.masked_fill(~mask, -math.inf)
        _, idx_BK = topk_stable(scores, K)
        return idx_BK.sort(dim=1).values

    def _check(self, x, mask) -> None:
        check_float_input(x, self.d_model)
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, S, {self.d_model}), got {tuple(x.shape)}")
        if mask is not None:
            check_instance("mask", mask, torch.Tensor)
            if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
                raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:2])}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")

    def _run_block(self, x_BSD, idx_BK, valid_BK, gate_BS) -> torch.Tensor:
        """x plus the scaled update of the block on the tokens at `idx_BK` (kept where `valid_BK`)."""
        B, K = idx_BK.shape
        D = self.d_model
        idx_BKD = idx_BK[..., None].expand(B, K, D)
        x_BKD = x_BSD.gather(1, idx_BKD)
        upd_BKD = self.block(x_BKD, idx_BK) if self.positions else self.block(x_BKD)
        if not isinstance(upd_BKD, torch.Tensor) or upd_BKD.shape != (B, K, D):
            got = tuple(upd_BKD.shape) if isinstance(upd_BKD, torch.Tensor) else type(upd_BKD).__name__
            raise ValueError(f"block must map (B, K, D) = {(B, K, D)} to the same shape, got {got}")
        upd_BKD = gate_BS.gather(1, idx_BK)[..., None].to(upd_BKD.dtype) * upd_BKD
        # where, not a product: a padding row whose update is inf / NaN must still add exactly 0.
        upd_BKD = torch.where(valid_BK[..., None], upd_BKD, 0).to(x_BSD.dtype)
        return x_BSD.scatter_add(1, idx_BKD, upd_BKD)

    def forward(self, x: torch.Tensor, *, mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        """``(B, S, D) → (B, S, D)`` in x's dtype.

        mask: (B, S) bool, False for padding (never processed, not in the loss or statistics).
        causal: select by the per-token causal rule instead of top-K over the sequence (decoding).
        """
        self._check(x, mask)
        check_bool("causal", causal)
        B, S, _ = x.shape
        valid_BS = torch.ones(B, S, dtype=torch.bool, device=x.device) if mask is None else mask
        r_BS = self.router_logits(x)
        gate_BS = torch.sigmoid(r_BS) if self.score_activation == "sigmoid" else r_BS
        zero = torch.zeros((), device=x.device, dtype=r_BS.dtype)
        if B == 0 or S == 0:
            sel_BS = valid_BS.clone()
            y = x.clone()
            accuracy = None
            self.aux_loss = zero
        elif causal:
            sel_BS = self.causal_decisions(x, mask)
            counts_B = sel_BS.sum(1)
            K = int(counts_B.max())                 # a host sync: the processed length varies per sequence
            if K == 0:
                y = x.clone()
            else:
                # Selected positions first, in ascending order; the rest fill up to K after them
                # (a causal block never lets them reach the selected tokens) and are discarded.
                pos_S = torch.arange(S, device=x.device)
                idx_BK = torch.where(sel_BS, pos_S, pos_S + S).argsort(dim=1)[:, :K]
                valid_BK = torch.arange(K, device=x.device) < counts_B[:, None]
                y = self._run_block(x, idx_BK, valid_BK, gate_BS)
            accuracy = None
            self.aux_loss = zero
        else:
            idx_BK = self.topk_selection(r_BS, mask)
            valid_BK = valid_BS.gather(1, idx_BK)
            y = self._run_block(x, idx_BK, valid_BK, gate_BS)
            sel_BS = torch.zeros_like(valid_BS).scatter(1, idx_BK, valid_BK)
            d_BS = self.decision_logits(x, r_BS)
            target_BS = sel_BS.to(d_BS.dtype)
            n = valid_BS.sum().clamp_min(1)
            if self.aux_loss_coef > 0:
                bce = F.binary_cross_entropy_with_logits(d_BS, target_BS, reduction="none")
                self.aux_loss = self.aux_loss_coef * torch.where(valid_BS, bce, 0).sum() / n
            else:
                self.aux_loss = zero
            accuracy = (((d_BS.detach() > 0) == sel_BS) & valid_BS).sum() / n
        counts_B = sel_BS.sum(1)
        self.last_selected, self.last_scores = sel_BS, r_BS.detach()
        self.last_stats = DepthStats(processed_per_sequence=counts_B,
                                     processed_fraction=counts_B.sum() / valid_BS.sum().clamp_min(1),
                                     decision_accuracy=accuracy)
        return y

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, capacity={self.capacity}, predictor={self.use_predictor}, "
                f"aux_loss_coef={self.aux_loss_coef}, score_activation={self.score_activation!r}"
                + (", positions=True" if self.positions else ""))
