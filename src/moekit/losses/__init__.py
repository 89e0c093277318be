"""Balancing losses (pure functions) and the aux-loss-free bias balancer."""
from moekit.losses.balance import (BALANCE_LOSSES, balance_loss, cv_squared, importance_loss,
                                   load_balancing_loss, load_loss, router_entropy, selection_counts,
                                   sequence_balance_loss, z_loss)
from moekit.losses.bias import bias_update, update_router_biases

__all__ = [
    "load_balancing_loss", "z_loss", "importance_loss", "load_loss", "cv_squared",
    "sequence_balance_loss", "router_entropy", "selection_counts", "balance_loss", "BALANCE_LOSSES",
    "bias_update", "update_router_biases",
]
