"""Model surgery recipes: Hugging Face MoE conversion (`moekit.hf`), sparse upcycling,
Branch-Train-MiX and Branch-Train-Merge's ensemble, expert pruning and merging, growing and
freezing experts, distilling an MoE into a dense model."""
from moekit.recipes.btm import BTMEnsemble, branch_log_probs, domain_posterior, domain_posterior_reference
from moekit.recipes.btx import average_models, btx, moe_from_ffns
from moekit.recipes.dense_ffn import DenseWeights, FFNSite, find_dense_ffns
from moekit.recipes.distill import dense_student_from_moe, distill, distillation_loss, teacher_kl
from moekit.recipes.grow import add_experts, freeze_experts
from moekit.recipes.io import load_surgery, save_surgery
from moekit.recipes.prune import (
                                  GroupedRouter,
                                  expert_usage,
                                  merge_experts,
                                  prune_experts,
                                  prune_model,
                                  similar_expert_groups,
)
from moekit.recipes.upcycle import upcycle, upcycle_weights

__all__ = ["upcycle", "upcycle_weights", "btx", "BTMEnsemble", "domain_posterior", "domain_posterior_reference",
           "branch_log_probs", "average_models", "moe_from_ffns", "find_dense_ffns",
           "DenseWeights", "FFNSite", "expert_usage", "prune_experts", "prune_model", "merge_experts",
           "similar_expert_groups", "GroupedRouter", "save_surgery", "load_surgery", "add_experts", "freeze_experts",
           "distillation_loss", "dense_student_from_moe", "distill", "teacher_kl"]
