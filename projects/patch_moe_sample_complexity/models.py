"""The two networks of R6: a single two-layer CNN and the patch-level MoE (pMoE).

Legend: B examples, P patches per example, D patch dim, F hidden filters, E experts,
l patches per expert.

- `PatchCNN` (the single expert): ``f(X) = aᵀ Σ_j ReLU(W x_j)`` — F shared filters over all P
  patches, ReLU, sum-pool, a linear read-out.
- `PatchMoE` (Chowdhury, Zhang, Wang, Liu & Chen 2023, ICML, "Patch-level Routing in
  Mixture-of-Experts is Provably Sample-efficient for CNNs"): E experts, each a two-layer
  CNN of F/E filters, and a linear router that lets **each expert choose its top-l patches of
  each example**. That is `moekit`'s expert-choice router (METHODS.md G5) with one routing group
  per example (``group_size = P``) and capacity ``C = ceil(c·P/E) = l``, i.e. ``c = l·E/P``;
  the layer is a `moekit.MoE` with ReLU MLP experts. The output is the sum over patches of the
  MoE output and a linear read-out, so ``f(X) = aᵀ Σ_e Σ_{j ∈ top-l(e)} g_ej W2_e ReLU(W1_e x_j)``.

  Difference from the paper: there the gate of a chosen patch is a softmax over the l patches
  the expert chose; the library's expert choice weights a chosen (patch, expert) pair by the
  softmax over experts of that patch. Both are learned linear scores and both route by the
  same top-l rule; the weighting differs.
"""
from __future__ import annotations

import torch
from torch import nn

import moekit
from moekit.routing import ExpertChoiceRouter

__all__ = ["PatchCNN", "PatchMoE", "selected_patches"]


class PatchCNN(nn.Module):
    def __init__(self, *, dim: int, hidden: int):
        super().__init__()
        self.filters = nn.Linear(dim, hidden)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x_BPD: torch.Tensor) -> torch.Tensor:
        """(B,) logits."""
        return self.readout(torch.relu(self.filters(x_BPD)).sum(1)).squeeze(-1)


class PatchMoE(nn.Module):
    def __init__(self, *, dim: int, num_patches: int, num_experts: int, patches_per_expert: int, hidden: int):
        super().__init__()
        if not 1 <= patches_per_expert <= num_patches:
            raise ValueError(f"patches_per_expert must be in [1, {num_patches}], got {patches_per_expert!r}")
        self.num_patches, self.patches_per_expert = num_patches, patches_per_expert
        router = ExpertChoiceRouter(dim, num_experts, capacity_factor=patches_per_expert * num_experts / num_patches,
                                    group_size=num_patches)
        self.moe = moekit.MoE(d_model=dim, num_experts=num_experts, router=router, expert="mlp",
                              activation="relu", d_hidden=hidden, aux_loss_coef=0.0)
        self.readout = nn.Linear(dim, 1)

    def forward(self, x_BPD: torch.Tensor) -> torch.Tensor:
        """(B,) logits."""
        if x_BPD.shape[1] != self.num_patches:
            raise ValueError(f"x must have {self.num_patches} patches per example, got {tuple(x_BPD.shape)}")
        return self.readout(self.moe(x_BPD).sum(1)).squeeze(-1)


def selected_patches(model: PatchMoE, x_BPD: torch.Tensor) -> torch.Tensor:
    """(B, P) bool: the patches some expert chose in the last routing of `x_BPD`."""
    B, P, _ = x_BPD.shape
    with torch.no_grad():
        model(x_BPD)
    token_ids = model.moe.last_routing.token_ids
    chosen = torch.zeros(B * P, dtype=torch.bool)
    chosen[token_ids] = True
    return chosen.view(B, P)
