"""Continual learning with mixtures of experts (METHODS.md §7), one namespace for every method.

C1 Expert Gate and C2 Lifelong-MoE (task- and input-routed, with its output KL) live in
`moekit.models.expert_gate` and `moekit.models.continual` and are re-exported here; C3, MoE
adapters on a frozen backbone with task routers, incremental activate-freeze and the
distribution-discriminative auto-selector (`adapters`), C4 SEED (`seed`) and C5, the theory
paper's locality-gated experts with router termination (`locality`), are this package's own.
The package sits after models in the import order.
"""
from moekit.continual.seed import SEED, class_overlap, fit_gaussian, gaussian_kl, gaussian_log_prob
from moekit.models.continual import (
    GrowingTaskRouter,
    TaskIncrementalNet,
    accuracy_matrix,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    dense_task_net,
    distillation_kl,
    start_task,
    task_accuracy,
    task_moe_net,
    token_moe_net,
    train_sequentially,
    train_task,
)
from moekit.models.expert_gate import ExpertGate, GatedAccuracy, gated_accuracy, gated_predict

__all__ = ["SEED", "class_overlap", "fit_gaussian", "gaussian_kl", "gaussian_log_prob",
           "GrowingTaskRouter", "TaskIncrementalNet", "accuracy_matrix", "average_accuracy", "average_forgetting",
           "backward_transfer", "dense_task_net", "distillation_kl", "start_task", "task_accuracy", "task_moe_net",
           "token_moe_net", "train_sequentially", "train_task",
           "ExpertGate", "GatedAccuracy", "gated_accuracy", "gated_predict"]

from moekit.continual.locality import (  # noqa: E402
    AssignedTaskRouter,
    ContinualLinearMoE,
    LocalityRouter,
    assigned_task_net,
    learn_task_locality,
    min_norm_update,
)

__all__ += ["AssignedTaskRouter", "ContinualLinearMoE", "LocalityRouter", "assigned_task_net", "learn_task_locality",
            "min_norm_update"]

from moekit.continual.adapters import (  # noqa: E402
    DistributionSelector,
    MoEAdapters,
    auto_forward,
    train_adapter_task,
)

__all__ += ["DistributionSelector", "MoEAdapters", "auto_forward", "train_adapter_task"]
