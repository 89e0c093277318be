"""Soft MoE: experts process weighted averages of tokens ("slots") — METHODS.md G9.

Puigcerver, Riquelme, Mustafa & Houlsby (2023/ICLR 2024), "From Sparse to Soft Mixtures of
Experts".

Legend: B sequences, M tokens per sequence, D model dim, E experts, P slots per expert,
S = E·P slots.

Per sequence ``X ∈ R^{M×D}`` and slot parameters ``Φ ∈ R^{D×S}``:

    L = X Φ                                  (M, S) logits
    Disp = softmax over tokens of L          each slot column sums to 1 over the M tokens
    X̃ = Dispᵀ X                              (S, D) slot inputs (convex mixes of tokens)
    Ỹ_s = f_{⌊s/P⌋}(X̃_s)                     slot s runs on expert ⌊s/P⌋
    Comb = softmax over slots of L           each token row sums to 1 over the S slots
    Y = Comb Ỹ                               (M, D)

With ``normalize=True`` (the paper's choice for large D, our default) the token rows of X
and the columns of Φ are L2-normalised and the logits multiplied by a learnable scalar
(initialised to 1), so the logits no longer grow with ``‖x‖`` or D.

No token is dropped and every expert sees exactly ``B·P`` rows whatever M is: the expert
FLOPs depend on the number of slots, not on how tokens would have been routed. The slots run
through an `ExpertBank` (any backend), grouped by expert.

Causality: Soft MoE is *not* causal — every slot averages all M tokens, so token t's output
depends on tokens after t. A causal variant would have to recompute each slot from every
prefix (one expert evaluation per slot per position, i.e. M times the cost), which removes
the method's point; the paper leaves autoregressive decoding open. So no causal mode is
offered: the layer sets ``causal_safe = False`` (the attribute routers use) for models to
refuse it in decoders, and it is meant for encoders (ViT, as in the paper).

A padding ``mask`` (B, M) removes padded tokens from the dispatch softmax (they feed no slot)
and zeroes their output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import ExpertBank
from moekit.experts.build import resolve_experts
from moekit.layers.checks import check_float_input
from moekit.layers.protocol import LayerStats, MoELayer
from moekit.ops.backends import check_backend_name
from moekit.validate import check_bool, check_int

__all__ = ["SoftMoE", "SoftMoEStats"]


@dataclass
class SoftMoEStats(LayerStats):
    """Detached statistics of one Soft MoE forward pass.

    slots_per_expert: (E,) slots each expert ran (= B·P, the same for every expert).
    dispatch_entropy: mean over slots of the entropy (nats) of its weights over tokens;
        ``log M`` means a slot averages all tokens uniformly, 0 means it copies one token.
    combine_entropy: mean over tokens of the entropy of its weights over slots.
    max_dispatch_weight: mean over slots of the largest dispatch weight.
    num_tokens: unmasked tokens.
    num_slots: S · B.
    """

    slots_per_expert: torch.Tensor
    dispatch_entropy: torch.Tensor
    combine_entropy: torch.Tensor
    max_dispatch_weight: torch.Tensor
    num_tokens: int
    num_slots: int



def _entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


class SoftMoE(MoELayer):
    """Soft MoE layer ``(B, M, D) → (B, M, D)`` (also ``(M, D)`` for one sequence).

    Args:
        d_model: D.
        num_experts: E.
        slots_per_expert: P (default 1; the paper picks E·P ≈ M or M/2).
        d_hidden: expert hidden size F (default 4·D for ``"mlp"``, as in ViT).
        expert: expert type for a bank built here (``"mlp"`` default, or a GLU variant).
        experts: an `ExpertBank` to use instead (then ``d_hidden``/``expert`` must be unset).
        activation: override the experts' activation.
        normalize: L2-normalise tokens and Φ columns and scale logits by a learnable scalar.
        backend: expert backend (``"auto"`` | ``"eager"`` | ``"grouped_mm"`` …).
    """

    causal_safe = False

    def __init__(self, *, d_model: int, num_experts: int, slots_per_expert: int = 1,
                 d_hidden: Optional[int] = None, expert: Optional[str] = None,
                 experts: Optional[ExpertBank] = None, activation: Optional[str] = None,
                 normalize: bool = True, backend: str = "auto"):
        super().__init__()
        for name, v in (("d_model", d_model), ("num_experts", num_experts), ("slots_per_expert", slots_per_expert)):
            check_int(name, v, min=1)
        check_bool("normalize", normalize)
        check_backend_name(backend)
        self.d_model, self.num_experts, self.slots_per_expert = d_model, num_experts, slots_per_expert
        self.num_slots = num_experts * slots_per_expert
        self.normalize, self.backend = normalize, backend

        self.experts = resolve_experts(experts, expert=expert, d_hidden=d_hidden, activation=activation,
                                       num_experts=num_experts, d_model=d_model, default_expert="mlp",
                                       default_hidden=lambda d, e: 4 * d)    # ViT's 4·D MLP
        allowed = getattr(self.experts, "supported_backends", None)
        if allowed is not None and backend not in allowed:
            raise ValueError(f"{type(self.experts).__name__} supports backend in {tuple(allowed)}, got {backend!r}")

        self.phi_DS = nn.Parameter(torch.empty(d_model, self.num_slots))
        self.scale = nn.Parameter(torch.ones(())) if normalize else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LeCun normal: unit-variance logits for unit-variance tokens when normalize=False.
        nn.init.normal_(self.phi_DS, std=1.0 / math.sqrt(self.d_model))
        if self.scale is not None:
            nn.init.ones_(self.scale)

    # ----------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        check_float_input(x, self.d_model)
        if x.dim() not in (2, 3):
            raise ValueError(f"x must have shape (B, M, {self.d_model}) or (M, {self.d_model}), "
                             f"got {tuple(x.shape)}")
        if x.shape[-2] == 0:
            raise ValueError(f"x must hold at least one token per sequence, got shape {tuple(x.shape)}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != x.shape[:-1]:
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:-1])}, got {got}")
            if not bool(mask.any(-1).all()):
                raise ValueError("mask must keep at least one token in every sequence (a slot averages tokens)")

    def logits(self, x_BMD: torch.Tensor) -> torch.Tensor:
        """(B, M, S) float32 token-slot logits."""
        x = x_BMD.float()
        phi = self.phi_DS.float()
        if self.normalize:
            x = F.normalize(x, dim=-1)
            phi = self.scale.float() * F.normalize(phi, dim=0)
        return x @ phi

    def dispatch_combine(self, x_BMD: torch.Tensor, mask_BM: Optional[torch.Tensor] = None):
        """``(dispatch_BMS, combine_BMS)``: dispatch sums to 1 over tokens (dim 1), combine over slots (dim 2)."""
        logits_BMS = self.logits(x_BMD)
        disp_logits = logits_BMS if mask_BM is None else logits_BMS.masked_fill(~mask_BM[..., None], float("-inf"))
        dispatch_BMS = torch.softmax(disp_logits, dim=1)
        combine_BMS = torch.softmax(logits_BMS, dim=2)
        return dispatch_BMS, combine_BMS

    def forward(self, x: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, M, D) → (B, M, D)`` (or ``(M, D) → (M, D)``) in x's dtype."""
        self._check(x, mask)
        squeeze = x.dim() == 2
        x_BMD = x.unsqueeze(0) if squeeze else x
        mask_BM = None if mask is None else (mask.unsqueeze(0) if squeeze else mask)
        B, M, D = x_BMD.shape
        E, P = self.num_experts, self.slots_per_expert

        dispatch_BMS, combine_BMS = self.dispatch_combine(x_BMD, mask_BM)
        slots_BSD = torch.einsum("bms,bmd->bsd", dispatch_BMS.to(x.dtype), x_BMD)
        # Rows grouped by expert for the bank: expert e gets its P slots of every sequence.
        rows_ND = slots_BSD.reshape(B, E, P, D).transpose(0, 1).reshape(E * B * P, D)
        counts_E = torch.full((E,), B * P, dtype=torch.long, device=x.device)
        out_ND = self.experts(rows_ND, counts_E, backend=self.backend)
        out_BSD = out_ND.reshape(E, B, P, D).transpose(0, 1).reshape(B, E * P, D)
        y_BMD = torch.einsum("bms,bsd->bmd", combine_BMS.to(out_BSD.dtype), out_BSD)
        if mask_BM is not None:
            y_BMD = y_BMD * mask_BM[..., None].to(y_BMD.dtype)

        self.aux_loss = torch.zeros((), device=x.device)
        self.last_stats = self._stats(dispatch_BMS, combine_BMS, mask_BM, B)
        y = y_BMD.to(x.dtype)
        return y.squeeze(0) if squeeze else y

    @torch.no_grad()
    def _stats(self, dispatch_BMS, combine_BMS, mask_BM, B: int) -> SoftMoEStats:
        comb_ent_BM = _entropy(combine_BMS, 2)
        n_tokens = combine_BMS.shape[0] * combine_BMS.shape[1] if mask_BM is None else int(mask_BM.sum())
        comb_ent = comb_ent_BM.mean() if mask_BM is None else comb_ent_BM[mask_BM].mean()
        return SoftMoEStats(
            slots_per_expert=torch.full((self.num_experts,), B * self.slots_per_expert, dtype=torch.long),
            dispatch_entropy=_entropy(dispatch_BMS, 1).mean(),
            combine_entropy=comb_ent,
            max_dispatch_weight=dispatch_BMS.amax(1).mean(),
            num_tokens=n_tokens,
            num_slots=B * self.num_slots,
        )

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, slots_per_expert="
                f"{self.slots_per_expert}, normalize={self.normalize}, backend={self.backend!r}")
