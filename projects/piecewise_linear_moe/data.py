"""R3's piecewise-linear regression data (METHODS.md §15 R3; the parameters are ours, [D]).

Legend: N samples, P input dim (1 or 2).

1-D: ``x ~ U[−1, 1]``, four regimes on the equal-width intervals split at −0.5, 0, 0.5, regime r
giving ``y = a_r x + b_r + ε`` with (a, b) ∈ {(2, 1), (−1, 0.5), (3, −1), (0, 0)} and
``ε ~ N(0, 0.05²)``, so the noise floor of the test MSE is 0.0025.
2-D (the HME variant): ``x ~ U[−1, 1]²``, one linear regime per quadrant,
``y = a_q · x + b_q + ε``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NOISE", "BREAKPOINTS", "SLOPES_1D", "PLANES_2D", "Regression", "make_data"]

NOISE = 0.05
BREAKPOINTS = (-0.5, 0.0, 0.5)
SLOPES_1D = ((2.0, 1.0), (-1.0, 0.5), (3.0, -1.0), (0.0, 0.0))                  # (a_r, b_r)
PLANES_2D = ((2.0, -1.0, 1.0), (-1.0, 1.0, 0.5), (3.0, 0.0, -1.0), (0.0, 2.0, 0.0))   # (a_q1, a_q2, b_q)


@dataclass(frozen=True)
class Regression:
    """``x`` (N, P), ``y`` (N, 1) and the true ``regime`` (N,) of every sample (float64)."""
    x: torch.Tensor
    y: torch.Tensor
    regime: torch.Tensor


def make_data(n: int, dim: int = 1, *, generator: torch.Generator) -> Regression:
    """n samples of the 1-D interval regimes (dim=1) or the 2-D quadrant regimes (dim=2)."""
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 (intervals) or 2 (quadrants), got {dim!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    x = torch.rand(n, dim, generator=generator, dtype=torch.float64) * 2 - 1
    if dim == 1:
        regime = torch.bucketize(x[:, 0], torch.tensor(BREAKPOINTS, dtype=torch.float64))
        coef = torch.tensor(SLOPES_1D, dtype=torch.float64)[regime]                 # (N, 2)
    else:
        regime = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
        coef = torch.tensor(PLANES_2D, dtype=torch.float64)[regime]                 # (N, 3)
    clean = (coef[:, :dim] * x).sum(-1) + coef[:, dim]
    y = clean + NOISE * torch.randn(n, generator=generator, dtype=torch.float64)
    return Regression(x, y.unsqueeze(-1), regime)
