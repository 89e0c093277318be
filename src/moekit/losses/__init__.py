"""Balancing losses (pure functions), their sufficient statistics, and the aux-loss-free bias balancer."""
from moekit.losses.balance import (
                                   cv_squared,
                                   device_balance_loss,
                                   first_choice_loss,
                                   global_batch_balance_loss,
                                   importance_loss,
                                   load_balancing_loss,
                                   load_loss,
                                   router_entropy,
                                   selection_counts,
                                   sequence_balance_loss,
                                   z_loss,
)
from moekit.losses.bias import bias_update, update_router_biases
from moekit.losses.mutual_information import (
                                   mutual_information_from_joint,
                                   mutual_information_loss,
                                   task_expert_joint,
)
from moekit.losses.sufficient import (
                                   BALANCE_LOSSES,
                                   BALANCE_SCOPES,
                                   COUNT_LOSSES,
                                   BalanceStats,
                                   CountWindow,
                                   balance_loss,
                                   balance_loss_from_stats,
                                   balance_stats,
                                   reset_balance_windows,
                                   router_terms_from_stats,
                                   z_loss_from_stats,
)

__all__ = [
    "load_balancing_loss", "z_loss", "importance_loss", "load_loss", "cv_squared",
    "sequence_balance_loss", "router_entropy", "selection_counts", "balance_loss", "BALANCE_LOSSES",
    "BalanceStats", "balance_stats", "balance_loss_from_stats", "z_loss_from_stats", "router_terms_from_stats",
    "bias_update", "update_router_biases", "first_choice_loss", "device_balance_loss",
    "global_batch_balance_loss", "COUNT_LOSSES", "BALANCE_SCOPES", "CountWindow", "reset_balance_windows",
    "task_expert_joint", "mutual_information_from_joint", "mutual_information_loss",
]
