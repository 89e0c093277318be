"""Deprecated: `BiasMLPExperts` is now ``moekit.experts.MLPExperts(..., bias=True)``.

Same parameters (``up_proj``, ``down_proj``, ``up_bias``, ``down_bias``), so state dicts load
into either. Kept as a thin alias for old imports; it will be removed.
"""
from __future__ import annotations

import warnings

from moekit.experts.mlp import MLPExperts

__all__ = ["BiasMLPExperts"]


class BiasMLPExperts(MLPExperts):
    """Deprecated alias of ``MLPExperts(num_experts, d_model, d_hidden, activation=..., bias=True)``."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, *, activation: str = "gelu"):
        warnings.warn("moekit.recipes.bias_experts.BiasMLPExperts is deprecated; use "
                      "moekit.experts.MLPExperts(..., bias=True)", DeprecationWarning, stacklevel=2)
        super().__init__(num_experts, d_model, d_hidden, activation=activation, bias=True)
