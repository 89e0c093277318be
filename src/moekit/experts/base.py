"""Expert banks: E experts with stacked weights, computed on rows grouped by expert.

Legend: N rows grouped by expert, D model dim, F expert hidden dim, E experts, H the first
matmul's width (F, or 2F for a GLU's gate and up rows).

A bank's ``forward(x_ND, counts_E, *, backend="auto")`` runs expert e on its contiguous
segment of ``counts_E[e]`` rows. ``bank[i]`` is a module computing expert i alone on
``(n, D)`` rows with the bank's own weights (no copy) — the right-hand side of the MoE
layer's defining identity.

`StackedFFNExperts` is the common base of the two-matmul FFN banks (`MLPExperts`,
`GLUExperts`): one grouped forward and one per-expert reference for both.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from moekit.ops.backends import resolve_backend
from moekit.ops.grouped_mm import offsets_from_counts

__all__ = ["ExpertBank", "ExpertView", "StackedFFNExperts", "ACTIVATIONS", "activation_fn", "uniform_init_"]

ACTIVATIONS = {
    "gelu": nn.functional.gelu,
    "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "relu": nn.functional.relu,
    "silu": nn.functional.silu,
    "swish": nn.functional.silu,
    "relu2": lambda x: nn.functional.relu(x).square(),
    "identity": lambda x: x,
}


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def uniform_init_(w_EOI: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default range ``U(±1/√fan_in)`` for each expert's (out, in) matrix."""
    bound = 1.0 / math.sqrt(w_EOI.shape[-1])
    return nn.init.uniform_(w_EOI, -bound, bound)


class ExpertBank(nn.Module):
    """Base class: subclasses implement `forward(x_ND, counts_E, backend=...)` and `expert_forward(i, x)`."""

    def __init__(self, num_experts: int, d_model: int):
        super().__init__()
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        self.num_experts = num_experts
        self.d_model = d_model

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, i: int) -> "ExpertView":
        if not -self.num_experts <= i < self.num_experts:
            raise IndexError(f"expert index {i} out of range for {self.num_experts} experts")
        return ExpertView(self, i % self.num_experts)

    def __iter__(self):
        return (self[i] for i in range(self.num_experts))

    def expert_forward(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def grouped(backend: str, x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """One grouped matmul through the chosen backend; weights cast to the input dtype."""
        if w_EIO.dtype != x_NI.dtype:
            w_EIO = w_EIO.to(x_NI.dtype)
        return resolve_backend(backend, x_NI, w_EIO).grouped_mm(x_NI, w_EIO, offs_E)

    @staticmethod
    def offsets(counts_E: torch.Tensor) -> torch.Tensor:
        return offsets_from_counts(counts_E)


class StackedFFNExperts(ExpertBank):
    """Base of the banks ``y = W_out · hidden(W_in · x + b_in) + b_out`` with stacked weights.

    A subclass stores its weights under its own names (the Hugging Face layout), returns them
    from `projections`, and overrides `hidden`, the step between the two matmuls (H = F for an
    MLP, 2F for a GLU).
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, *, activation: str):
        super().__init__(num_experts, d_model)
        if not isinstance(d_hidden, int) or d_hidden <= 0:
            raise ValueError(f"d_hidden must be a positive int, got {d_hidden!r}")
        self.d_hidden = d_hidden
        self.activation = activation
        self.act = activation_fn(activation)

    def projections(self) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """``(w_in_EHD, b_in_EH, w_out_EDF, b_out_ED)``, each matrix stored (out, in); a bias may be None."""
        raise NotImplementedError

    def hidden(self, h_NH: torch.Tensor) -> torch.Tensor:
        """(N, H) → (N, F): the activation between the two matmuls."""
        raise NotImplementedError

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        w_in_EHD, b_in_EH, w_out_EDF, b_out_ED = self.projections()
        offs_E = self.offsets(counts_E)
        e_N = None
        if b_in_EH is not None or b_out_ED is not None:
            # Expert of each row: rows arrive grouped by expert, row n belongs to the first e
            # with n < offs[e] (no host sync; rows past offs[-1] belong to no expert and are
            # clamped to the last one — callers mask them).
            rows = torch.arange(x_ND.shape[0], device=x_ND.device, dtype=offs_E.dtype)
            e_N = torch.searchsorted(offs_E.to(x_ND.device), rows, right=True).clamp_max(self.num_experts - 1)
        h_NH = self._add_bias(self.grouped(backend, x_ND, w_in_EHD.transpose(1, 2), offs_E), b_in_EH, e_N)
        y_ND = self.grouped(backend, self.hidden(h_NH), w_out_EDF.transpose(1, 2), offs_E)
        return self._add_bias(y_ND, b_out_ED, e_N)

    def expert_forward(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        w_in, b_in, w_out, b_out = (None if t is None else t[i].to(x_nD.dtype) for t in self.projections())
        return nn.functional.linear(self.hidden(nn.functional.linear(x_nD, w_in, b_in)), w_out, b_out)

    @staticmethod
    def _add_bias(y_N: torch.Tensor, b_E: Optional[torch.Tensor], e_N: Optional[torch.Tensor]) -> torch.Tensor:
        """Each row plus the bias of its expert ``e_N[n]`` (unchanged without a bias)."""
        return y_N if b_E is None else y_N + b_E[e_N].to(y_N.dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"activation={self.activation!r}")


class ExpertView(nn.Module):
    """Expert i of a bank as a stand-alone module sharing the bank's weights."""

    def __init__(self, bank: ExpertBank, index: int):
        super().__init__()
        object.__setattr__(self, "bank", bank)    # not a submodule: no duplicate parameters
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.bank.expert_forward(self.index, x.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"expert {self.index} of {type(self.bank).__name__}"
