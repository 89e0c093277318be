"""Layers: the sparse MoE layer (and, in later modules, Soft MoE, dense and multi-gate mixtures)."""
from moekit.layers.moe import MoE, aux_loss, default_hidden, moe_layers
from moekit.layers.stats import MoEStats

__all__ = ["MoE", "MoEStats", "aux_loss", "default_hidden", "moe_layers"]
