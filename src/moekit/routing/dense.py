"""Dense softmax gate (Jacobs, Jordan, Nowlan & Hinton 1991, "Adaptive Mixtures of Local
Experts") — METHODS.md G1 / F1.

Legend: T tokens, D model dim, E experts.

``g = softmax(x W_rᵀ / τ)`` and ``y = Σ_e g_e f_e(x)``: every token goes to every expert. It is
the oracle for dense equivalence (top-k with k = E, expert choice with c = E, top-p with p = 1)
and the classic mixture of experts. No balancing loss: every expert already sees every token.

``top_k`` is not used (K = E); an explicit ``top_k`` other than its own count is refused.

`competitive_loss` is Jacobs et al.'s training objective for this gate (METHODS.md F1):
``L = −log Σ_i p_i exp(−‖d − o_i‖² / 2σ²)``, whose posterior responsibilities
``h_i = p_i exp(−‖d − o_i‖²/2σ²) / Σ_j (…)`` give ``∂L/∂o_i = −h_i (d − o_i)/σ²`` and
``∂L/∂logit_i = p_i − h_i``; it makes experts compete for cases instead of cooperating on
the mixture output ``‖d − Σ p_i o_i‖²``.
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.routing.base import check_no_top_k
from moekit.routing.topk import TopKRouter
from moekit.validate import check_bool, check_number

__all__ = ["DenseRouter", "competitive_loss", "competitive_responsibilities"]


def _log_scores(logits_TE, expert_out_TEO, target_TO, sigma):
    if expert_out_TEO.dim() != 3 or expert_out_TEO.shape[:2] != logits_TE.shape \
            or target_TO.shape != (expert_out_TEO.shape[0], expert_out_TEO.shape[2]):
        raise ValueError(f"need logits (T, E), expert outputs (T, E, O), targets (T, O); got "
                         f"{tuple(logits_TE.shape)}, {tuple(expert_out_TEO.shape)}, {tuple(target_TO.shape)}")
    check_number("sigma", sigma, min=0, min_open=True)
    sq_TE = (target_TO.unsqueeze(1) - expert_out_TEO).square().sum(-1)
    return torch.log_softmax(logits_TE, -1) - sq_TE / (2 * sigma ** 2)


def competitive_loss(logits_TE: torch.Tensor, expert_out_TEO: torch.Tensor, target_TO: torch.Tensor, *,
                     sigma: float = 1.0) -> torch.Tensor:
    """Mean over tokens of ``−log Σ_i softmax(logits)_i exp(−‖d − o_i‖² / 2σ²)`` (F1)."""
    return -torch.logsumexp(_log_scores(logits_TE, expert_out_TEO, target_TO, sigma), -1).mean()


def competitive_responsibilities(logits_TE: torch.Tensor, expert_out_TEO: torch.Tensor, target_TO: torch.Tensor,
                                 *, sigma: float = 1.0) -> torch.Tensor:
    """(T, E) posterior ``h_i`` of each expert for each case; rows sum to 1."""
    return torch.softmax(_log_scores(logits_TE, expert_out_TEO, target_TO, sigma), -1)


class DenseRouter(TopKRouter):
    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None, *,
                 temperature: float = 1.0, bias: bool = False):
        check_no_top_k("dense", top_k, num_experts)
        super().__init__(d_model, num_experts, num_experts, norm="raw", bias=bias)
        check_number("temperature", temperature, min=0, min_open=True)
        check_bool("bias", bias)
        self.temperature = float(temperature)

    def set_capacity(self, capacity_factor, eval_capacity_factor="same", drop_policy: str = "position") -> None:
        if capacity_factor is not None or eval_capacity_factor not in (None, "same") or drop_policy != "position":
            raise ValueError("the dense gate sends every token to every expert; it takes no capacity settings, "
                             f"got capacity_factor={capacity_factor!r}, eval_capacity_factor="
                             f"{eval_capacity_factor!r}, drop_policy={drop_policy!r}")
        super().set_capacity(None, None, "position")

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return super().logits(x_TD) / self.temperature

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, temperature={self.temperature}"
