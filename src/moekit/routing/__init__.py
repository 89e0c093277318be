"""Routers: every rule maps tokens to the one `Routing` format."""
from moekit.routing.balanced_assignment import BaseLayerRouter, balanced_assignment
from moekit.routing.base import Router, Routing, TokenChoiceRouter
from moekit.routing.capacity import DROP_POLICIES, apply_capacity, capacity_for
from moekit.routing.cosine import CosineRouter
from moekit.routing.dense import DenseRouter
from moekit.routing.dselect_k import DSelectKRouter
from moekit.routing.dynmoe import DynMoERouter, top_any_selection
from moekit.routing.expert_choice import ExpertChoiceRouter
from moekit.routing.gaussian import GaussianRouter
from moekit.routing.gshard import GShardRouter
from moekit.routing.hash import HashRouter
from moekit.routing.multihash import MultiHashRouter
from moekit.routing.noisy_topk import NoisyTopKRouter
from moekit.routing.null_experts import NullExpertsRouter
from moekit.routing.random import RandomRouter
from moekit.routing.registry import available, build_router, get_router_class, register_router
from moekit.routing.relu import ReLURouter
from moekit.routing.sampled_top1 import SampledTop1Router
from moekit.routing.schedules import (
                                      DenseToSparseRouter,
                                      RoutingDropout,
                                      StableMoERouter,
                                      TemperatureSchedule,
                                      freeze_moe_parameters,
)
from moekit.routing.sigmoid import SigmoidRouter
from moekit.routing.sinkhorn import SinkhornRouter, sinkhorn_balance
from moekit.routing.switch import SwitchRouter
from moekit.routing.task import TaskRouter
from moekit.routing.task_token import TaskTokenRouter, m3vit_task_experts
from moekit.routing.thor import ThorRouter, consistency_loss
from moekit.routing.top_p import TopPRouter
from moekit.routing.topk import TopKRouter
from moekit.routing.vmoe import VMoERouter

__all__ = [
    "Routing", "Router", "TokenChoiceRouter", "TopKRouter", "NoisyTopKRouter", "SwitchRouter", "SampledTop1Router",
    "SigmoidRouter", "GShardRouter", "ExpertChoiceRouter", "TopPRouter", "HashRouter", "DenseRouter",
    "CosineRouter", "ReLURouter", "DSelectKRouter", "SinkhornRouter", "BaseLayerRouter", "ThorRouter",
    "NullExpertsRouter", "TaskRouter", "RandomRouter", "GaussianRouter", "balanced_assignment",
    "sinkhorn_balance", "consistency_loss", "DenseToSparseRouter", "StableMoERouter", "RoutingDropout",
    "TemperatureSchedule", "freeze_moe_parameters", "DROP_POLICIES", "apply_capacity", "capacity_for",
    "available", "build_router", "get_router_class", "register_router", "VMoERouter", "MultiHashRouter",
    "DynMoERouter", "top_any_selection",
    "TaskTokenRouter", "m3vit_task_experts",
]
