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
from moekit.ops.precision import autocast_dtype
from moekit.validate import check_choice, check_int

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
    check_choice("activation", name, sorted(ACTIVATIONS))
    return ACTIVATIONS[name]


def uniform_init_(w_EOI: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default range ``U(±1/√fan_in)`` for each expert's (out, in) matrix."""
    bound = 1.0 / math.sqrt(w_EOI.shape[-1])
    return nn.init.uniform_(w_EOI, -bound, bound)


class ExpertBank(nn.Module):
    """Base class: subclasses implement `forward(x_ND, counts_E, backend=...)` and `expert_forward(i, x)`.

    ``supports_static_layout``: whether `forward` accepts rows past ``sum(counts_E)`` (the
    dropped slots of sync-free routing) without reading the counts on the host.
    """

    supports_static_layout = False

    def __init__(self, num_experts: int, d_model: int):
        super().__init__()
        check_int("num_experts", num_experts, min=1)
        check_int("d_model", d_model, min=1)
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

    def check_sync_free_backend(self, x: torch.Tensor, backend: str) -> None:
        """Raise ValueError if this bank would read counts on the host for inputs like `x`
        under `backend` (banks with ``supports_static_layout`` and a backend choice override)."""

    @staticmethod
    def grouped(backend: str, x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """One grouped matmul through the chosen backend; weights cast to the input dtype, both
        to the autocast dtype inside ``torch.autocast`` (as ``x @ w`` would be)."""
        amp = autocast_dtype(x_NI)
        if amp is not None:
            x_NI = x_NI.to(amp)
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
    MLP, 2F for a GLU). Rows past the last offset (the static layout's dropped slots) are
    left to the caller to mask; nothing here reads counts on the host, so these banks take
    ``MoE(sync_free=True)``.
    """

    supports_static_layout = True

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, *, activation: str):
        super().__init__(num_experts, d_model)
        check_int("d_hidden", d_hidden, min=1)
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
        rows = None
        if b_in_EH is not None or b_out_ED is not None:
            # Expert of each row without a host sync: row n belongs to the first e with
            # n < offs[e]. Rows past offs[-1] (dropped slots of the static layout) belong to
            # none and get no bias, so no gradient reaches a bias from them.
            n = torch.arange(x_ND.shape[0], device=x_ND.device, dtype=offs_E.dtype)
            offs = offs_E.to(x_ND.device)
            rows = (torch.searchsorted(offs, n, right=True).clamp_max(self.num_experts - 1),
                    (n < offs[-1]).unsqueeze(-1))
        h_NH = self._add_bias(self.grouped(backend, x_ND, w_in_EHD.transpose(1, 2), offs_E), b_in_EH, rows)
        y_ND = self.grouped(backend, self.hidden(h_NH), w_out_EDF.transpose(1, 2), offs_E)
        return self._add_bias(y_ND, b_out_ED, rows)

    def check_sync_free_backend(self, x: torch.Tensor, backend: str) -> None:
        """ValueError if `backend` would run either matmul through the eager loop (which reads
        the counts on the host) for inputs like `x` — the check behind ``MoE(sync_free=True)``."""
        w_in_EHD, _, w_out_EDF, _ = self.projections()
        for w_EIO in (w_in_EHD.transpose(1, 2), w_out_EDF.transpose(1, 2)):
            # Empty operands of the real dtypes, device and dims: no copy of the weights.
            I, O = w_EIO.shape[1], w_EIO.shape[2]
            probe_x, probe_w = x.new_empty(0, I), x.new_empty(0, I, O, device=w_EIO.device)
            if resolve_backend(backend, probe_x, probe_w).name == "eager":
                raise ValueError(f"sync_free=True needs a backend that reads no counts on the host, but "
                                 f"backend={backend!r} runs {x.dtype} operands of shape (·, {w_EIO.shape[1]}) x "
                                 f"{tuple(w_EIO.shape)} on {x.device} through the eager loop (grouped_mm needs "
                                 f"float32/bf16/fp16 and dims aligned to 16 bytes; triton runs any)")

    def expert_forward(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        w_in, b_in, w_out, b_out = (None if t is None else t[i].to(x_nD.dtype) for t in self.projections())
        return nn.functional.linear(self.hidden(nn.functional.linear(x_nD, w_in, b_in)), w_out, b_out)

    @staticmethod
    def _add_bias(y_N: torch.Tensor, b_E: Optional[torch.Tensor], rows) -> torch.Tensor:
        """Each row plus the bias of its expert, ``rows = (e_N, in_group_N1)`` (unchanged
        without a bias; rows outside every group get none)."""
        if b_E is None:
            return y_N
        e_N, in_group_N1 = rows
        return y_N + torch.where(in_group_N1, b_E[e_N].to(y_N.dtype), torch.zeros((), dtype=y_N.dtype,
                                                                                  device=y_N.device))

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
