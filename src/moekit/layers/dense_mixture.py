"""Dense mixtures: every expert on every token, weighted by a softmax gate — METHODS.md G1, F1, F4.

Legend: T tokens, D model dim, E experts, N = E·T rows.

- **G1 / F1** — Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive Mixtures of Local Experts":
  ``g = softmax(x W_r / τ)``, ``y = Σ_e g_e f_e(x)`` with all E experts evaluated. It is the
  oracle every sparse router is checked against (contract 4: top-k with k = E, no capacity,
  renorm, equals this layer).
- **F4** — Eigen, Ranzato & Sutskever (2013/ICLR-W 2014), "Learning Factored Representations
  in a Deep Mixture of Experts": dense mixtures stacked, ``z = Σ_i g¹_i(x) f¹_i(x)``,
  ``y = Σ_j g²_j(z) f²_j(z)`` — `StackedDenseMoE`.

`DenseMoE` runs the experts through an `ExpertBank` (every token copied to every expert, so
the bank sees E equal segments of T rows: one grouped matmul per projection) and keeps the
gate in float32. ``gate_weight`` (E, D) uses the same init as `moekit.routing.TopKRouter`, so
the router of a sparse layer can be copied in to compare the two.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import ExpertBank
from moekit.experts.build import resolve_experts
from moekit.layers.checks import check_float_input
from moekit.layers.moe import default_hidden
from moekit.layers.protocol import MixtureStats, MoELayer
from moekit.ops.backends import check_backend_name
from moekit.validate import check_bool, check_instance, check_int, check_number

__all__ = ["DenseMoE", "StackedDenseMoE"]


class DenseMoE(MoELayer):
    """Dense softmax-gated mixture ``(..., D) → (..., D)``.

    Args:
        d_model: D.
        num_experts: E.
        d_hidden: expert hidden size (default as in `moekit.MoE`).
        expert: ``"swiglu"`` (default) | ``"geglu"`` | ``"reglu"`` | ``"mlp"``.
        experts: an `ExpertBank` instance instead (then expert/d_hidden/activation unset).
        activation: override the experts' activation.
        temperature: τ > 0 of the gate softmax.
        backend: expert backend.
    """

    def __init__(self, *, d_model: int, num_experts: int, d_hidden: Optional[int] = None,
                 expert: Optional[str] = None, experts: Optional[ExpertBank] = None,
                 activation: Optional[str] = None, temperature: float = 1.0, backend: str = "auto"):
        super().__init__()
        for name, v in (("d_model", d_model), ("num_experts", num_experts)):
            check_int(name, v, min=1)
        check_number("temperature", temperature, min=0, min_open=True)
        check_backend_name(backend)
        self.d_model, self.num_experts = d_model, num_experts
        self.temperature, self.backend = float(temperature), backend
        self.experts = resolve_experts(experts, expert=expert, d_hidden=d_hidden, activation=activation,
                                       num_experts=num_experts, d_model=d_model, default_expert="swiglu",
                                       default_hidden=default_hidden)
        allowed = getattr(self.experts, "supported_backends", None)
        if allowed is not None and backend not in allowed:
            raise ValueError(f"{type(self.experts).__name__} supports backend in {tuple(allowed)}, got {backend!r}")
        self.gate_weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = math.sqrt(0.1 / self.d_model)     # Switch's router init, as TopKRouter
        nn.init.trunc_normal_(self.gate_weight, std=std, a=-2 * std, b=2 * std)

    def gate(self, x_TD: torch.Tensor) -> torch.Tensor:
        """(T, E) float32 ``softmax(x W_rᵀ / τ)``."""
        return torch.softmax(F.linear(x_TD.float(), self.gate_weight.float()) / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_input(x, self.d_model)
        x_TD = x.reshape(-1, self.d_model)
        T, E = x_TD.shape[0], self.num_experts
        g_TE = self.gate(x_TD)
        rows_ND = x_TD.repeat(E, 1)                                   # expert-major: E segments of T rows
        counts_E = torch.full((E,), T, dtype=torch.long, device=x.device)
        out_ETD = self.experts(rows_ND, counts_E, backend=self.backend).reshape(E, T, self.d_model)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        y_TD = torch.einsum("te,etd->td", g_TE.to(acc), out_ETD.to(acc))
        self.aux_loss = torch.zeros((), device=x.device)
        with torch.no_grad():
            ent = -(g_TE * g_TE.clamp_min(1e-30).log()).sum(-1).mean() if T else g_TE.new_zeros(())
            self.last_stats = MixtureStats(mean_gate=g_TE.mean(0) if T else g_TE.new_zeros(E), gate_entropy=ent)
        return y_TD.to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, temperature={self.temperature}, "
                f"backend={self.backend!r}")


class StackedDenseMoE(nn.Module):
    """Eigen et al.'s deep mixture: `DenseMoE` layers applied in sequence (``x → z → y``).

    Args:
        d_model: D.
        num_experts: experts per layer, one int per layer (e.g. ``[4, 4]``).
        residual: add each layer's input to its output (off in the paper).
        **layer_kwargs: passed to every `DenseMoE` (d_hidden, expert, temperature, backend …).
    """

    def __init__(self, *, d_model: int, num_experts: Sequence[int], residual: bool = False, **layer_kwargs):
        super().__init__()
        check_instance("num_experts", num_experts, (list, tuple), what="a list of expert counts, one per layer")
        num_experts = [check_int(f"num_experts[{i}]", e, min=1) for i, e in enumerate(num_experts)]
        if not num_experts:
            raise ValueError("num_experts must list the experts of at least one layer, got []")
        check_bool("residual", residual)
        if "experts" in layer_kwargs:
            raise ValueError("StackedDenseMoE builds one bank per layer; experts= is not accepted")
        self.residual = bool(residual)
        self.layers = nn.ModuleList(DenseMoE(d_model=d_model, num_experts=e, **layer_kwargs) for e in num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x) if self.residual else layer(x)
        return x
