"""The Census-Income multi-task study's training loop, AUC, early stopping and budget search.

Legend: B examples in a batch, N examples in a whole split, K tasks.

`train_multitask` fits a `moekit.models.MultiTaskModel` with AdamW (`moekit.optim`) on the sum
of the tasks' binary cross-entropies and stops early on the mean validation AUC (`BestEpoch`);
`binary_auc` is scikit-learn's ROC AUC behind input checks; `config_for_budget` sizes every backbone
to one parameter budget. Splits are duck-typed: anything with ``cat`` (N, C) ints, ``num`` (N, R)
floats and ``labels`` (N, K) in {0, 1}, e.g. `projects.census_multitask.data.TabularSplit`.
The multi-domain study (`projects.m3oe_census`) reuses `binary_auc`, `BestEpoch` and
`closest_size`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.multitask import MultiTaskConfig, MultiTaskModel
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_int

__all__ = ["closest_size", "config_for_budget", "binary_auc", "predict_logits", "evaluate_auc", "BestEpoch",
           "TrainResult", "train_multitask"]


def closest_size(count: Callable[[int], int], budget: int, *, largest: int = 4096) -> int:
    """The size w in 1..`largest` whose ``count(w)`` (non-decreasing in w) is closest to `budget`, by bisection."""
    lo, hi = 1, largest
    while lo < hi:                       # smallest w with count(w) >= budget
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < budget else (lo, mid)
    return min((lo, max(1, lo - 1)), key=lambda w: abs(count(w) - budget))


def config_for_budget(config: MultiTaskConfig, budget: int, *, d_in: int, num_tasks: int) -> MultiTaskConfig:
    """`config` with the ``expert_hidden`` whose backbone parameter count is closest to `budget`.

    The count grows with ``expert_hidden``, so a bisection over 1..4096 finds it.
    """
    def count(h: int) -> int:
        return sum(p.numel() for p in replace(config, expert_hidden=h).build_backbone(d_in, num_tasks).parameters())

    return replace(config, expert_hidden=closest_size(count, budget))


def binary_auc(scores_N: torch.Tensor, labels_N: torch.Tensor) -> float:
    """ROC AUC of `scores_N` for binary `labels_N` (ties count one half), by scikit-learn.

    `sklearn.metrics.roc_auc_score` computes it (the ``projects`` extra); this wrapper only
    refuses what would make it meaningless — lengths that differ, labels other than 0/1, NaN
    scores, a single class — with a message naming the problem.
    """
    from sklearn.metrics import roc_auc_score

    s_N = torch.as_tensor(scores_N).detach().reshape(-1).double()
    y_N = torch.as_tensor(labels_N).detach().reshape(-1)
    if s_N.shape != y_N.shape:
        raise ValueError(f"scores and labels must have the same length, got {s_N.numel()} and {y_N.numel()}")
    if not ((y_N == 0) | (y_N == 1)).all():
        raise ValueError("labels must be 0 or 1")
    if torch.isnan(s_N).any():
        raise ValueError("scores contain NaN")
    P = int((y_N == 1).sum())
    Q = y_N.numel() - P
    if P == 0 or Q == 0:
        raise ValueError(f"AUC needs both classes, got {P} positives and {Q} negatives")
    return float(roc_auc_score(y_N.numpy().astype(int), s_N.numpy()))


def _tensors(split):
    return (torch.as_tensor(split.cat, dtype=torch.long), torch.as_tensor(split.num, dtype=torch.float32),
            torch.as_tensor(split.labels, dtype=torch.float32))


@torch.no_grad()
def predict_logits(model: MultiTaskModel, split, *, batch_size: int = 16384) -> torch.Tensor:
    """(N, K) logits for a split, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    cat, num, _ = _tensors(split)
    out = torch.cat([model(cat[i:i + batch_size], num[i:i + batch_size]) for i in range(0, len(cat), batch_size)])
    model.train(was_training)
    return out


def evaluate_auc(model: MultiTaskModel, split) -> List[float]:
    """Per-task `binary_auc` of the model's logits on a split."""
    logits_NK = predict_logits(model, split)
    labels_NK = torch.as_tensor(split.labels)
    return [binary_auc(logits_NK[:, k], labels_NK[:, k]) for k in range(logits_NK.shape[1])]


class BestEpoch:
    """Early stopping on a validation score (higher is better; NaN counts as the worst): keeps a
    copy of the best epoch's weights; `update` says whether to stop after `patience` epochs
    without improvement; `restore` loads the best weights back."""

    def __init__(self, patience: int):
        self.patience = check_int("patience", patience, min=1)
        self.score, self.state, self.epoch = -math.inf, None, 0

    def update(self, model: nn.Module, epoch: int, score: float) -> bool:
        score = -math.inf if math.isnan(score) else score
        if self.state is None or score > self.score:
            self.score, self.state, self.epoch = score, copy.deepcopy(model.state_dict()), epoch
            return False
        return epoch - self.epoch >= self.patience

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)


@dataclass
class TrainResult:
    """Per-task AUCs of the restored best epoch (``test_auc`` None without a test split)."""

    val_auc: List[float]
    test_auc: Optional[List[float]]
    best_epoch: int
    epochs_run: int
    seconds: float
    history: List[dict] = field(default_factory=list)


def train_multitask(model: MultiTaskModel, train, val, test=None, *, epochs: int = 10, batch_size: int = 1024,
                    lr: float = 3e-3, weight_decay: float = 1e-4, patience: int = 2, seed: int = 0,
                    log: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """AdamW at a constant `lr` on ``Σ_k BCE(logit_k, y_k)`` (each task's mean over the batch, equal weights).

    The optimizer is `moekit.optim.build_optimizer` over every parameter (weight decay on the
    embeddings and biases too, as the README's runs were measured) and each update a
    `moekit.optim.UpdateStep` (no clipping; a non-finite loss stops with `NonFiniteError`).
    After every epoch the mean validation AUC over tasks is measured; training stops after
    `patience` epochs without improvement and the best epoch's weights are restored, then the
    test split (if given) is scored. Batches come from a ``torch.Generator`` seeded with `seed`.
    `log`, if given, is called with each epoch's history record.
    """
    check_int("epochs", epochs, min=1)
    check_int("batch_size", batch_size, min=1)
    check_int("patience", patience, min=1)
    start = time.perf_counter()
    cat, num, y_NK = _tensors(train)
    if y_NK.shape[1] != model.num_tasks:
        raise ValueError(f"train labels have {y_NK.shape[1]} tasks, the model {model.num_tasks}")
    update = UpdateStep(model, build_optimizer(model.parameters(), name="adamw", lr=lr, weight_decay=weight_decay))
    gen = torch.Generator().manual_seed(seed)
    best, history = BestEpoch(patience), []
    for epoch in range(1, epochs + 1):
        model.train()
        total, steps = 0.0, 0
        for idx in torch.randperm(len(y_NK), generator=gen).split(batch_size):
            logits_BK = model(cat[idx], num[idx])
            loss = F.binary_cross_entropy_with_logits(logits_BK, y_NK[idx], reduction="none").mean(0).sum()
            total, steps = total + update(loss)["loss"], steps + 1
        val_auc = evaluate_auc(model, val)
        record = {"epoch": epoch, "train_loss": total / steps, "val_auc": val_auc}
        history.append(record)
        if log is not None:
            log(record)
        if best.update(model, epoch, sum(val_auc) / len(val_auc)):
            break
    best.restore(model)
    return TrainResult(val_auc=history[best.epoch - 1]["val_auc"],
                       test_auc=evaluate_auc(model, test) if test is not None else None,
                       best_epoch=best.epoch, epochs_run=len(history), seconds=time.perf_counter() - start,
                       history=history)
