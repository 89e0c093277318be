"""Multi-gate mixtures for multi-task learning: shared-bottom, OMoE, MMoE, CGC and PLE — METHODS.md MT1, MT2.

Legend: B examples, I input dim, H expert output dim, E experts, K tasks.

- **MMoE** — Ma, Zhao, Yi, Chen, Hong & Chi (2018), KDD, "Modeling Task Relationships in
  Multi-task Learning with Multi-gate Mixture-of-Experts". E shared experts ``f_i: R^I → R^H``
  (one ReLU layer each); one softmax gate per task, ``g^k(x) = softmax(W_k x)`` (E,);
  ``f^k(x) = Σ_i g^k(x)_i f_i(x)``; ``y_k = h^k(f^k(x))`` with a task tower ``h^k``.
  **OMoE** is the same with one gate shared by every task; **shared-bottom** is one expert.
- **CGC / PLE** — Tang, Liu, Zhao & Gong (2020), RecSys, "Progressive Layered Extraction".
  A CGC extraction level holds ``S`` shared experts and ``n`` task-specific experts per task;
  task k's gate mixes only ``[task-k experts ; shared experts]`` (n + S weights) so it can never
  weight another task's specific experts; in non-final levels a shared gate mixes *all*
  ``K·n + S`` experts to give the next level's shared input. PLE stacks several levels (each
  task's next input is its own gated output); CGC is PLE with one level.

Experts are evaluated densely (every expert on every example, as in the papers), with the
weights of an expert group stacked ``(E, H, I)`` so a group is one batched matmul.

`make_mmoe_synthetic` is the MMoE paper's synthetic generator with controllable task
correlation (METHODS.md §15 R4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.base import activation_fn
from moekit.layers.checks import check_float_input
from moekit.layers.protocol import LayerStats, MoELayer
from moekit.validate import check_bool, check_int, check_number

__all__ = ["MMoE", "SharedBottom", "CGC", "PLE", "ExtractionLevel", "ExpertGroup", "TaskTower",
           "GateStats", "MMoESynthetic", "make_mmoe_synthetic"]


def _check_x(x: torch.Tensor, d_in: int) -> None:
    check_float_input(x, d_in, "d_model")


class ExpertGroup(nn.Module):
    """E one-layer experts ``act(W_e x + b_e)`` with stacked weights ``(E, H, I)``: ``(B, I) → (B, E, H)``."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, *, activation: str = "relu"):
        super().__init__()
        check_int("num_experts", num_experts, min=1)
        check_int("d_in", d_in, min=1)
        check_int("d_out", d_out, min=1)
        self.num_experts, self.d_in, self.d_out = num_experts, d_in, d_out
        self.activation = activation
        self.act = activation_fn(activation)
        self.weight = nn.Parameter(torch.empty(num_experts, d_out, d_in))
        self.bias = nn.Parameter(torch.empty(num_experts, d_out))
        bound = 1.0 / math.sqrt(d_in)     # nn.Linear's default range, per expert
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x_BI: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(x_BI.dtype), self.bias.to(x_BI.dtype)
        return self.act(torch.einsum("bi,ehi->beh", x_BI, w) + b)          # (B, E, H)

    def expert_forward(self, i: int, x_BI: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(x_BI, self.weight[i].to(x_BI.dtype), self.bias[i].to(x_BI.dtype)))


class TaskTower(nn.Module):
    """A task head: ``Linear(H, d_out)``, or ``Linear(H, hidden) → ReLU → Linear(hidden, d_out)``."""

    def __init__(self, d_in: int, d_out: int, hidden: Optional[int] = None):
        super().__init__()
        check_int("d_in", d_in, min=1)
        check_int("d_out", d_out, min=1)
        check_int("tower_hidden", hidden, min=1, allow_none=True)
        if hidden is None:
            self.net = nn.Linear(d_in, d_out)
        else:
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


@dataclass
class GateStats(LayerStats):
    """Detached per-task gate statistics: ``mean_gate`` (K, E') and ``gate_entropy`` (K,) in nats.

    E' is the gate's width (E for MMoE; n + S per task of the last CGC level).
    """

    mean_gate: torch.Tensor
    gate_entropy: torch.Tensor



def _gate_stats(gates: Sequence[torch.Tensor]) -> GateStats:
    with torch.no_grad():
        g = torch.stack([gk.reshape(-1, gk.shape[-1]).float() for gk in gates])      # (K, B, E')
        ent = -(g * g.clamp_min(1e-30).log()).sum(-1).mean(-1)
        return GateStats(mean_gate=g.mean(1), gate_entropy=ent)


class _TaskModel(nn.Module):
    """Shared bits: flattening ``(..., I)``, the zero aux loss, gate statistics."""

    def _init_common(self, d_in: int, num_tasks: int, *, d_out: int, tower_hidden: Optional[int]) -> None:
        """Check the settings every task model shares, under their public names."""
        check_int("d_model", d_in, min=1)
        check_int("num_tasks", num_tasks, min=1)
        check_int("d_out", d_out, min=1)
        check_int("tower_hidden", tower_hidden, min=1, allow_none=True)
        self.d_in = self.d_model = d_in
        self.num_tasks = num_tasks
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_gates: Optional[List[torch.Tensor]] = None
        self.last_stats: Optional[GateStats] = None

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``(..., I) →`` a list of K tensors ``(..., d_out)``, one per task."""
        _check_x(x, self.d_in)
        lead = x.shape[:-1]
        outs, gates = self._forward(x.reshape(-1, self.d_in))
        self.aux_loss = torch.zeros((), device=x.device)
        self.last_gates = [g.detach().reshape(*lead, g.shape[-1]) for g in gates]
        self.last_stats = _gate_stats(gates) if gates else None
        return [y.reshape(*lead, y.shape[-1]) for y in outs]


class SharedBottom(_TaskModel):
    """Shared-bottom baseline (Caruana 1997): one shared ReLU layer, then one tower per task."""

    def __init__(self, *, d_model: int, num_tasks: int, d_hidden: int, tower_hidden: Optional[int] = None,
                 d_out: int = 1, activation: str = "relu"):
        super().__init__()
        d_in, bottom_hidden = d_model, d_hidden
        self._init_common(d_in, num_tasks, d_out=d_out, tower_hidden=tower_hidden)
        check_int("d_hidden", bottom_hidden, min=1)
        self.bottom = ExpertGroup(1, d_in, bottom_hidden, activation=activation)
        self.towers = nn.ModuleList(TaskTower(bottom_hidden, d_out, tower_hidden) for _ in range(num_tasks))

    def _forward(self, x_BI):
        h_BH = self.bottom(x_BI)[:, 0]
        return [tower(h_BH) for tower in self.towers], []


class MMoE(MoELayer, _TaskModel):
    """Multi-gate MoE (MMoE); ``shared_gate=True`` gives OMoE (one gate for every task).

    Args:
        d_model: I, input features.
        num_experts: E shared experts.
        num_tasks: K.
        d_hidden: H, each expert's output width.
        tower_hidden: hidden width of each task tower (None: a linear tower).
        d_out: each task's output width.
        shared_gate: one gate for all tasks (OMoE).
        activation: expert activation.
    """

    def __init__(self, *, d_model: int, num_experts: int, num_tasks: int, d_hidden: int,
                 tower_hidden: Optional[int] = None, d_out: int = 1, shared_gate: bool = False,
                 activation: str = "relu"):
        d_in, expert_hidden = d_model, d_hidden
        super().__init__()
        self._init_common(d_in, num_tasks, d_out=d_out, tower_hidden=tower_hidden)
        check_int("num_experts", num_experts, min=1)
        check_int("d_hidden", expert_hidden, min=1)
        self.num_experts, self.shared_gate = num_experts, check_bool("shared_gate", shared_gate)
        self.experts = ExpertGroup(num_experts, d_in, expert_hidden, activation=activation)
        self.gates = nn.ModuleList(nn.Linear(d_in, num_experts) for _ in range(1 if shared_gate else num_tasks))
        self.towers = nn.ModuleList(TaskTower(expert_hidden, d_out, tower_hidden) for _ in range(num_tasks))

    def gate_probs(self, x_BI: torch.Tensor) -> List[torch.Tensor]:
        """K tensors (B, E): each task's softmax gate (the same tensor K times for OMoE)."""
        probs = [torch.softmax(gate(x_BI).float(), dim=-1).to(x_BI.dtype) for gate in self.gates]
        return probs * self.num_tasks if self.shared_gate else probs

    def _forward(self, x_BI):
        h_BEH = self.experts(x_BI)
        gates = self.gate_probs(x_BI)
        outs = [tower(torch.einsum("be,beh->bh", g_BE, h_BEH)) for g_BE, tower in zip(gates, self.towers)]
        return outs, gates


class ExtractionLevel(nn.Module):
    """One CGC extraction level: S shared + n specific experts per task, task gates, optional shared gate.

    ``forward(task_inputs, shared_input)`` takes K tensors (B, I) and one (B, I) and returns
    ``(task_outputs, shared_output, task_gates)``: K tensors (B, H), one (B, H) or None when
    ``shared_gate=False`` (the final level), and the K task gates (B, n + S). Task k's gate
    orders its weights ``[task-k experts ; shared experts]``.
    """

    def __init__(self, d_in: int, num_tasks: int, num_shared: int, num_specific: int, expert_hidden: int, *,
                 shared_gate: bool, activation: str = "relu"):
        super().__init__()
        check_int("num_tasks", num_tasks, min=1)
        check_int("num_shared_experts", num_shared, min=1)
        check_int("num_specific_experts", num_specific, min=0)
        self.num_tasks, self.num_shared, self.num_specific = num_tasks, num_shared, num_specific
        self.shared = ExpertGroup(num_shared, d_in, expert_hidden, activation=activation)
        self.specific = nn.ModuleList(ExpertGroup(num_specific, d_in, expert_hidden, activation=activation)
                                      for _ in range(num_tasks)) if num_specific else None
        self.task_gates = nn.ModuleList(nn.Linear(d_in, num_specific + num_shared) for _ in range(num_tasks))
        self.shared_gate = nn.Linear(d_in, num_tasks * num_specific + num_shared) if shared_gate else None

    def forward(self, task_inputs: Sequence[torch.Tensor], shared_input: torch.Tensor):
        shared_h = self.shared(shared_input)                                       # (B, S, H)
        # Task k's specific experts run on task k's own input (PLE's per-task stream).
        spec_h = [self.specific[k](task_inputs[k]) for k in range(self.num_tasks)] if self.specific else []
        outs, gates = [], []
        for k in range(self.num_tasks):
            experts_h = torch.cat([spec_h[k], shared_h], 1) if spec_h else shared_h  # (B, n + S, H)
            g = torch.softmax(self.task_gates[k](task_inputs[k]).float(), -1).to(experts_h.dtype)
            outs.append(torch.einsum("be,beh->bh", g, experts_h))
            gates.append(g)
        shared_out = None
        if self.shared_gate is not None:
            all_h = torch.cat(spec_h + [shared_h], 1)                               # (B, K·n + S, H)
            g = torch.softmax(self.shared_gate(shared_input).float(), -1).to(all_h.dtype)
            shared_out = torch.einsum("be,beh->bh", g, all_h)
        return outs, shared_out, gates


class PLE(MoELayer, _TaskModel):
    """Progressive Layered Extraction: ``num_levels`` CGC levels, then one tower per task.

    Args:
        d_model: I, input features.
        num_tasks: K.
        num_shared_experts: S per level.
        num_specific_experts: n per task per level (0 gives MMoE when ``num_levels=1``).
        d_hidden: H per level (an int for every level, or a list of ``num_levels`` ints).
        num_levels: extraction levels (the last one has no shared gate).
        tower_hidden, d_out, activation: as in `MMoE`.

    ``last_gates`` holds the final level's task gates (B, n + S).
    """

    def __init__(self, *, d_model: int, num_tasks: int, num_shared_experts: int, num_specific_experts: int,
                 d_hidden: Union[int, Sequence[int]], num_levels: int = 2,
                 tower_hidden: Optional[int] = None, d_out: int = 1, activation: str = "relu"):
        d_in, expert_hidden = d_model, d_hidden
        super().__init__()
        self._init_common(d_in, num_tasks, d_out=d_out, tower_hidden=tower_hidden)
        check_int("num_levels", num_levels, min=1)
        check_int("num_shared_experts", num_shared_experts, min=1)
        check_int("num_specific_experts", num_specific_experts, min=0)
        if isinstance(expert_hidden, (list, tuple)):
            hidden = list(expert_hidden)
            if len(hidden) != num_levels:
                raise ValueError(f"d_hidden must be an int or a list of num_levels={num_levels} ints, "
                                 f"got {len(hidden)} values")
            for i, h in enumerate(hidden):
                check_int(f"d_hidden[{i}]", h, min=1)
        else:
            hidden = [check_int("d_hidden", expert_hidden, min=1)] * num_levels
        widths = [d_in] + hidden
        self.levels = nn.ModuleList(
            ExtractionLevel(widths[i], num_tasks, num_shared_experts, num_specific_experts, widths[i + 1],
                            shared_gate=i < num_levels - 1, activation=activation)
            for i in range(num_levels))
        self.towers = nn.ModuleList(TaskTower(hidden[-1], d_out, tower_hidden) for _ in range(num_tasks))

    def _forward(self, x_BI):
        task_in, shared_in = [x_BI] * self.num_tasks, x_BI
        for level in self.levels:
            task_in, shared_in, gates = level(task_in, shared_in)
        return [tower(h) for tower, h in zip(self.towers, task_in)], gates


class CGC(PLE):
    """Customized Gate Control: PLE with a single extraction level (no shared gate)."""

    def __init__(self, *, d_model: int, num_tasks: int, num_shared_experts: int, num_specific_experts: int,
                 d_hidden: int, tower_hidden: Optional[int] = None, d_out: int = 1,
                 activation: str = "relu"):
        check_int("d_hidden", d_hidden, min=1)          # one level: one width
        super().__init__(d_model=d_model, num_tasks=num_tasks, num_shared_experts=num_shared_experts,
                         num_specific_experts=num_specific_experts, d_hidden=d_hidden, num_levels=1,
                         tower_hidden=tower_hidden, d_out=d_out, activation=activation)


# ------------------------------------------------------------------------------------------
class MMoESynthetic(NamedTuple):
    """``x`` (n, d), ``y`` (n, 2), the task weight vectors ``w`` (2, d), and the shared ``alpha``, ``beta`` (m,)."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor


def make_mmoe_synthetic(num_samples: int, *, correlation: float, d: int = 100, c: float = 1.0, m: int = 10,
                        noise_std: float = 0.1, seed: int = 0) -> MMoESynthetic:
    """Two regression tasks with controllable correlation (MMoE paper §4; METHODS.md §15 R4).

    Orthonormal ``u1, u2 ∈ R^d``; ``w1 = c·u1``; ``w2 = c·(ρ u1 + √(1−ρ²) u2)`` so that
    ``cos(w1, w2) = ρ``; ``x ~ N(0, I_d)``;
    ``y_j = w_jᵀx + Σ_{i=1..m} sin(α_i w_jᵀx + β_i) + ε_j`` with ``α_i, β_i ~ N(0, 1)`` drawn once
    and shared by both tasks, ``ε_j ~ N(0, noise_std²)`` (R4: variance 0.01). Deterministic in `seed`.
    """
    check_int("num_samples", num_samples, min=1)
    check_int("d", d, min=2)                  # two orthogonal directions
    check_int("m", m, min=0)
    check_number("correlation", correlation, min=-1.0, max=1.0)
    check_number("c", c)
    check_number("noise_std", noise_std, min=0)
    check_int("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    rho = float(correlation)
    w = torch.stack([c * u1, c * (rho * u1 + math.sqrt(max(0.0, 1.0 - rho * rho)) * u2)])   # (2, d)
    alpha = torch.randn(m, generator=gen, dtype=torch.float64)
    beta = torch.randn(m, generator=gen, dtype=torch.float64)
    x = torch.randn(num_samples, d, generator=gen, dtype=torch.float64)
    lin = x @ w.t()                                                             # (n, 2)
    y = lin + torch.sin(lin[..., None] * alpha + beta).sum(-1)
    y = y + noise_std * torch.randn(num_samples, 2, generator=gen, dtype=torch.float64)
    return MMoESynthetic(x=x.float(), y=y.float(), w=w.float(), alpha=alpha.float(), beta=beta.float())
