"""Vision Transformer whose MLP blocks can be `moekit.MoE` layers: V-MoE, and its dense twin.

Legend: B batch, C image channels, H height, W width, S tokens per image (patches, + 1 class
token), D model dim, L classes, E experts, K experts per token.

V-MoE (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts", NeurIPS;
METHODS.md CV1) is a ViT (Dosovitskiy et al. 2021) in which the MLP of every other block is a
sparse MoE: ``g(x) = TOP_k(softmax(W x))`` — softmax before top-k and no renormalisation
(``router_kwargs=(("norm", "raw"),)``), K = 2, a capacity ratio of about 1.05 in training, and
Batch Prioritised Routing (``drop_policy="probability"``): when an expert's buffer is short, the
pairs with the larger routing weight in the whole batch are kept and the least confident
(often background patches) dropped, so capacity can be cut at inference to trade accuracy for
compute. Routing, capacity and BPR are the `moekit.MoE` layer's own; this file only places it.
Departures from the paper, for a small CPU model: no router noise ``N(0, 1/E²)`` and the Switch
balance loss instead of importance + load losses (both are `MoE` options); within the k-th
choices BPR orders by that choice's weight, V-MoE by the token's top weight.

Blocks are pre-norm, ``x + attn(LN(x))``, ``x + mlp(LN(x))``, with LayerNorm as in ViT,
bidirectional ``nn.MultiheadAttention`` and learned position embeddings; the image is read
through a class token or by mean pooling.

`vit_dense_twin(config)` is the dense ViT with the same active parameters per token: each MoE
MLP becomes one dense MLP of hidden ``K · F_expert`` (the routers' D·E weights are the only
active parameters the twin does not have; `active_param_counts` counts both).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import DenseFFN
from moekit.layers import MoE, default_hidden, moe_layers
from moekit.routing import available as available_routers

__all__ = ["ViTConfig", "ViTMoE", "vit_dense_twin", "active_param_counts"]

_POOLS = ("cls", "mean")


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a `ViTMoE`; the defaults are a small V-MoE for 28×28 grey images.

    mlp: ``"mlp"`` (GELU, as in ViT) or a GLU variant (``"swiglu"`` …), for dense MLPs and experts.
    mlp_hidden: F of a dense MLP (None: `default_hidden`, 4·D for ``"mlp"``).
    moe_every: block i's MLP is an MoE layer when ``(i + 1) % moe_every == 0`` — 2 is V-MoE's
        "every other" (blocks 1, 3, …); 1 every block; 0 none.
    sparse: False builds the dense twin: the MLPs at MoE positions are dense, of hidden
        ``top_k · expert_hidden`` (see `vit_dense_twin`).
    expert_hidden: F of each expert (None: ``mlp_hidden``; V-MoE's experts are ViT-sized MLPs).
    capacity_factor, eval_capacity_factor, drop_policy: the MoE layers' capacity (``None``:
        dropless; ``"same"``: eval as in training) and who is dropped (``"probability"`` = BPR).
    router_kwargs: extra arguments of the router, as ``((name, value), ...)``.
    """

    image_size: int = 28
    patch_size: int = 4
    in_channels: int = 1
    num_classes: int = 10
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    pool: str = "cls"
    mlp: str = "mlp"
    mlp_hidden: Optional[int] = None
    moe_every: int = 2
    sparse: bool = True
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: Optional[int] = None
    router: str = "topk"
    router_kwargs: tuple = (("norm", "raw"),)
    capacity_factor: Optional[float] = 1.05
    eval_capacity_factor: Union[float, str, None] = "same"
    drop_policy: str = "probability"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    backend: str = "auto"

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "d_model", "n_layers",
                     "n_heads", "num_experts", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("mlp_hidden", "expert_hidden"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} equal heads")
        if self.pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {self.pool!r}")
        if isinstance(self.moe_every, bool) or not isinstance(self.moe_every, int) or self.moe_every < 0:
            raise ValueError(f"moe_every must be an int >= 0 (0: no MoE layer), got {self.moe_every!r}")
        if not isinstance(self.sparse, bool):
            raise ValueError(f"sparse must be a bool, got {self.sparse!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts={self.num_experts}, got {self.top_k}")
        if self.router not in available_routers():
            raise ValueError(f"router must be one of {available_routers()}, got {self.router!r}")
        if isinstance(self.router_kwargs, dict):       # accept a dict, store a hashable tuple
            object.__setattr__(self, "router_kwargs", tuple(sorted(self.router_kwargs.items())))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def is_moe_position(self, i: int) -> bool:
        """Whether block i's MLP is sparse in this model (or, with ``sparse=False``, widened in its place)."""
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    def mlp_width(self, i: int) -> int:
        """F of block i's MLP: each expert's at an MoE position (K times it in the dense twin),
        else the dense MLP's."""
        dense = self.mlp_hidden if self.mlp_hidden is not None else default_hidden(self.d_model, self.mlp)
        if not self.is_moe_position(i):
            return dense
        expert = self.expert_hidden if self.expert_hidden is not None else dense
        return expert if self.sparse else self.top_k * expert

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.sparse and self.is_moe_position(i)]


def vit_dense_twin(config: ViTConfig) -> ViTConfig:
    """The dense ViT with the same active parameters per token as `config` (minus the routers).

    Each MoE MLP (``K`` experts of hidden ``F_e`` per token) becomes one dense MLP of hidden
    ``K · F_e``: the same matmul FLOPs per token. Other blocks, attention and heads are unchanged.
    """
    return dataclasses.replace(config, sparse=False)


class ViTBlock(nn.Module):
    """Pre-norm transformer block; its MLP is a dense `DenseFFN` or a sparse `moekit.MoE`."""

    def __init__(self, config: ViTConfig, index: int):
        super().__init__()
        c = config
        self.attn_norm = nn.LayerNorm(c.d_model, eps=1e-6)
        self.attn = nn.MultiheadAttention(c.d_model, c.n_heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(c.d_model, eps=1e-6)
        self.is_moe = c.sparse and c.is_moe_position(index)
        if self.is_moe:
            self.mlp = MoE(d_model=c.d_model, num_experts=c.num_experts, top_k=c.top_k, d_hidden=c.mlp_width(index),
                           router=c.router, expert=c.mlp, capacity_factor=c.capacity_factor,
                           eval_capacity_factor=c.eval_capacity_factor, drop_policy=c.drop_policy,
                           aux_loss_coef=c.aux_loss_coef, z_loss_coef=c.z_loss_coef, backend=c.backend,
                           router_kwargs=dict(c.router_kwargs) or None)
        else:
            self.mlp = DenseFFN(c.d_model, c.mlp_width(index), expert=c.mlp)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        h_BSD = self.attn_norm(x_BSD)
        x_BSD = x_BSD + self.attn(h_BSD, h_BSD, h_BSD, need_weights=False)[0]
        # The MoE layer flattens all B·S tokens: capacity and BPR's priority order span the batch.
        return x_BSD + self.mlp(self.mlp_norm(x_BSD))


class ViTMoE(nn.Module):
    """``forward(images_BCHW, labels_B=None) -> (logits_BL, loss or None)``.

    The loss is the mean cross-entropy, without the MoE balancing losses: add
    `moekit.aux_loss(model)` when training.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig, got {type(config).__name__}")
        c = self.config = config
        # Non-overlapping P×P patches, each linearly projected to D (ViT eq. 1).
        self.patch_embed = nn.Conv2d(c.in_channels, c.d_model, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model)) if c.pool == "cls" else None
        n_tokens = c.num_patches + (c.pool == "cls")
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, c.d_model) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(c, i) for i in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=1e-6)
        self.head = nn.Linear(c.d_model, c.num_classes)
        # ViT zero-initialises the head: every class starts at probability 1/L.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def moe_blocks(self) -> list[ViTBlock]:
        return [b for b in self.blocks if b.is_moe]

    def forward(self, images_BCHW: torch.Tensor, labels_B: Optional[torch.Tensor] = None):
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if images_BCHW.dim() != 4 or tuple(images_BCHW.shape[1:]) != expected or not images_BCHW.is_floating_point():
            raise ValueError(f"images must be a floating (B, {', '.join(map(str, expected))}) tensor, got "
                             f"{images_BCHW.dtype} {tuple(images_BCHW.shape)}")
        B = images_BCHW.shape[0]
        x_BSD = self.patch_embed(images_BCHW).flatten(2).transpose(1, 2)      # (B, H/P · W/P, D)
        if self.cls_token is not None:
            x_BSD = torch.cat([self.cls_token.expand(B, -1, -1), x_BSD], dim=1)  # (B, S, D)
        x_BSD = x_BSD + self.pos_embed
        for block in self.blocks:
            x_BSD = block(x_BSD)
        x_BSD = self.norm(x_BSD)
        feat_BD = x_BSD[:, 0] if self.cls_token is not None else x_BSD.mean(1)
        logits_BL = self.head(feat_BD)
        loss = None
        if labels_B is not None:
            if labels_B.shape != (B,):
                raise ValueError(f"labels must have shape ({B},), got {tuple(labels_B.shape)}")
            loss = F.cross_entropy(logits_BL.float(), labels_B)
        return logits_BL, loss


def active_param_counts(model: nn.Module) -> dict:
    """``total`` and ``active`` (used per token) parameter counts of any model with MoE layers.

    Active counts each MoE layer's expert bank at ``K/E`` of its size; routers are active.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in moe_layers(model):
        bank = sum(p.numel() for p in moe.experts.parameters())
        inactive += bank - bank * moe.top_k // moe.num_experts
    return {"total": total, "active": total - inactive}
