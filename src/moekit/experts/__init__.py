"""Expert banks with stacked weights (E, ...), shared experts, and expert designs beyond FFNs."""
from moekit.experts.attention import MixtureOfAttentionHeads
from moekit.experts.base import ACTIVATIONS, ExpertBank, ExpertView, activation_fn
from moekit.experts.build import build_experts, resolve_experts
from moekit.experts.conv import CondConv2d
from moekit.experts.glu import GLU_ACTIVATIONS, GLUExperts
from moekit.experts.heterogeneous import HeterogeneousExperts
from moekit.experts.lora import MoLoRALinear, MoVLinear
from moekit.experts.mlp import MLPExperts
from moekit.experts.module import ModuleExperts
from moekit.experts.offload import CacheStats, OffloadedExperts
from moekit.experts.shared import DenseFFN, SharedExperts
from moekit.experts.smear import SMEAR

__all__ = [
    "ExpertBank", "ExpertView", "MLPExperts", "GLUExperts", "SharedExperts", "DenseFFN", "ACTIVATIONS",
    "GLU_ACTIVATIONS", "activation_fn", "build_experts", "resolve_experts", "ModuleExperts",
    "HeterogeneousExperts", "MoLoRALinear", "MoVLinear", "CondConv2d", "SMEAR", "MixtureOfAttentionHeads",
    "OffloadedExperts", "CacheStats",
]
