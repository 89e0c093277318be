"""Layers: the sparse MoE layer (and, in later modules, Soft MoE, dense and multi-gate mixtures)."""
from moekit.layers.moe import MoE, aux_loss, default_hidden, moe_layers
from moekit.layers.stats import MoEStats

__all__ = ["MoE", "MoEStats", "aux_loss", "default_hidden", "moe_layers"]

# Non-sparse and multi-task mixtures (METHODS.md G1/F4, G9, MT1/MT2, X3).
from moekit.layers.dense_mixture import DenseMoE, StackedDenseMoE  # noqa: E402
from moekit.layers.hme import HierarchicalMoE, irls_multinomial  # noqa: E402
from moekit.layers.multigate import CGC, MMoE, PLE, SharedBottom, make_mmoe_synthetic  # noqa: E402
from moekit.layers.residual_moe import PyramidMoE, ResidualMoE  # noqa: E402
from moekit.layers.soft_moe import SoftMoE  # noqa: E402

__all__ += ["SoftMoE", "DenseMoE", "StackedDenseMoE", "MMoE", "CGC", "PLE", "SharedBottom",
            "make_mmoe_synthetic", "ResidualMoE", "PyramidMoE", "HierarchicalMoE", "irls_multinomial"]

# Inference with experts offloaded to host memory (METHODS.md S4).
from moekit.layers.offload import offload_experts, offload_stats, restore_experts  # noqa: E402

__all__ += ["offload_experts", "offload_stats", "restore_experts"]

from moekit.layers.m3oe import M3oE  # noqa: E402  (METHODS.md MT3)

__all__ += ["M3oE"]

from moekit.layers.grow import add_experts, freeze_experts  # noqa: E402  (METHODS.md §7 (i), (ii))

__all__ += ["add_experts", "freeze_experts"]
