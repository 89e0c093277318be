"""Vision Transformer whose MLP blocks can be `moekit.MoE` layers: V-MoE, and its dense twin.

Legend: B batch, C image channels, H height, W width, S tokens per image (patches, + 1 class
token), D model dim, L classes, E experts, K experts per token.

V-MoE (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts", NeurIPS;
METHODS.md CV1) is a ViT (Dosovitskiy et al. 2021) in which the MLP of every other block is a
sparse MoE: ``g(x) = TOP_k(softmax(W x))`` — softmax before top-k and no renormalisation
(``router_kwargs={"norm": "raw"}``), K = 2, a capacity ratio of about 1.05 in training, and
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

Every registered router fits (`moekit.available_routers()`): the encoder sees the whole image,
so routers that look at other tokens (expert choice, BASE, Sinkhorn) need no causal fallback.
Routers that route by token id (hash, StableMoE's distilled stage) get each token's position in
the sequence (0 the class token, then the patches in raster order) as its id — a fixed spatial
routing; a router that needs another per-token input (task ids) is refused by `ViTConfig`.

`vit_dense_twin(config)` is the dense ViT with the same active parameters per token: each MoE
MLP becomes one dense MLP of hidden ``K · F_expert`` (the routers' D·E weights are the only
active parameters the twin does not have; `active_param_counts` counts both).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import DenseFFN
from moekit.layers import MoEConfig, default_hidden, moe_layers
from moekit.models.transformer import experts_per_token
from moekit.validate import check_bool, check_choice, check_instance, check_int

__all__ = ["ViTConfig", "ViTMoE", "vit_dense_twin", "active_param_counts", "VMOE_DEFAULTS"]

# V-MoE's layer: K = 2, softmax before top-k without renormalisation, capacity ratio 1.05 with
# Batch Prioritised Routing.
VMOE_DEFAULTS = MoEConfig(num_experts=8, top_k=2, router_kwargs={"norm": "raw"}, capacity_factor=1.05,
                          drop_policy="probability")

_POOLS = ("cls", "mean")


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a `ViTMoE`; the defaults are a small V-MoE for 28×28 grey images.

    mlp: ``"mlp"`` (GELU, as in ViT) or a GLU variant (``"swiglu"`` …), for dense MLPs and experts.
    mlp_hidden: F of a dense MLP (None: `default_hidden`, 4·D for ``"mlp"``).
    moe_every: block i's MLP is an MoE layer when ``(i + 1) % moe_every == 0`` — 2 is V-MoE's
        "every other" (blocks 1, 3, …); 1 every block; 0 none.
    sparse: False builds the dense twin: the MLPs at MoE positions are dense, of hidden
        ``K · F_expert`` (see `vit_dense_twin`).
    moe: the MoE layers' settings (`moekit.MoEConfig`; a dict is accepted). Its ``expert``
        defaults to ``mlp`` and its ``d_hidden`` (each expert's F) to ``mlp_hidden`` — V-MoE's
        experts are ViT-sized MLPs. Default: `VMOE_DEFAULTS`.
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
    moe: MoEConfig = VMOE_DEFAULTS

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "d_model", "n_layers", "n_heads"):
            check_int(name, getattr(self, name), min=1)
        check_int("mlp_hidden", self.mlp_hidden, min=1, allow_none=True)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} equal heads")
        check_choice("pool", self.pool, _POOLS)
        check_int("moe_every", self.moe_every, min=0)
        check_bool("sparse", self.sparse)
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        check_instance("moe", self.moe, MoEConfig, what="a moekit.MoEConfig or a dict of its fields")
        if any(self.is_moe_position(i) for i in range(self.n_layers)):
            layer = self.block_moe(next(i for i in range(self.n_layers) if self.is_moe_position(i))).check(self.d_model)
            inputs = [n for n, p in inspect.signature(layer.router.forward).parameters.items()
                      if p.kind == p.KEYWORD_ONLY and n not in ("mask", "token_ids")]
            if inputs:
                raise ValueError(f"moe.router={self.moe.router!r} routes by per-token inputs {inputs}, which a "
                                 f"ViTMoE does not have (it gives token_ids: the token positions)")
            v = getattr(layer.router, "vocab_size", None)
            S = self.num_patches + (self.pool == "cls")
            if isinstance(v, int) and v < S:
                raise ValueError(f"moe.router={self.moe.router!r} routes token ids below router_kwargs "
                                 f"vocab_size={v}; a ViTMoE gives the {S} token positions as ids "
                                 f"(set router_kwargs={{'vocab_size': {S}}})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def is_moe_position(self, i: int) -> bool:
        """Whether block i's MLP is sparse in this model (or, with ``sparse=False``, widened in its place)."""
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    @property
    def dense_hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else default_hidden(self.d_model, self.mlp)

    @property
    def expert_hidden(self) -> int:
        """F of each expert: ``moe.d_hidden``, else the dense MLP's."""
        return self.moe.d_hidden if self.moe.d_hidden is not None else self.dense_hidden

    def block_moe(self, i: int) -> MoEConfig:
        """`moe` as block i builds it: experts of the MLP's kind and the expert width."""
        return dataclasses.replace(self.moe, expert=self.moe.expert or self.mlp, d_hidden=self.expert_hidden)

    def mlp_width(self, i: int) -> int:
        """F of block i's MLP: each expert's at an MoE position (K times it in the dense twin),
        else the dense MLP's. K of a router without a fixed count is its nominal count
        (`moekit.models.transformer.experts_per_token`), rounded up."""
        if not self.is_moe_position(i):
            return self.dense_hidden
        if self.sparse:
            return self.expert_hidden
        k = experts_per_token(self.block_moe(i).check(self.d_model))
        return int(math.ceil(k)) * self.expert_hidden

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
        self._wants_token_ids = False
        if self.is_moe:
            self.mlp = c.block_moe(index).build(c.d_model)
            # Routers that route by token id (hash) take the token positions (see the module docstring).
            self._wants_token_ids = "token_ids" in inspect.signature(self.mlp.router.forward).parameters
        else:
            self.mlp = DenseFFN(c.d_model, c.mlp_width(index), expert=c.mlp)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        h_BSD = self.attn_norm(x_BSD)
        x_BSD = x_BSD + self.attn(h_BSD, h_BSD, h_BSD, need_weights=False)[0]
        # The MoE layer flattens all B·S tokens: capacity and BPR's priority order span the batch.
        h_BSD = self.mlp_norm(x_BSD)
        if self._wants_token_ids:
            pos_BS = torch.arange(S, device=x_BSD.device).expand(B, S)
            return x_BSD + self.mlp(h_BSD, token_ids=pos_BS)
        return x_BSD + self.mlp(h_BSD)


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


def active_param_counts(model: nn.Module, *, measured: bool = False) -> dict:
    """``total`` and ``active`` (used per token) parameter counts of any model with MoE layers.

    Active counts each MoE layer's expert bank at ``K/E`` of its size (K: the nominal experts per
    token, `moekit.models.transformer.experts_per_token`; with ``measured=True`` the mean of the
    layer's last forward pass, for routers that pick their own count); routers are active.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in moe_layers(model):
        experts = getattr(moe, "experts", None)
        if experts is None or not hasattr(moe, "router"):
            continue
        bank = sum(p.numel() for p in experts.parameters())
        inactive += bank - int(bank * experts_per_token(moe, measured=measured) // moe.num_experts)
    return {"total": total, "active": total - inactive}
