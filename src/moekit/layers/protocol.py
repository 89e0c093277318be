"""The protocol every MoE-like layer speaks, and the one type of its statistics.

Legend: E experts.

A layer is MoE-like when it subclasses `MoELayer`. After each forward pass it holds

- ``aux_loss``: a scalar tensor with gradient, the weighted sum of its balancing terms
  (zero when it has none);
- ``last_stats``: a `LayerStats` (detached statistics of that pass) or None before the first.

`moe_layers(model)` finds them, `aux_loss(model)` sums their losses; expert parallelism, the
routing schedules and the recipes use this protocol rather than any private flag. Wrappers
that hold MoE layers (e.g. `ResidualMoE`) are not MoE layers themselves, so nothing is
counted twice.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

__all__ = ["LayerStats", "MixtureStats", "MoELayer", "moe_layers", "aux_loss", "gate_entropy", "mixture_stats"]


class LayerStats:
    """Base of every layer's statistics (each a dataclass): read as ``s.field`` or ``s["field"]``;
    `as_dict` gives plain numbers and lists for JSON logs."""

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def as_dict(self) -> dict:
        out = {}
        for k in self.keys():
            v = getattr(self, k)
            out[k] = v.tolist() if isinstance(v, torch.Tensor) else v
        return out


@dataclasses.dataclass
class MixtureStats(LayerStats):
    """Statistics of a layer that mixes experts with soft gates.

    mean_gate: (E,) mean gate weight per expert over the examples or tokens routed.
    gate_entropy: mean entropy of the gate distribution (nats).
    """

    mean_gate: torch.Tensor
    gate_entropy: torch.Tensor


def gate_entropy(g: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``−Σ g log g`` (nats) of a (..., E) gate tensor."""
    g = g.detach().float()
    return -(g * g.clamp_min(1e-30).log()).sum(-1).mean() if g.numel() else g.new_zeros(())


def mixture_stats(g_RE: torch.Tensor, *, normalize: bool = False) -> MixtureStats:
    """`MixtureStats` of gate rows (R, E); `normalize` divides each row by its sum first (for
    independent sigmoid gates, whose entropy is then that of the normalised mixture)."""
    g = g_RE.detach().float().reshape(-1, g_RE.shape[-1])
    if normalize:
        g = g / g.sum(-1, keepdim=True).clamp_min(1e-30)
    return MixtureStats(mean_gate=g.float().mean(0) if g.shape[0] else g.new_zeros(g.shape[-1]).float(),
                        gate_entropy=gate_entropy(g))


class MoELayer(nn.Module):
    """Base class of every MoE-like layer (see the module docstring)."""

    aux_loss: torch.Tensor
    last_stats: Optional[LayerStats]

    def __init__(self):
        super().__init__()
        self.aux_loss = torch.zeros(())
        self.last_stats = None


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE-like layer in `model` (itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``aux_loss`` over every MoE layer of `model` (0 if none ran)."""
    total = None
    for m in moe_layers(model):
        loss = m.aux_loss
        total = loss if total is None else total + loss.to(total.device)
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total
