"""The M3oE Census-Income study's trainer: epochs of `moekit.models.BiLevelStep`, per-cell AUC, early stopping.

Legend: B examples in a batch, N examples in a whole split, D domains, K tasks.

`train_multidomain` minimises `moekit.models.domain_task_bce` with the library's bi-level
update (`BiLevelStep`: AdamW on the model, Adam on M3oE's structure weights with validation
batches), stops early on the mean validation AUC over (domain, task) cells and restores the best
epoch. Splits are duck-typed: ``cat`` (N, C) ints, ``num`` (N, R) floats, ``labels`` (N, K) in
{0, 1} and ``domain_ids`` (N,) in [0, D), e.g. `projects.census_multitask.data.with_age_domains`'s.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional

import torch

from moekit.models.multidomain import BiLevelStep, MultiDomainConfig, MultiDomainModel, domain_task_bce
from moekit.validate import check_int
from projects.census_multitask.train import BestEpoch, binary_auc, closest_size

__all__ = ["config_for_budget", "domain_task_auc", "predict_logits", "evaluate_cells", "MultiDomainResult",
           "train_multidomain"]


def config_for_budget(config: MultiDomainConfig, budget: int, *, d_in: int, num_domains: int,
                      num_tasks: int) -> MultiDomainConfig:
    """`config` with the ``width`` whose backbone parameter count is closest to `budget` (bisection)."""
    def count(w: int) -> int:
        backbone = replace(config, width=w).build_backbone(d_in, num_domains, num_tasks)
        return sum(p.numel() for p in backbone.parameters())

    return replace(config, width=closest_size(count, budget))


def domain_task_auc(logits_NK: torch.Tensor, labels_NK: torch.Tensor, domain_ids_N: torch.Tensor, *,
                    num_domains: int) -> List[List[float]]:
    """``auc[d][t]``: `binary_auc` of task t on the rows of domain d (NaN if the cell lacks a class)."""
    out = []
    for d in range(num_domains):
        rows = torch.as_tensor(domain_ids_N) == d
        row = []
        for t in range(logits_NK.shape[1]):
            y = torch.as_tensor(labels_NK)[rows, t]
            both = bool((y == 1).any()) and bool((y == 0).any())
            row.append(binary_auc(logits_NK[rows, t], y) if both else math.nan)
        out.append(row)
    return out


def _tensors(split):
    return (torch.as_tensor(split.cat, dtype=torch.long), torch.as_tensor(split.num, dtype=torch.float32),
            torch.as_tensor(split.labels, dtype=torch.float32), torch.as_tensor(split.domain_ids, dtype=torch.long))


@torch.no_grad()
def predict_logits(model: MultiDomainModel, split, *, batch_size: int = 16384) -> torch.Tensor:
    """(N, K) logits for a split, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    cat, num, _, dom = _tensors(split)
    out = torch.cat([model(cat[i:i + batch_size], num[i:i + batch_size], dom[i:i + batch_size])
                     for i in range(0, len(cat), batch_size)])
    model.train(was_training)
    return out


def evaluate_cells(model: MultiDomainModel, split) -> List[List[float]]:
    """Per-(domain, task) AUC of the model on a split: ``auc[d][t]``."""
    return domain_task_auc(predict_logits(model, split), torch.as_tensor(split.labels),
                           torch.as_tensor(split.domain_ids), num_domains=model.num_domains)


def _mean(cells: List[List[float]]) -> float:
    vals = [a for row in cells for a in row if not math.isnan(a)]
    return sum(vals) / len(vals) if vals else math.nan


@dataclass
class MultiDomainResult:
    """Per-cell AUCs ``[d][t]`` of the restored best epoch, their means, and the structure weights."""

    val_auc: List[List[float]]
    test_auc: Optional[List[List[float]]]
    best_epoch: int
    epochs_run: int
    seconds: float
    structure: Optional[Dict[str, float]]
    history: List[dict] = field(default_factory=list)

    @property
    def val_mean(self) -> float:
        return _mean(self.val_auc)

    @property
    def test_mean(self) -> Optional[float]:
        return None if self.test_auc is None else _mean(self.test_auc)


def train_multidomain(model: MultiDomainModel, train, val, test=None, *, epochs: int = 10, batch_size: int = 1024,
                      lr: float = 3e-3, weight_decay: float = 1e-4, structure_lr: float = 1e-3,
                      structure_every: int = 1, patience: int = 2, seed: int = 0,
                      log: Optional[Callable[[dict], None]] = None) -> MultiDomainResult:
    """Fit on `domain_task_bce` with `BiLevelStep`; structure weights on validation batches; early stopping.

    Main update: AdamW(lr, weight_decay) on `model.model_parameters()` with a training batch.
    Structure update (when the model has structure parameters and ``structure_lr > 0``), after
    every `structure_every` main updates: Adam(structure_lr) on `model.structure_parameters()`
    with the next batch of a seeded, cycled shuffle of `val` (first-order DARTS). After every
    epoch the mean validation AUC over cells is measured; training stops after `patience` epochs
    without improvement and the best epoch's weights (structure included) are restored, then
    `test` (if given) is scored. Batches come from ``torch.Generator``s seeded with `seed`.
    `log` receives each epoch's history record.
    """
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience),
                    ("structure_every", structure_every)):
        check_int(name, v, min=1)
    start = time.perf_counter()
    D = model.num_domains
    cat, num, y_NK, dom_N = _tensors(train)
    v_cat, v_num, v_y, v_dom = _tensors(val)
    if y_NK.shape[1] != model.num_tasks or v_y.shape[1] != model.num_tasks:
        raise ValueError(f"train / val labels have {y_NK.shape[1]} / {v_y.shape[1]} tasks, the model {model.num_tasks}")
    if len(v_y) == 0 or len(y_NK) == 0:
        raise ValueError(f"train and val must hold at least one row, got {len(y_NK)} and {len(v_y)}")
    for name, d in (("train", dom_N), ("val", v_dom)):
        if len(d) and (d.min() < 0 or d.max() >= D):
            raise ValueError(f"{name} domain_ids must lie in [0, {D}), got {int(d.min())}..{int(d.max())}")
    step = BiLevelStep(model, lr=lr, weight_decay=weight_decay, structure_lr=structure_lr,
                       structure_every=structure_every)
    gen, v_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    v_batches: List[torch.Tensor] = []

    def held_out_loss() -> torch.Tensor:
        if not v_batches:
            v_batches.extend(torch.randperm(len(v_y), generator=v_gen).split(batch_size))
        idx = v_batches.pop()
        return domain_task_bce(model(v_cat[idx], v_num[idx], v_dom[idx]), v_y[idx], v_dom[idx], num_domains=D)

    best, history = BestEpoch(patience), []
    for epoch in range(1, epochs + 1):
        model.train()
        total, steps = 0.0, 0
        for idx in torch.randperm(len(y_NK), generator=gen).split(batch_size):
            loss = domain_task_bce(model(cat[idx], num[idx], dom_N[idx]), y_NK[idx], dom_N[idx], num_domains=D)
            total, steps = total + step(loss, held_out_loss)["loss"], steps + 1
        val_auc = evaluate_cells(model, val)
        record = {"epoch": epoch, "train_loss": total / steps, "val_auc": val_auc, "val_mean": _mean(val_auc),
                  "structure": model.structure()}
        history.append(record)
        if log is not None:
            log(record)
        if best.update(model, epoch, record["val_mean"]):
            break
    best.restore(model)
    return MultiDomainResult(val_auc=history[best.epoch - 1]["val_auc"],
                             test_auc=evaluate_cells(model, test) if test is not None else None,
                             best_epoch=best.epoch, epochs_run=len(history), seconds=time.perf_counter() - start,
                             structure=model.structure(), history=history)
