"""Aux-loss-free load balancing (Wang et al. 2024; DeepSeek-V3) — METHODS.md G13.

A per-expert bias added to the selection scores only (never to the combine weights) is
nudged after each optimizer step: up for under-loaded experts, down for over-loaded ones,
``b_e ← b_e + u · sign(mean(load) − load_e)``. No gradient, no loss term.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["bias_update", "update_router_biases"]


def bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, *, rate: float = 1e-3) -> torch.Tensor:
    """New bias ``bias + rate · sign(mean(load) − load)`` (pure; returns a new tensor)."""
    if bias_E.shape != load_E.shape:
        raise ValueError(f"bias and load must have the same shape, got {tuple(bias_E.shape)} "
                         f"and {tuple(load_E.shape)}")
    load = load_E.to(bias_E.dtype)
    return bias_E + rate * torch.sign(load.mean() - load)


def update_router_biases(model: nn.Module, rate: float | None = None) -> int:
    """Apply the bias update to every router of `model` that has one; returns how many.

    Call after ``optimizer.step()``; loads accumulate over micro-batches in between.
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "update_bias") and hasattr(m, "expert_bias"):
            m.update_bias(rate)
            n += 1
    return n
