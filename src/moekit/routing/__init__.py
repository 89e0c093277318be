"""Routers: every rule maps tokens to the one `Routing` format."""
from moekit.routing.base import Router, Routing, TokenChoiceRouter
from moekit.routing.capacity import DROP_POLICIES, apply_capacity, capacity_for
from moekit.routing.noisy_topk import NoisyTopKRouter
from moekit.routing.registry import available, build_router, get_router_class, register_router
from moekit.routing.sigmoid import SigmoidRouter
from moekit.routing.switch import SwitchRouter
from moekit.routing.topk import TopKRouter

__all__ = [
    "Routing", "Router", "TokenChoiceRouter", "TopKRouter", "NoisyTopKRouter", "SwitchRouter",
    "SigmoidRouter", "DROP_POLICIES", "apply_capacity", "capacity_for", "available",
    "build_router", "get_router_class", "register_router",
]
