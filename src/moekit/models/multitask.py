"""Multi-task tabular models: embeddings → shared-bottom / OMoE / MMoE / PLE → task logits.

Legend: B examples in a batch, C categorical columns, R real-valued columns, M embedding width,
I = C·M + R backbone input, K tasks.

The recommendation-style multi-task setup of Ma, Zhao, Yi, Chen, Hong & Chi (2018), KDD,
"Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts"
(METHODS.md MT1), and of Tang, Liu, Zhao & Gong (2020), RecSys, "Progressive Layered Extraction"
(PLE, MT2). Every categorical column gets its own embedding table (one row per value, row 0
free for values unseen in training); the embeddings and the continuous columns are
concatenated into ``x_BI`` and fed to a backbone from `moekit.layers.multigate` — the
backbones are not re-implemented here — whose K towers give one logit per task.

The Census-Income study that trains these models (its loader, training loop with early
stopping on AUC, and parameter-budget search) is `projects/census_multitask`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from moekit.layers.multigate import PLE, MMoE, SharedBottom
from moekit.validate import check_choice, check_int

__all__ = ["ARCHS", "TabularEmbedding", "MultiTaskConfig", "MultiTaskModel"]

ARCHS = ("shared_bottom", "omoe", "mmoe", "ple")


class TabularEmbedding(nn.Module):
    """``(cat_BC, num_BR) → x_BI``: per-column embeddings (one table, row offsets) ++ continuous columns."""

    def __init__(self, vocab_sizes: Sequence[int], num_continuous: int, embed_dim: int):
        super().__init__()
        sizes = [check_int(f"vocab_sizes[{i}]", v, min=1) for i, v in enumerate(vocab_sizes)]
        if not sizes:
            raise ValueError(f"vocab_sizes must be a non-empty list of positive ints, got {list(vocab_sizes)}")
        check_int("num_continuous", num_continuous, min=0)
        check_int("embed_dim", embed_dim, min=1)
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
        check_choice("arch", self.arch, ARCHS)
        for name in ("embed_dim", "expert_hidden", "num_experts", "num_shared_experts", "num_levels"):
            check_int(name, getattr(self, name), min=1)
        check_int("num_specific_experts", self.num_specific_experts, min=0)
        check_int("tower_hidden", self.tower_hidden, min=1, allow_none=True)

    def build_backbone(self, d_in: int, num_tasks: int) -> nn.Module:
        common = dict(tower_hidden=self.tower_hidden, d_out=1)
        if self.arch == "shared_bottom":
            return SharedBottom(d_model=d_in, num_tasks=num_tasks, d_hidden=self.expert_hidden, **common)
        if self.arch in ("omoe", "mmoe"):
            return MMoE(d_model=d_in, num_experts=self.num_experts, num_tasks=num_tasks, d_hidden=self.expert_hidden,
                        shared_gate=self.arch == "omoe",
                        **common)
        return PLE(d_model=d_in, num_tasks=num_tasks, num_shared_experts=self.num_shared_experts,
                   num_specific_experts=self.num_specific_experts,
                   d_hidden=self.expert_hidden,
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
        """Parameters after the embedding (experts, gates, towers): what a parameter budget counts."""
        return sum(p.numel() for p in self.backbone.parameters())
