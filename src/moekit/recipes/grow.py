"""Growing and freezing experts, re-exported among the recipes.

The code lives in `moekit.layers.grow` (it edits MoE layers in place, and the continual-learning
models below recipes build on it); ``moekit.recipes.add_experts`` / ``freeze_experts`` and this
module keep their old import paths.
"""
from moekit.layers.grow import add_experts, freeze_experts

__all__ = ["add_experts", "freeze_experts"]
