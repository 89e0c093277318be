"""Expert banks: E experts with stacked weights, computed on rows grouped by expert.

Legend: N rows grouped by expert, D model dim, F expert hidden dim, E experts.

A bank's ``forward(x_ND, counts_E, *, backend="auto")`` runs expert e on its contiguous
segment of ``counts_E[e]`` rows. ``bank[i]`` is a module computing expert i alone on
``(n, D)`` rows with the bank's own weights (no copy) — the right-hand side of the MoE
layer's defining identity.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moekit.ops.backends import resolve_backend
from moekit.ops.grouped_mm import offsets_from_counts

__all__ = ["ExpertBank", "ExpertView", "ACTIVATIONS", "activation_fn", "uniform_init_"]

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
