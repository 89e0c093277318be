"""Heterogeneous experts: experts of different hidden sizes in one layer (HMoE).

Legend: N rows grouped by expert, D model dim, F expert hidden dim, E experts, G size groups.

Wang et al. (2024), "HMoE: Heterogeneous Mixture of Experts for Language Modeling": expert e
is an FFN of its own hidden size ``F_e``, ``f_e(x) = down_e(act(up_e(x)))`` (or a GLU), so the
router can send easy tokens to small experts and hard ones to large experts. HMoE adds a
parameter penalty ``L_P = Σ_e (F_e / mean F) · P_e`` (P_e the mean router probability) so the
router does not simply prefer the largest experts; `parameter_penalty` computes it [R: exact
normalisation of the paper's P-penalty].

Execution without a Python loop per expert: experts with the same hidden size form a size
group whose weights are stacked ``(E_g, F_g, D)`` like `MLPExperts`; each group runs as *one*
grouped matmul through `ExpertBank.grouped` (so any backend applies), i.e. G grouped matmuls
for G distinct sizes instead of E matmuls. The rows arrive grouped by expert index; a stable
sort by size-group id makes each group's rows contiguous with expert order kept inside the
group (skipped when the groups are already contiguous in expert order, e.g. sizes sorted).

Why not pad every expert to max F with a mask: it costs ``E · max F`` FLOPs and memory
instead of ``Σ F_e`` and the padding must be re-zeroed after every optimiser step; grouping
by size does exact work and needs no masking.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.base import ExpertBank, activation_fn, uniform_init_
from moekit.experts.glu import GLU_ACTIVATIONS
from moekit.validate import check_choice, check_instance, check_int

__all__ = ["HeterogeneousExperts"]


class _SizeGroup(nn.Module):
    """The stacked weights of the experts that share one hidden size F."""

    def __init__(self, num: int, d_model: int, d_hidden: int, glu: bool):
        super().__init__()
        self.d_hidden = d_hidden
        up_rows = 2 * d_hidden if glu else d_hidden
        self.up_proj = nn.Parameter(torch.empty(num, up_rows, d_model))       # (E_g, F or 2F, D)
        self.down_proj = nn.Parameter(torch.empty(num, d_model, d_hidden))    # (E_g, D, F)
        uniform_init_(self.up_proj.data)
        uniform_init_(self.down_proj.data)


class HeterogeneousExperts(ExpertBank):
    """E experts with hidden sizes ``d_hiddens[e]``, run as one grouped matmul per distinct size.

    Args:
        d_model: D.
        d_hiddens: F_e for each expert (length E, positive ints).
        expert: ``"mlp"`` or a GLU variant (``"swiglu"``, ``"geglu"``, ``"reglu"`` …).
        activation: override the activation (default gelu for mlp, the GLU's own otherwise).
    """

    def __init__(self, d_model: int, d_hiddens: Sequence[int], *, expert: str = "mlp",
                 activation: Optional[str] = None):
        check_instance("d_hiddens", d_hiddens, (list, tuple), what="a list of positive ints, one per expert")
        d_hiddens = [check_int(f"d_hiddens[{i}]", f, min=1) for i, f in enumerate(d_hiddens)]
        if not d_hiddens:
            raise ValueError("d_hiddens must list one hidden size per expert, got an empty list")
        check_choice("expert", expert, ("mlp", *sorted(GLU_ACTIVATIONS)))
        super().__init__(len(d_hiddens), d_model)
        self.d_hiddens = d_hiddens
        self.expert = expert
        self.glu = expert in GLU_ACTIVATIONS
        self.activation = activation or (GLU_ACTIVATIONS[expert] if self.glu else "gelu")
        self.act = activation_fn(self.activation)

        sizes = sorted(set(d_hiddens))
        # group_of_expert[e] = g; local_index[e] = e's position inside its group's stack.
        group_of_expert, local_index, members = [], [], [[] for _ in sizes]
        for e, f in enumerate(d_hiddens):
            g = sizes.index(f)
            group_of_expert.append(g)
            local_index.append(len(members[g]))
            members[g].append(e)
        self.groups = nn.ModuleList(_SizeGroup(len(m), d_model, f, self.glu) for f, m in zip(sizes, members))
        self.members = members
        self.local_index = local_index
        self.register_buffer("group_of_expert", torch.tensor(group_of_expert, dtype=torch.long), persistent=False)
        # Rows are sorted by expert; they are already grouped by size iff group ids never decrease.
        self._contiguous = all(a <= b for a, b in zip(group_of_expert, group_of_expert[1:]))

    # ----------------------------------------------------------------------------------
    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    def expert_forward(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        grp, j = self.groups[int(self.group_of_expert[i])], self.local_index[i]
        up, down = grp.up_proj[j].to(x_nD.dtype), grp.down_proj[j].to(x_nD.dtype)
        return F.linear(self._hidden(F.linear(x_nD, up)), down)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        if x_ND.dim() != 2 or x_ND.shape[1] != self.d_model:
            raise ValueError(f"x must have shape (N, {self.d_model}), got {tuple(x_ND.shape)}")
        if counts_E.shape != (self.num_experts,):
            raise ValueError(f"counts must have shape ({self.num_experts},), got {tuple(counts_E.shape)}")
        if len(self.groups) == 1:
            return self._run_group(0, x_ND, counts_E, backend)

        order_N = None
        if not self._contiguous:
            expert_of_row_N = torch.repeat_interleave(torch.arange(self.num_experts, device=x_ND.device), counts_E)
            order_N = torch.argsort(self.group_of_expert.to(x_ND.device)[expert_of_row_N], stable=True)
            x_ND = x_ND.index_select(0, order_N)
        counts_per_group = [counts_E[m] for m in self.members]        # in expert order inside a group
        rows_per_group = torch.stack([c.sum() for c in counts_per_group]).tolist()
        outs = [self._run_group(g, x_gD, counts_per_group[g], backend)
                for g, x_gD in enumerate(torch.split(x_ND, rows_per_group))]
        y_ND = torch.cat(outs, 0)
        if order_N is not None:
            y_ND = torch.empty_like(y_ND).index_copy(0, order_N, y_ND)  # undo the sort
        return y_ND

    def _run_group(self, g: int, x_nD: torch.Tensor, counts_e: torch.Tensor, backend: str) -> torch.Tensor:
        grp = self.groups[g]
        offs = self.offsets(counts_e)
        h = self.grouped(backend, x_nD, grp.up_proj.transpose(1, 2), offs)
        return self.grouped(backend, self._hidden(h), grp.down_proj.transpose(1, 2), offs)

    # ----------------------------------------------------------------------------------
    def expert_num_params(self) -> torch.Tensor:
        """(E,) parameters of each expert."""
        per_f = 3 if self.glu else 2
        return torch.tensor([per_f * self.d_model * f for f in self.d_hiddens], dtype=torch.float32)

    def parameter_penalty(self, probs_TE: torch.Tensor) -> torch.Tensor:
        """HMoE's parameter penalty ``Σ_e (F_e / mean F) · P_e`` with ``P_e`` the mean router
        probability of expert e (differentiable); equals 1 when every expert has the same size
        and grows with the probability mass on large experts."""
        if probs_TE.dim() != 2 or probs_TE.shape[1] != self.num_experts:
            raise ValueError(f"probs must have shape (T, {self.num_experts}), got {tuple(probs_TE.shape)}")
        size_E = torch.tensor(self.d_hiddens, dtype=probs_TE.dtype, device=probs_TE.device)
        return (size_E / size_E.mean() * probs_TE.mean(0)).sum()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hiddens={self.d_hiddens}, expert={self.expert!r}, "
                f"activation={self.activation!r}, size_groups={len(self.groups)}")
