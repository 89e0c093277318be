"""Routing analytics, plots and the run report."""
from moekit.analysis.balance import (
    expert_coactivation,
    group_counts,
    group_routing_table,
    max_vio,
    max_violation,
    mean_sd,
)
from moekit.analysis.report import analyse_variant, write_report
from moekit.analysis.routing import (
                                     RoutingProbe,
                                     coactivation,
                                     domain_specialisation,
                                     experts_per_token_histogram,
                                     load_over_training,
                                     mutual_information,
                                     probe_routing,
                                     specialisation,
)

__all__ = ["RoutingProbe", "probe_routing", "load_over_training", "specialisation", "coactivation",
           "mutual_information", "domain_specialisation", "experts_per_token_histogram", "write_report",
           "analyse_variant", "max_violation", "max_vio", "group_counts", "group_routing_table",
           "expert_coactivation", "mean_sd"]
