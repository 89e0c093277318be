"""Multi-domain multi-task tabular models and their trainer: M3oE against domain-blind baselines.

Legend: B examples in a batch, N examples in a whole split, C categorical columns, R real-valued
columns, M embedding width, I = C·M + R backbone input, D domains, K tasks.

The setting of Zhang et al. (2024), SIGIR, "M3oE" (METHODS.md MT3): every example belongs to
one of D domains (e.g. user age groups) and has K binary tasks, so there are D·K (domain, task)
cells. A model maps ``(cat_BC, num_BR, domain_ids_B)`` to ``logits_BK``, row b's logits being
its own domain's. Architectures (`ARCHS`), all on the same `TabularEmbedding`:

- ``shared_bottom`` / ``mmoe``: the multi-task backbones of `moekit.layers.multigate`, blind to
  the domain;
- ``mmoe_domain``: MMoE whose input also embeds the domain id (one more categorical column);
- ``m3oe``: `moekit.layers.m3oe.M3oE`, domain-aware bottom, gates and towers.

`train_multidomain` minimises the sum over cells of each cell's mean binary cross-entropy
(`domain_task_bce`, as the released M3oE trainer does), stops early on the mean validation AUC
over cells and restores the best epoch. Models with structure parameters (M3oE's four
fusion weights) get the paper's bi-level, first-order DARTS-style update: the main AdamW steps
only `model_parameters()` on training batches; a separate Adam steps only
`structure_parameters()` on held-out (validation) batches, one step every ``structure_every``
main steps. (The released code takes its "validation" batch from the training loader once per
epoch and, through its ``~flag`` bug, also steps the structure weights with the main optimiser;
see `moekit.layers.m3oe`.)

Splits are duck-typed: ``cat`` (N, C) ints, ``num`` (N, R) floats, ``labels`` (N, K) in {0, 1}
and ``domain_ids`` (N,) in [0, D), e.g. `moekit.train.census.with_age_domains`'s splits.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.m3oe import M3oE
from moekit.layers.multigate import MMoE, SharedBottom
from moekit.models.multitask import BestEpoch, TabularEmbedding, binary_auc, closest_size

__all__ = ["ARCHS", "MultiDomainConfig", "MultiDomainModel", "config_for_budget", "domain_task_bce",
           "domain_task_auc", "predict_logits", "evaluate_cells", "MultiDomainResult", "train_multidomain"]

ARCHS = ("shared_bottom", "mmoe", "mmoe_domain", "m3oe")


class MultiDomainModel(nn.Module):
    """``(cat_BC, num_BR, domain_ids_B) → logits_BK``: a `TabularEmbedding` and a backbone.

    An `M3oE` backbone is given the domain ids; any other backbone (a `moekit.layers.multigate`
    model returning K tensors (B, 1)) ignores them unless ``domain_feature=True``, which appends
    the domain id to the categorical columns (the embedding must then have one more column,
    of vocabulary ``num_domains``).
    """

    def __init__(self, embedding: TabularEmbedding, backbone: nn.Module, *, num_domains: int,
                 domain_feature: bool = False):
        super().__init__()
        if backbone.d_in != embedding.d_out:
            raise ValueError(f"backbone d_in={backbone.d_in} does not match the embedding's output width "
                             f"{embedding.d_out}")
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        if isinstance(backbone, M3oE) and backbone.num_domains != num_domains:
            raise ValueError(f"M3oE has num_domains={backbone.num_domains}, the model {num_domains}")
        self.embedding, self.backbone = embedding, backbone
        self.num_domains, self.num_tasks = num_domains, backbone.num_tasks
        self.domain_feature = bool(domain_feature)

    def forward(self, cat_BC: torch.Tensor, num_BR: torch.Tensor, domain_ids_B: torch.Tensor) -> torch.Tensor:
        if domain_ids_B.shape != cat_BC.shape[:1]:
            raise ValueError(f"domain_ids must have shape ({cat_BC.shape[0]},), got {tuple(domain_ids_B.shape)}")
        if ((domain_ids_B < 0) | (domain_ids_B >= self.num_domains)).any():
            raise ValueError(f"domain_ids must lie in [0, num_domains={self.num_domains})")
        if self.domain_feature:
            cat_BC = torch.cat([cat_BC, domain_ids_B[:, None].to(cat_BC.dtype)], 1)
        x_BI = self.embedding(cat_BC, num_BR)
        if isinstance(self.backbone, M3oE):
            return self.backbone(x_BI, domain_ids_B)
        return torch.cat(self.backbone(x_BI), 1)                                        # (B, K)

    def structure_parameters(self) -> List[nn.Parameter]:
        """Parameters for the separate structure optimiser (M3oE's fusion weights; else none)."""
        return self.backbone.structure_parameters() if isinstance(self.backbone, M3oE) else []

    def model_parameters(self) -> List[nn.Parameter]:
        """Every other parameter: for the main optimiser."""
        skip = {id(p) for p in self.structure_parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    def structure(self) -> Optional[Dict[str, float]]:
        return self.backbone.structure() if isinstance(self.backbone, M3oE) else None

    def backbone_parameters(self) -> int:
        """Parameters after the embedding (what `config_for_budget` matches)."""
        return sum(p.numel() for p in self.backbone.parameters())


@dataclass(frozen=True)
class MultiDomainConfig:
    """Which architecture and how wide; `build` makes a `MultiDomainModel`.

    ``width`` is the one size knob: the shared bottom's width (shared_bottom), each expert's
    width (mmoe, mmoe_domain: ``num_experts`` one-layer experts), or for m3oe the STAR width,
    the bottom width and the (one-layer) experts' width all at once, with
    ``num_shared_experts`` shared experts. Every tower has ``tower_hidden`` units.
    """

    arch: str = "m3oe"
    embed_dim: int = 4
    width: int = 16
    tower_hidden: int = 8
    num_experts: int = 8
    num_shared_experts: int = 4
    detach_gate_input: bool = True

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")

    @property
    def domain_feature(self) -> bool:
        return self.arch == "mmoe_domain"

    def build_backbone(self, d_in: int, num_domains: int, num_tasks: int) -> nn.Module:
        """The backbone for data whose own columns embed to `d_in` (the domain column is added here)."""
        if self.arch == "shared_bottom":
            return SharedBottom(d_model=d_in, num_tasks=num_tasks, d_hidden=self.width, tower_hidden=self.tower_hidden)
        if self.arch in ("mmoe", "mmoe_domain"):
            d = d_in + (self.embed_dim if self.domain_feature else 0)
            return MMoE(d_model=d, num_experts=self.num_experts, num_tasks=num_tasks, d_hidden=self.width, tower_hidden=self.tower_hidden)
        return M3oE(d_model=d_in, num_domains=num_domains, num_tasks=num_tasks, num_shared_experts=self.num_shared_experts, star_dim=self.width,
                    bottom_dim=self.width, expert_dims=(self.width,), tower_hidden=self.tower_hidden,
                    detach_gate_input=self.detach_gate_input)

    def build(self, *, vocab_sizes: Sequence[int], num_continuous: int, num_domains: int,
              num_tasks: int) -> MultiDomainModel:
        vocab = list(vocab_sizes) + ([num_domains] if self.domain_feature else [])
        embedding = TabularEmbedding(vocab, num_continuous, self.embed_dim)
        d_in = len(vocab_sizes) * self.embed_dim + num_continuous
        return MultiDomainModel(embedding, self.build_backbone(d_in, num_domains, num_tasks),
                                num_domains=num_domains, domain_feature=self.domain_feature)


def config_for_budget(config: MultiDomainConfig, budget: int, *, d_in: int, num_domains: int,
                      num_tasks: int) -> MultiDomainConfig:
    """`config` with the ``width`` whose backbone parameter count is closest to `budget` (bisection)."""
    def count(w: int) -> int:
        backbone = replace(config, width=w).build_backbone(d_in, num_domains, num_tasks)
        return sum(p.numel() for p in backbone.parameters())

    return replace(config, width=closest_size(count, budget))


# ------------------------------------------------------------------------------------------
def domain_task_bce(logits_BK: torch.Tensor, labels_BK: torch.Tensor, domain_ids_B: torch.Tensor, *,
                    num_domains: int) -> torch.Tensor:
    """Sum over (domain, task) cells of the cell's mean binary cross-entropy.

    ``L = Σ_d Σ_t (1 / n_d) Σ_{b: dom_b = d} BCE(logit_{b,t}, y_{b,t})`` with ``n_d`` the batch's
    rows of domain d; a domain with no rows adds 0. Each cell is averaged on its own, so a small
    domain weighs as much as a large one (the released M3oE trainer's loss).
    """
    if logits_BK.shape != labels_BK.shape or logits_BK.dim() != 2 or domain_ids_B.shape != logits_BK.shape[:1]:
        raise ValueError(f"expected logits (B, K), labels (B, K) and domain_ids (B,), got {tuple(logits_BK.shape)}, "
                         f"{tuple(labels_BK.shape)} and {tuple(domain_ids_B.shape)}")
    bce_BK = F.binary_cross_entropy_with_logits(logits_BK, labels_BK.to(logits_BK.dtype), reduction="none")
    ids = domain_ids_B.long()
    sum_DK = bce_BK.new_zeros(num_domains, bce_BK.shape[1]).index_add(0, ids, bce_BK)
    count_D = torch.bincount(ids, minlength=num_domains).to(bce_BK.dtype)
    return (sum_DK / count_D.clamp_min(1)[:, None]).sum()


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
    """Fit on `domain_task_bce`; structure weights bi-level on validation batches; early stopping.

    Main step: AdamW(lr, weight_decay) on `model.model_parameters()` with a training batch.
    Structure step (when the model has structure parameters), after every `structure_every`
    main steps: Adam(structure_lr, no weight decay) on `model.structure_parameters()` with the
    next batch of a seeded, cycled shuffle of `val` — gradients are taken for the structure
    parameters only (first-order DARTS). After every epoch the mean validation AUC over cells is
    measured; training stops after `patience` epochs without improvement and the best epoch's
    weights (structure included) are restored, then `test` (if given) is scored. Batches come
    from ``torch.Generator``s seeded with `seed`. `log` receives each epoch's history record.
    """
    if min(epochs, batch_size, patience, structure_every) < 1:
        raise ValueError(f"epochs, batch_size, patience and structure_every must be >= 1, got {epochs}, "
                         f"{batch_size}, {patience}, {structure_every}")
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
    opt = torch.optim.AdamW(model.model_parameters(), lr=lr, weight_decay=weight_decay)
    s_params = model.structure_parameters()
    s_opt = torch.optim.Adam(s_params, lr=structure_lr) if s_params else None
    gen, v_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    v_batches: List[torch.Tensor] = []

    def structure_step() -> None:
        if not v_batches:
            v_batches.extend(torch.randperm(len(v_y), generator=v_gen).split(batch_size))
        idx = v_batches.pop()
        loss = domain_task_bce(model(v_cat[idx], v_num[idx], v_dom[idx]), v_y[idx], v_dom[idx], num_domains=D)
        grads = torch.autograd.grad(loss, s_params)
        for p, g in zip(s_params, grads):
            p.grad = g
        s_opt.step()

    best, history, step = BestEpoch(patience), [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        total, steps = 0.0, 0
        for idx in torch.randperm(len(y_NK), generator=gen).split(batch_size):
            loss = domain_task_bce(model(cat[idx], num[idx], dom_N[idx]), y_NK[idx], dom_N[idx], num_domains=D)
            opt.zero_grad(set_to_none=True)
            for p in s_params:
                p.grad = None
            loss.backward()
            opt.step()                   # the structure parameters are not in `opt`
            total, steps, step = total + loss.item(), steps + 1, step + 1
            if s_opt is not None and step % structure_every == 0:
                structure_step()
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
