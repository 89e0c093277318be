"""Expert banks with stacked weights (E, ...): MLP, GLU, heterogeneous sizes, any module, offloaded;
shared experts. Layers that route for themselves (SMEAR, MoA, CondConv, MoLoRA) are in `moekit.layers`."""
from moekit.experts.base import ACTIVATIONS, ExpertBank, ExpertView, activation_fn
from moekit.experts.build import build_experts, resolve_experts
from moekit.experts.glu import GLU_ACTIVATIONS, GLUExperts
from moekit.experts.heterogeneous import HeterogeneousExperts
from moekit.experts.mlp import MLPExperts
from moekit.experts.module import ModuleExperts
from moekit.experts.offload import CacheStats, OffloadedExperts
from moekit.experts.shared import DenseFFN, SharedExperts

__all__ = [
    "ExpertBank", "ExpertView", "MLPExperts", "GLUExperts", "SharedExperts", "DenseFFN", "ACTIVATIONS",
    "GLU_ACTIVATIONS", "activation_fn", "build_experts", "resolve_experts", "ModuleExperts",
    "HeterogeneousExperts", "OffloadedExperts", "CacheStats",
]
