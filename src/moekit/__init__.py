"""moekit: Mixture-of-Experts for PyTorch.

    >>> import torch, moekit
    >>> moe = moekit.MoE(d_model=64, num_experts=8, top_k=2)
    >>> y = moe(torch.randn(4, 16, 64))
    >>> loss = y.square().mean() + moekit.aux_loss(moe)
"""
import importlib

from moekit import experts, layers, losses, ops, routing
from moekit.experts import ExpertBank, GLUExperts, MLPExperts, SharedExperts
from moekit.layers import MoE, MoEConfig, MoEStats, SoftMoE, aux_loss, moe_layers
from moekit.losses import update_router_biases
from moekit.routing import Router, Routing, build_router, register_router
from moekit.routing import available as available_routers

__version__ = "0.2.0"

__all__ = [
    "MoE", "MoEConfig", "MoEStats", "SoftMoE", "Routing", "Router", "ExpertBank", "GLUExperts", "MLPExperts",
    "SharedExperts",
    "aux_loss", "moe_layers", "update_router_biases", "available_routers", "build_router",
    "register_router", "experts", "layers", "losses", "meta", "models", "ops", "routing", "__version__",
]

# Loaded on first use, so `import moekit` stays light (no trainer, recipes, analysis, plotting).
_LAZY_SUBPACKAGES = ("models", "meta", "continual", "parallel", "optim", "recipes", "hf", "train", "analysis",
                     "validate")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"moekit.{name}")
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
