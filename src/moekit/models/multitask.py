"""Multi-task tabular models: embeddings → shared-bottom / OMoE / MMoE / PLE → task logits.

Legend: B examples in a batch, N examples in a whole split, C categorical columns, R real-valued
columns, M embedding width, I = C·M + R backbone input, K tasks.

The recommendation-style multi-task setup of Ma, Zhao, Yi, Chen, Hong & Chi (2018), KDD,
"Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts" (§6.2,
UCI Census-Income), and of Tang, Liu, Zhao & Gong (2020), RecSys, "Progressive Layered
Extraction" (PLE). Every categorical column gets its own embedding table (one row per value,
row 0 for values unseen in training); the embeddings and the continuous columns are
concatenated into ``x_BI`` and fed to a backbone from `moekit.layers.multigate` — the
backbones are not re-implemented here — whose K towers give one logit per task.

`train_multitask` fits such a model with AdamW on the sum of the tasks' binary cross-entropies
and stops early on the mean validation AUC; `binary_auc` is the tie-aware rank (Mann–Whitney)
AUC. Splits are duck-typed: anything with ``cat`` (N, C) ints, ``num`` (N, R) floats and
``labels`` (N, K) in {0, 1}, e.g. `moekit.train.census.TabularSplit`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.multigate import MMoE, PLE, SharedBottom

__all__ = ["ARCHS", "BestEpoch", "TabularEmbedding", "MultiTaskConfig", "MultiTaskModel", "config_for_budget",
           "binary_auc", "predict_logits", "evaluate_auc", "TrainResult", "train_multitask"]

ARCHS = ("shared_bottom", "omoe", "mmoe", "ple")


class TabularEmbedding(nn.Module):
    """``(cat_BC, num_BR) → x_BI``: per-column embeddings (one table, row offsets) ++ continuous columns."""

    def __init__(self, vocab_sizes: Sequence[int], num_continuous: int, embed_dim: int):
        super().__init__()
        sizes = [int(v) for v in vocab_sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"vocab_sizes must be a non-empty list of positive ints, got {list(vocab_sizes)}")
        if num_continuous < 0 or embed_dim < 1:
            raise ValueError(f"need num_continuous >= 0 and embed_dim >= 1, got {num_continuous} and {embed_dim}")
        self.num_continuous, self.embed_dim = num_continuous, embed_dim
        self.d_out = len(sizes) * embed_dim + num_continuous
        self.table = nn.Embedding(sum(sizes), embed_dim)
        self.register_buffer("sizes_C", torch.tensor(sizes), persistent=False)
        self.register_buffer("offsets_C", torch.tensor([0] + sizes[:-1]).cumsum(0), persistent=False)

    def forward(self, cat_BC: torch.Tensor, num_BR: torch.Tensor) -> torch.Tensor:
        C = self.sizes_C.numel()
        if cat_BC.dim() != 2 or cat_BC.shape[1] != C or num_BR.shape != (cat_BC.shape[0], self.num_continuous):
            raise ValueError(f"expected cat (B, {C}) and num (B, {self.num_continuous}), "
                             f"got {tuple(cat_BC.shape)} and {tuple(num_BR.shape)}")
        if ((cat_BC < 0) | (cat_BC >= self.sizes_C)).any():
            raise ValueError(f"categorical ids must lie in [0, vocab_size) per column (sizes {self.sizes_C.tolist()})")
        emb_BCM = self.table(cat_BC + self.offsets_C)
        return torch.cat([emb_BCM.flatten(1), num_BR.to(emb_BCM.dtype)], 1)         # (B, C·M + R)


@dataclass(frozen=True)
class MultiTaskConfig:
    """Which backbone and how wide; `build` makes a `MultiTaskModel`.

    ``expert_hidden`` is H: each expert's width (omoe / mmoe / ple, at every PLE level) or the
    shared bottom's width (shared_bottom). ``num_experts`` applies to omoe / mmoe;
    ``num_shared_experts``, ``num_specific_experts`` (per task) and ``num_levels`` to ple.
    """

    arch: str = "mmoe"
    embed_dim: int = 4
    expert_hidden: int = 16
    tower_hidden: Optional[int] = 8
    num_experts: int = 8
    num_shared_experts: int = 2
    num_specific_experts: int = 2
    num_levels: int = 2

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")

    def build_backbone(self, d_in: int, num_tasks: int) -> nn.Module:
        common = dict(tower_hidden=self.tower_hidden, d_out=1)
        if self.arch == "shared_bottom":
            return SharedBottom(d_model=d_in, num_tasks=num_tasks, d_hidden=self.expert_hidden, **common)
        if self.arch in ("omoe", "mmoe"):
            return MMoE(d_model=d_in, num_experts=self.num_experts, num_tasks=num_tasks, d_hidden=self.expert_hidden, shared_gate=self.arch == "omoe",
                        **common)
        return PLE(d_model=d_in, num_tasks=num_tasks, num_shared_experts=self.num_shared_experts, num_specific_experts=self.num_specific_experts, d_hidden=self.expert_hidden,
                   num_levels=self.num_levels, **common)

    def build(self, *, vocab_sizes: Sequence[int], num_continuous: int, num_tasks: int) -> "MultiTaskModel":
        embedding = TabularEmbedding(vocab_sizes, num_continuous, self.embed_dim)
        return MultiTaskModel(embedding, self.build_backbone(embedding.d_out, num_tasks))


class MultiTaskModel(nn.Module):
    """``(cat_BC, num_BR) → logits_BK``: a `TabularEmbedding` and a multi-task backbone with 1-wide towers."""

    def __init__(self, embedding: TabularEmbedding, backbone: nn.Module):
        super().__init__()
        if backbone.d_in != embedding.d_out:
            raise ValueError(f"backbone d_in={backbone.d_in} does not match the embedding's output width "
                             f"{embedding.d_out}")
        self.embedding, self.backbone = embedding, backbone
        self.num_tasks = backbone.num_tasks

    def forward(self, cat_BC: torch.Tensor, num_BR: torch.Tensor) -> torch.Tensor:
        x_BI = self.embedding(cat_BC, num_BR)
        return torch.cat(self.backbone(x_BI), 1)                                    # (B, K)

    def backbone_parameters(self) -> int:
        """Parameters after the embedding (experts, gates, towers): what `config_for_budget` matches."""
        return sum(p.numel() for p in self.backbone.parameters())


def config_for_budget(config: MultiTaskConfig, budget: int, *, d_in: int, num_tasks: int) -> MultiTaskConfig:
    """`config` with the ``expert_hidden`` whose backbone parameter count is closest to `budget`.

    The count grows with ``expert_hidden``, so a bisection over 1..4096 finds it.
    """
    def count(h: int) -> int:
        return sum(p.numel() for p in replace(config, expert_hidden=h).build_backbone(d_in, num_tasks).parameters())

    return replace(config, expert_hidden=closest_size(count, budget))


def closest_size(count, budget: int, *, largest: int = 4096) -> int:
    """The size w in 1..`largest` whose ``count(w)`` (non-decreasing in w) is closest to `budget`, by bisection."""
    lo, hi = 1, largest
    while lo < hi:                       # smallest w with count(w) >= budget
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < budget else (lo, mid)
    return min((lo, max(1, lo - 1)), key=lambda w: abs(count(w) - budget))


def binary_auc(scores_N: torch.Tensor, labels_N: torch.Tensor) -> float:
    """ROC AUC by the rank (Mann–Whitney U) formula, ties counted one half.

    ``AUC = (Σ_{i: y_i = 1} rank_i − P(P+1)/2) / (P·Q)`` with P positives, Q negatives and
    ``rank`` the 1-based rank of the score, tied scores sharing their average rank — equal to
    ``P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)`` over all (positive, negative) pairs, in O(N log N).
    """
    s_N = torch.as_tensor(scores_N).detach().reshape(-1).double()
    y_N = torch.as_tensor(labels_N).detach().reshape(-1)
    if s_N.shape != y_N.shape:
        raise ValueError(f"scores and labels must have the same length, got {s_N.numel()} and {y_N.numel()}")
    if not ((y_N == 0) | (y_N == 1)).all():
        raise ValueError("labels must be 0 or 1")
    if torch.isnan(s_N).any():
        raise ValueError("scores contain NaN")
    pos_N = y_N == 1
    P = int(pos_N.sum())
    Q = y_N.numel() - P
    if P == 0 or Q == 0:
        raise ValueError(f"AUC needs both classes, got {P} positives and {Q} negatives")
    sorted_N, order_N = torch.sort(s_N)
    _, counts = torch.unique_consecutive(sorted_N, return_counts=True)
    last = counts.cumsum(0).double()                              # 1-based rank of each tie group's end
    rank_N = (last - (counts - 1) / 2).repeat_interleave(counts)  # average rank, in sorted order
    rank_sum = rank_N[pos_N[order_N]].sum().item()
    return (rank_sum - P * (P + 1) / 2) / (P * Q)


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


@dataclass
class TrainResult:
    """Per-task AUCs of the restored best epoch (``test_auc`` None without a test split)."""

    val_auc: List[float]
    test_auc: Optional[List[float]]
    best_epoch: int
    epochs_run: int
    seconds: float
    history: List[dict] = field(default_factory=list)


class BestEpoch:
    """Early stopping on a validation score (higher is better; NaN counts as the worst): keeps a
    copy of the best epoch's weights; `update` says whether to stop after `patience` epochs
    without improvement; `restore` loads the best weights back."""

    def __init__(self, patience: int):
        self.patience, self.score, self.state, self.epoch = patience, -math.inf, None, 0

    def update(self, model: nn.Module, epoch: int, score: float) -> bool:
        score = -math.inf if math.isnan(score) else score
        if self.state is None or score > self.score:
            self.score, self.state, self.epoch = score, copy.deepcopy(model.state_dict()), epoch
            return False
        return epoch - self.epoch >= self.patience

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)


def train_multitask(model: MultiTaskModel, train, val, test=None, *, epochs: int = 10, batch_size: int = 1024,
                    lr: float = 3e-3, weight_decay: float = 1e-4, patience: int = 2, seed: int = 0,
                    log=None) -> TrainResult:
    """AdamW on ``Σ_k BCE(logit_k, y_k)`` (each task's mean over the batch, equal weights).

    After every epoch the mean validation AUC over tasks is measured; training stops after
    `patience` epochs without improvement and the best epoch's weights are restored, then the
    test split (if given) is scored. Batches come from a ``torch.Generator`` seeded with `seed`.
    `log`, if given, is called with each epoch's history record.
    """
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError(f"epochs, batch_size and patience must be >= 1, got {epochs}, {batch_size}, {patience}")
    start = time.perf_counter()
    cat, num, y_NK = _tensors(train)
    if y_NK.shape[1] != model.num_tasks:
        raise ValueError(f"train labels have {y_NK.shape[1]} tasks, the model {model.num_tasks}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, history = BestEpoch(patience), []
    for epoch in range(1, epochs + 1):
        model.train()
        total, steps = 0.0, 0
        for idx in torch.randperm(len(y_NK), generator=gen).split(batch_size):
            logits_BK = model(cat[idx], num[idx])
            loss = F.binary_cross_entropy_with_logits(logits_BK, y_NK[idx], reduction="none").mean(0).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
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
