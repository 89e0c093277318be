"""R6's patch data (METHODS.md §15 R6; the parameters are ours, [D]).

Legend: B examples, P patches per example (16), D patch dim (32).

Each example is P patches in R^D with a label y ∈ {−1, +1}:

- one **discriminative** patch ``y·v + ξ`` at a uniformly random position;
- ``num_spurious`` **spurious** patches ``s·u + ξ`` at other random positions, whose sign s
  equals y with probability ``spurious_corr`` in training (so they predict the label nearly as
  well as v there), is independent of y in the test set, and is ``−y`` in the flipped test set;
- the rest pure noise ``ξ``; ``ξ ~ N(0, σ² I)`` with ``σ = noise/√D`` everywhere.

v and u are orthonormal. A model that reads v gets the flipped set right; one that leans on u
gets it wrong, so accuracy on the flipped set measures reliance on the spurious patches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PatchTask", "PatchData", "make_task", "sample"]


@dataclass(frozen=True)
class PatchTask:
    """The fixed directions and the settings of one task instance."""
    v: torch.Tensor                  # (D,) discriminative direction
    u: torch.Tensor                  # (D,) spurious direction, ⟂ v
    num_patches: int = 16
    dim: int = 32
    num_spurious: int = 2
    spurious_corr: float = 0.9
    noise: float = 1.0


@dataclass(frozen=True)
class PatchData:
    """``x`` (B, P, D), labels ``y`` (B,) in {−1, +1}, the discriminative patch's position
    ``signal_pos`` (B,) and a mask of spurious positions ``spurious_BP``."""
    x: torch.Tensor
    y: torch.Tensor
    signal_pos: torch.Tensor
    spurious_BP: torch.Tensor


def make_task(*, generator: torch.Generator, num_patches: int = 16, dim: int = 32, num_spurious: int = 2,
              spurious_corr: float = 0.9, noise: float = 1.0) -> PatchTask:
    if not (isinstance(num_patches, int) and isinstance(num_spurious, int) and 0 <= num_spurious < num_patches):
        raise ValueError(f"need 0 <= num_spurious < num_patches, got {num_spurious!r}, {num_patches!r}")
    if not (isinstance(dim, int) and dim >= 2):
        raise ValueError(f"dim must be an int >= 2 (v and u are orthogonal), got {dim!r}")
    if not 0.0 <= spurious_corr <= 1.0:
        raise ValueError(f"spurious_corr must be in [0, 1], got {spurious_corr!r}")
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator))
    return PatchTask(q[:, 0].contiguous(), q[:, 1].contiguous(), num_patches, dim, num_spurious,
                     float(spurious_corr), float(noise))


def sample(task: PatchTask, n: int, *, split: str, generator: torch.Generator) -> PatchData:
    """n examples; ``split``: ``"train"`` (spurious sign = y with prob spurious_corr),
    ``"test"`` (independent of y) or ``"flipped"`` (= −y)."""
    if split not in ("train", "test", "flipped"):
        raise ValueError(f"split must be 'train', 'test' or 'flipped', got {split!r}")
    P, D, S = task.num_patches, task.dim, task.num_spurious
    y = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    x = torch.randn(n, P, D, generator=generator) * (task.noise / math.sqrt(D))
    # Positions: a random permutation per example; the first slot is the signal, the next S spurious.
    pos = torch.rand(n, P, generator=generator).argsort(dim=1)
    signal_pos, spur_pos = pos[:, 0], pos[:, 1:1 + S]
    rows = torch.arange(n)
    x[rows, signal_pos] += y.unsqueeze(-1) * task.v
    if split == "train":
        agree = torch.rand(n, generator=generator) < task.spurious_corr
        s = torch.where(agree, y, -y)
    elif split == "test":
        s = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    else:
        s = -y
    for k in range(S):
        x[rows, spur_pos[:, k]] += s.unsqueeze(-1) * task.u
    spurious_BP = torch.zeros(n, P, dtype=torch.bool)
    spurious_BP[rows.unsqueeze(-1), spur_pos] = True
    return PatchData(x, y, signal_pos, spurious_BP)
