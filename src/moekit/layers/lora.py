"""Parameter-efficient experts over a frozen linear layer: MoLoRA and MoV — METHODS.md X5.

Zadouri, Üstün, Ahmadian, Ermiş, Locatelli & Hooker (2023/ICLR 2024), "Pushing Mixture of
Experts to the Limit: Extremely Parameter Efficient MoE for Instruction Tuning".

Legend: T tokens, I in features, O out features, E experts, R LoRA rank, K top-k.

- **MoLoRA**: ``y = W0 x + b0 + (α/R) Σ_e g_e(x) B_e A_e x`` with the base ``W0, b0`` frozen,
  ``A_e ∈ R^{R×I}`` (Kaiming-uniform like LoRA) and ``B_e ∈ R^{O×R}`` zero-initialised, so the
  wrapped layer equals the base layer at initialisation.
- **MoV** (mixture of (IA)³ vectors): ``y = (Σ_e g_e(x) l_e) ⊙ (W0 x + b0)`` with
  ``l_e ∈ R^O`` initialised to ones (identity at initialisation); the soft merge of the
  vectors costs one vector per token whatever E is.

Gate: ``g = softmax(x W_r)`` over all E experts (the paper's dense soft merging), or with
``top_k`` the K largest renormalised to sum to 1 (ties to the lowest index). The router runs
in float32. LoRA experts are tiny (``R·(I+O)`` each), so all E low-rank products are computed
as two batched einsums and the gate zeros the unselected ones; a sparse dispatch would save
little at these sizes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.protocol import MoELayer, mixture_stats
from moekit.ops.topk import topk_stable
from moekit.validate import check_int, check_number

__all__ = ["MoLoRALinear", "MoVLinear", "soft_gate"]


def soft_gate(logits_TE: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """(T, E) gate: softmax, or the top-k softmax probabilities renormalised (zeros elsewhere)."""
    probs = torch.softmax(logits_TE.float(), dim=-1)
    if top_k is None or top_k == probs.shape[-1]:
        return probs
    vals, idx = topk_stable(probs, top_k)
    return torch.zeros_like(probs).scatter(-1, idx, vals / vals.sum(-1, keepdim=True))


class _AdapterBase(MoELayer):
    def _setup(self, base: nn.Linear, num_experts: int, top_k: Optional[int]) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        check_int("num_experts", num_experts, min=1)
        check_int("top_k", top_k, min=1, max=num_experts, allow_none=True)        # None: dense
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(self.in_features, num_experts, bias=False)
        self.last_gates: Optional[torch.Tensor] = None

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x)}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension in_features={self.in_features}, got shape {tuple(x.shape)}")

    def _route(self, x: torch.Tensor):
        """Check x, flatten it to (T, I) and gate it; records the protocol's statistics."""
        self._check(x)
        x_TI = x.reshape(-1, self.in_features)
        gates_TE = self.gates(x_TI)
        self.last_gates = gates_TE.detach()
        self.last_stats = mixture_stats(gates_TE)
        self.aux_loss = torch.zeros((), device=x.device)
        return x_TI, gates_TE

    def gates(self, x_TI: torch.Tensor) -> torch.Tensor:
        """(T, E) float32 gate values."""
        return soft_gate(F.linear(x_TI.float(), self.router.weight.float()), self.top_k)


class MoLoRALinear(_AdapterBase):
    """A frozen ``nn.Linear`` plus a mixture of E LoRA adapters: ``(..., I) → (..., O)``.

    Args:
        base: the linear layer to adapt (its parameters are frozen in place).
        num_experts: E.
        rank: R.
        top_k: None for dense soft gating over all E (the paper), or K.
        alpha: LoRA scale numerator (default R, i.e. scale 1).
        dropout: dropout on the adapters' input.
    """

    def __init__(self, base: nn.Linear, *, num_experts: int, rank: int, top_k: Optional[int] = None,
                 alpha: Optional[float] = None, dropout: float = 0.0):
        super().__init__()
        self._setup(base, num_experts, top_k)
        check_int("rank", rank, min=1)
        check_number("alpha", alpha, min=0, min_open=True, allow_none=True)
        check_number("dropout", dropout, min=0, max=1, max_open=True)
        self.rank = rank
        self.scaling = (rank if alpha is None else float(alpha)) / rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features))   # (E, R, I)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank))  # (E, O, R)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for e in range(self.num_experts):   # LoRA's A init: nn.Linear's Kaiming-uniform(a=√5)
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        nn.init.normal_(self.router.weight, std=1.0 / math.sqrt(self.in_features))

    def delta(self, x_TI: torch.Tensor, gates_TE: torch.Tensor) -> torch.Tensor:
        """``(α/R) Σ_e g_e B_e A_e x`` (T, O)."""
        a, b = self.lora_A.to(x_TI.dtype), self.lora_B.to(x_TI.dtype)
        h_TER = torch.einsum("ti,eri->ter", self.dropout(x_TI), a)
        h_TER = h_TER * gates_TE.to(x_TI.dtype)[..., None]
        return self.scaling * torch.einsum("ter,eor->to", h_TER, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TI, gates_TE = self._route(x)
        y_TO = self.base(x_TI) + self.delta(x_TI, gates_TE)
        return y_TO.reshape(*x.shape[:-1], self.out_features)

    def merged_weight(self, gates_E: torch.Tensor) -> torch.Tensor:
        """(O, I) ``W0 + (α/R) Σ_e g_e B_e A_e`` for a fixed gate vector (e.g. to export one task)."""
        if gates_E.shape != (self.num_experts,):
            raise ValueError(f"gates must have shape ({self.num_experts},), got {tuple(gates_E.shape)}")
        d = torch.einsum("e,eor,eri->oi", gates_E.to(self.lora_A.dtype), self.lora_B, self.lora_A)
        return self.base.weight + self.scaling * d

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts="
                f"{self.num_experts}, rank={self.rank}, top_k={self.top_k}, scaling={self.scaling}")


class MoVLinear(_AdapterBase):
    """A frozen ``nn.Linear`` scaled by a mixture of E (IA)³ vectors: ``(..., I) → (..., O)``."""

    def __init__(self, base: nn.Linear, *, num_experts: int, top_k: Optional[int] = None):
        super().__init__()
        self._setup(base, num_experts, top_k)
        self.ia3 = nn.Parameter(torch.ones(num_experts, self.out_features))        # (E, O)
        nn.init.normal_(self.router.weight, std=1.0 / math.sqrt(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TI, gates_TE = self._route(x)
        scale_TO = gates_TE.to(x_TI.dtype) @ self.ia3.to(x_TI.dtype)       # Σ_e g_e l_e, one merge per token
        y_TO = scale_TO * self.base(x_TI)
        return y_TO.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts="
                f"{self.num_experts}, top_k={self.top_k}")
