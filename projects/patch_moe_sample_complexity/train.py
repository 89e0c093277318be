"""Training and evaluation of R6's networks: full-batch logistic loss with the library's update step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.optim import UpdateStep, build_optimizer
from projects.patch_moe_sample_complexity.data import PatchData
from projects.patch_moe_sample_complexity.models import PatchMoE, selected_patches

__all__ = ["logistic_loss", "train", "accuracy", "routing_recall"]


def logistic_loss(logits_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
    """``mean log(1 + exp(−y f(x)))`` with y ∈ {−1, +1}."""
    return F.softplus(-y_B * logits_B).mean()


def train(model: nn.Module, data: PatchData, *, steps: int, lr: float, weight_decay: float = 0.0) -> list[float]:
    """Full-batch AdamW, cosine schedule to 0; returns the loss of every step."""
    update = UpdateStep(model, build_optimizer(model, name="adamw", lr=lr, weight_decay=weight_decay),
                        lr=lr, total_steps=steps, schedule="cosine")
    model.train()
    return [update(logistic_loss(model(data.x), data.y))["loss"] for _ in range(steps)]


@torch.no_grad()
def accuracy(model: nn.Module, data: PatchData, *, batch: int = 4096) -> float:
    model.eval()
    right = sum(int(((model(data.x[i:i + batch]) > 0).float() * 2 - 1).eq(data.y[i:i + batch]).sum())
                for i in range(0, data.y.numel(), batch))
    return right / data.y.numel()


@torch.no_grad()
def routing_recall(model: PatchMoE, data: PatchData, *, batch: int = 4096) -> dict:
    """Share of examples whose discriminative patch some expert chose, and share of spurious
    patches chosen (what the router keeps and what it discards)."""
    model.eval()
    signal = spurious = 0
    for i in range(0, data.y.numel(), batch):
        chosen_BP = selected_patches(model, data.x[i:i + batch])
        rows = torch.arange(chosen_BP.shape[0])
        signal += int(chosen_BP[rows, data.signal_pos[i:i + batch]].sum())
        spurious += int((chosen_BP & data.spurious_BP[i:i + batch]).sum())
    n_spur = int(data.spurious_BP.sum())
    return {"signal_kept": signal / data.y.numel(), "spurious_kept": spurious / n_spur if n_spur else float("nan")}
