"""Multimodal few-shot regression tasks: each task is one function from one of five families.

The families and parameter ranges follow the "multimodal sinusoid" benchmark of Vuorio et al.
2019 (MMAML, NeurIPS), which MoE-NPs also use: sinusoid ``A sin(x - φ)``, line ``a x + b``,
quadratic ``a (x - c)² + b``, ℓ1 ``a |x - c| + b`` and tanh ``a tanh(x - c) + b``, x uniform in
[-5, 5], Gaussian noise of std `noise` on y. A context of a few points rarely pins down the
family, so the posterior predictive is multi-modal: the case MoE-NPs were built for.
"""
from __future__ import annotations

import torch

FAMILIES = ("sine", "line", "quadratic", "l1", "tanh")


def _uniform(g, n, lo, hi):
    return torch.rand(n, 1, generator=g) * (hi - lo) + lo


def function_values(family_B: torch.Tensor, x_BN: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise-free y (B, N) for family ids (B,) at inputs x (B, N), parameters drawn from `g`."""
    B = len(family_B)
    a, b, c = _uniform(g, B, -3, 3), _uniform(g, B, -3, 3), _uniform(g, B, -3, 3)
    amp, phase = _uniform(g, B, 0.1, 5.0), _uniform(g, B, 0, torch.pi)
    quad = _uniform(g, B, -0.15, 0.15)
    per_family = torch.stack([amp * torch.sin(x_BN - phase), a * x_BN + b, quad * (x_BN - c).pow(2) + b,
                              a * (x_BN - c).abs() + b, a * torch.tanh(x_BN - c) + b])        # (5, B, N)
    return per_family[family_B, torch.arange(B)]


def sample_tasks(batch: int, context: int, extra_targets: int, *, seed: int, noise: float = 0.1,
                 families=FAMILIES, include_context: bool = True):
    """``(x_context, y_context, x_target, y_target, family)``: shapes (B, C, 1), (B, C, 1),
    (B, T, 1), (B, T, 1), (B,). The targets are the context points followed by `extra_targets` new
    points (``include_context=True``, NP training practice) or the new points alone (evaluation)."""
    ids = torch.tensor([FAMILIES.index(f) for f in families])
    g = torch.Generator().manual_seed(seed)
    family = ids[torch.randint(len(ids), (batch,), generator=g)]
    x = torch.rand(batch, context + extra_targets, generator=g) * 10 - 5
    y = function_values(family, x, g) + noise * torch.randn(x.shape, generator=g)
    x, y = x.unsqueeze(-1), y.unsqueeze(-1)
    start = 0 if include_context else context
    return x[:, :context], y[:, :context], x[:, start:], y[:, start:], family
