"""Layers: the sparse MoE layer and every MoE-like layer, including those that route for themselves
(Soft MoE, dense and hierarchical mixtures, multi-gate mixtures, M3oE, MoA, SMEAR, CondConv, MoLoRA / MoV)."""
from moekit.layers.config import MoEConfig
from moekit.layers.moe import MoE, default_hidden
from moekit.layers.protocol import LayerStats, MixtureStats, MoELayer, aux_loss, moe_layers
from moekit.layers.stats import MoEStats

__all__ = ["MoE", "MoEConfig", "MoEStats", "MoELayer", "LayerStats", "MixtureStats", "aux_loss", "default_hidden",
           "moe_layers"]

# Non-sparse and multi-task mixtures (METHODS.md G1/F4, G9, MT1/MT2, X3).
from moekit.layers.dense_mixture import DenseMoE, StackedDenseMoE  # noqa: E402
from moekit.layers.hme import HierarchicalMoE, irls_multinomial  # noqa: E402
from moekit.layers.multigate import CGC, PLE, MMoE, SharedBottom, make_mmoe_synthetic  # noqa: E402
from moekit.layers.residual_moe import PyramidMoE, ResidualMoE  # noqa: E402
from moekit.layers.soft_moe import SoftMoE  # noqa: E402

__all__ += ["SoftMoE", "DenseMoE", "StackedDenseMoE", "MMoE", "CGC", "PLE", "SharedBottom",
            "make_mmoe_synthetic", "ResidualMoE", "PyramidMoE", "HierarchicalMoE", "irls_multinomial"]

# Inference with experts offloaded to host memory (METHODS.md S4).
from moekit.layers.offload import offload_experts, offload_stats, restore_experts  # noqa: E402

__all__ += ["offload_experts", "offload_stats", "restore_experts"]

from moekit.layers.m3oe import M3oE  # noqa: E402  (METHODS.md MT3)
from moekit.layers.star import STAR, StarLinear  # noqa: E402  (MT3's multi-domain baseline)

__all__ += ["M3oE", "STAR", "StarLinear"]

from moekit.layers.moe_sm import MoESM  # noqa: E402  (METHODS.md CV2, Swin2-MoSE)

__all__ += ["MoESM"]

# Layers that route for themselves (METHODS.md X-series): mixed convolutions, merged experts,
# attention-head experts, adapter mixtures.
from moekit.layers.attention_heads import MixtureOfAttentionHeads  # noqa: E402
from moekit.layers.condconv import CondConv2d  # noqa: E402
from moekit.layers.lora import MoLoRALinear, MoVLinear  # noqa: E402
from moekit.layers.smear import SMEAR  # noqa: E402

__all__ += ["MixtureOfAttentionHeads", "CondConv2d", "MoLoRALinear", "MoVLinear", "SMEAR"]

from moekit.layers.grow import add_experts, freeze_experts  # noqa: E402  (METHODS.md §7 (i), (ii))

__all__ += ["add_experts", "freeze_experts"]

from moekit.layers.dynmoe import dynmoe_adapt  # noqa: E402  (METHODS.md G16)
from moekit.layers.multihash import MultiHashMoE  # noqa: E402  (METHODS.md G8)

__all__ += ["dynmoe_adapt", "MultiHashMoE"]

# Conditional computation beyond MoE (METHODS.md CC1, CC2): token selection and early exits.
from moekit.layers.depths import DepthStats, MixtureOfDepths  # noqa: E402
from moekit.layers.early_exit import EarlyExit  # noqa: E402

__all__ += ["MixtureOfDepths", "DepthStats", "EarlyExit"]
