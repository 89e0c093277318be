"""Multi-domain multi-task tabular models and M3oE's bi-level update step.

Legend: B examples in a batch, C categorical columns, R real-valued columns, M embedding width,
I = C·M + R backbone input, D domains, K tasks.

The setting of Zhang et al. (2024), SIGIR, "M3oE" (METHODS.md MT3): every example belongs to
one of D domains (e.g. user age groups) and has K binary tasks, so there are D·K (domain, task)
cells. A model maps ``(cat_BC, num_BR, domain_ids_B) → logits_BK``, row b's logits being its
own domain's. Architectures (`ARCHS`), all on the same `TabularEmbedding`:

- ``shared_bottom`` / ``mmoe``: the multi-task backbones of `moekit.layers.multigate`, blind to
  the domain;
- ``ple``: `moekit.layers.multigate.PLE` (two extraction levels), blind to the domain;
- ``mmoe_domain``: MMoE whose input also embeds the domain id (one more categorical column);
- ``star``: `moekit.layers.star.STAR`, star-topology layers per domain, a tower per task;
- ``m3oe``: `moekit.layers.m3oe.M3oE`, domain-aware bottom, gates and towers.

The method's loss is `domain_task_bce`: the sum over cells of each cell's mean binary
cross-entropy (as the released M3oE trainer computes it). Its update is `BiLevelStep`, the
paper's first-order DARTS-style scheme: the main AdamW steps only `model_parameters()` on a
training batch; a separate Adam steps only `structure_parameters()` (M3oE's four fusion
weights) on a held-out batch, every ``structure_every`` main steps. (The released code takes
its "validation" batch from the training loader once per epoch and, through its ``~flag`` bug,
also steps the structure weights with the main optimiser; see `moekit.layers.m3oe`.)

The Census-Income age-domain study with its epoch loop, early stopping and per-cell AUC is
`projects/m3oe_census`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.m3oe import M3oE
from moekit.layers.multigate import PLE, MMoE, SharedBottom
from moekit.layers.star import STAR
from moekit.models.multitask import TabularEmbedding
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_bool, check_choice, check_instance, check_int, check_number

__all__ = ["ARCHS", "MultiDomainConfig", "MultiDomainModel", "domain_task_bce", "BiLevelStep"]

ARCHS = ("shared_bottom", "mmoe", "ple", "mmoe_domain", "star", "m3oe")


class MultiDomainModel(nn.Module):
    """``(cat_BC, num_BR, domain_ids_B) → logits_BK``: a `TabularEmbedding` and a backbone.

    An `M3oE` backbone (or any with ``takes_domain_ids = True``, e.g. `STAR`) is given the
    domain ids; any other backbone (a `moekit.layers.multigate`
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
        check_int("num_domains", num_domains, min=1)
        check_bool("domain_feature", domain_feature)
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
        if isinstance(self.backbone, M3oE) or getattr(self.backbone, "takes_domain_ids", False):
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
        """Parameters after the embedding (what a parameter budget counts)."""
        return sum(p.numel() for p in self.backbone.parameters())


@dataclass(frozen=True)
class MultiDomainConfig:
    """Which architecture and how wide; `build` makes a `MultiDomainModel`.

    ``width`` is the one size knob: the shared bottom's width (shared_bottom), each expert's
    width (mmoe, mmoe_domain: ``num_experts`` one-layer experts; ple: 2 levels of
    ``num_shared_experts`` shared and 1 task-specific expert per task), the star layer's width
    (star: one layer, an auxiliary domain network of ``tower_hidden`` units), or for m3oe the STAR width,
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
        check_choice("arch", self.arch, ARCHS)
        for name in ("embed_dim", "width", "tower_hidden", "num_experts", "num_shared_experts"):
            check_int(name, getattr(self, name), min=1)
        check_bool("detach_gate_input", self.detach_gate_input)

    @property
    def domain_feature(self) -> bool:
        return self.arch == "mmoe_domain"

    def build_backbone(self, d_in: int, num_domains: int, num_tasks: int) -> nn.Module:
        """The backbone for data whose own columns embed to `d_in` (the domain column is added here)."""
        if self.arch == "shared_bottom":
            return SharedBottom(d_model=d_in, num_tasks=num_tasks, d_hidden=self.width, tower_hidden=self.tower_hidden)
        if self.arch == "ple":
            return PLE(d_model=d_in, num_tasks=num_tasks, num_shared_experts=self.num_shared_experts,
                       num_specific_experts=1, d_hidden=self.width, num_levels=2, tower_hidden=self.tower_hidden)
        if self.arch == "star":
            return STAR(d_model=d_in, num_domains=num_domains, num_tasks=num_tasks, dims=(self.width,),
                        tower_hidden=self.tower_hidden, aux_hidden=self.tower_hidden)
        if self.arch in ("mmoe", "mmoe_domain"):
            d = d_in + (self.embed_dim if self.domain_feature else 0)
            return MMoE(d_model=d, num_experts=self.num_experts, num_tasks=num_tasks, d_hidden=self.width,
                        tower_hidden=self.tower_hidden)
        return M3oE(d_model=d_in, num_domains=num_domains, num_tasks=num_tasks,
                    num_shared_experts=self.num_shared_experts,
                    star_dim=self.width,
                    bottom_dim=self.width, expert_dims=(self.width,), tower_hidden=self.tower_hidden,
                    detach_gate_input=self.detach_gate_input)

    def build(self, *, vocab_sizes: Sequence[int], num_continuous: int, num_domains: int,
              num_tasks: int) -> MultiDomainModel:
        vocab = list(vocab_sizes) + ([num_domains] if self.domain_feature else [])
        embedding = TabularEmbedding(vocab, num_continuous, self.embed_dim)
        d_in = len(vocab_sizes) * self.embed_dim + num_continuous
        return MultiDomainModel(embedding, self.build_backbone(d_in, num_domains, num_tasks),
                                num_domains=num_domains, domain_feature=self.domain_feature)


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


class BiLevelStep:
    """M3oE's update (METHODS.md MT3): the model on a training batch, the structure on a held-out one.

        step = BiLevelStep(model, lr=3e-3, weight_decay=1e-4, structure_lr=1e-3)
        for idx in batches:
            loss = domain_task_bce(model(cat[idx], num[idx], dom[idx]), y[idx], dom[idx], num_domains=D)
            step(loss, held_out_loss=lambda: <the loss of the next validation batch>)

    Main update: AdamW (`moekit.optim.build_optimizer`, weight decay on every parameter, constant
    `lr`) over ``model.model_parameters()``; gradients of `loss` are taken for those parameters
    only, so training data never moves the structure weights. Structure update, after every
    `structure_every` main updates when the model has structure parameters and
    ``structure_lr > 0``: ``held_out_loss()`` is computed with the freshly updated model and
    Adam (no weight decay) steps ``model.structure_parameters()`` alone on its gradient — first
    order: no gradient through the main step. Both updates are `moekit.optim.UpdateStep`s, so a
    non-finite loss or gradient raises `moekit.optim.NonFiniteError` before any parameter moves;
    `grad_clip` bounds the main update's gradient norm. ``structure_lr=0`` keeps the structure
    weights fixed (no held-out loss is computed).

    Args:
        model: a `MultiDomainModel`, or any module with ``model_parameters()`` and
            ``structure_parameters()``.
    """

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0, structure_lr: float = 1e-3,
                 structure_every: int = 1, grad_clip: float = 0.0):
        check_instance("model", model, nn.Module)
        for name in ("model_parameters", "structure_parameters"):
            if not callable(getattr(model, name, None)):
                raise TypeError(f"model must have a {name}() method (e.g. a MultiDomainModel), "
                                f"got {type(model).__name__}")
        structure_lr = check_number("structure_lr", structure_lr, min=0)
        self.structure_every = check_int("structure_every", structure_every, min=1)
        self.model = model
        self._main_params = [p for p in model.model_parameters() if p.requires_grad]
        self._structure_params = [p for p in model.structure_parameters() if p.requires_grad]
        self.main = UpdateStep(model, build_optimizer(self._main_params, name="adamw", lr=lr,
                                                      weight_decay=weight_decay), grad_clip=grad_clip)
        self.structure = None
        if self._structure_params and structure_lr > 0:
            # bias_update=False: the router biases belong to the main update, once per step
            self.structure = UpdateStep(model, build_optimizer(self._structure_params, name="adam", lr=structure_lr),
                                        bias_update=False)

    @property
    def step(self) -> int:
        """Main updates made so far."""
        return self.main.step

    def __call__(self, loss: torch.Tensor, held_out_loss: Optional[Callable[[], torch.Tensor]] = None) -> dict:
        """One main update on `loss`, then (when due) one structure update on ``held_out_loss()``.

        Returns ``{"loss", "grad_norm", "structure_loss"}`` (``structure_loss`` None when no
        structure update was made).
        """
        check_instance("loss", loss, torch.Tensor)
        structure_due = self.structure is not None and (self.main.step + 1) % self.structure_every == 0
        if structure_due and held_out_loss is None:         # refused before any parameter moves
            raise ValueError(f"held_out_loss is needed at step {self.main.step + 1}: the model has structure "
                             f"parameters and structure_every={self.structure_every}")
        torch.autograd.backward(loss, inputs=self._main_params)
        info = self.main(loss_value=float(loss.detach()))
        out = {"loss": info["loss"], "grad_norm": info["grad_norm"], "structure_loss": None}
        if structure_due:
            s_loss = held_out_loss()
            check_instance("held_out_loss()", s_loss, torch.Tensor)
            torch.autograd.backward(s_loss, inputs=self._structure_params)
            out["structure_loss"] = self.structure(loss_value=float(s_loss.detach()))["loss"]
        return out
