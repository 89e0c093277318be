"""Decoder-only transformer language model whose feed-forward layers can be `moekit.MoE`.

Legend: B batch, S sequence, D model dim, H heads, F hidden dim, V vocabulary, E experts.

Pre-norm blocks ``x + attn(norm(x))``, ``x + ffn(norm(x))`` with RMSNorm (Zhang & Sennrich
2019), rotary positions (Su et al. 2021, RoFormer) and ``F.scaled_dot_product_attention``.
The feed-forward of a block is either a dense SwiGLU/MLP or a sparse MoE layer (Shazeer et al.
2017; Switch; GShard; DeepSeekMoE): placed in every layer or every other layer, after an
optional number of leading dense layers (DeepSeekMoE keeps its first layer dense), with any
registered router that suits a causal LM (`check_causal_lm_router`) and optional shared experts.

Mixture-of-Depths (Raposo et al. 2024, METHODS.md CC1; ``mod_layers``): in the chosen blocks
only the top ``⌈mod_capacity · S⌉`` tokens of each sequence (by a linear router) run attention and
FFN, at their own rotary positions; the rest ride the residual stream. In eval mode those blocks
decide per token by the causal predictor (`moekit.layers.MixtureOfDepths`), so no token's
computation depends on later tokens; with MoE FFNs this is MoDE.

`dense_twin(config)` is the dense model with the same *active* parameters per token: each
MoE layer becomes a dense FFN of hidden ``K · F_expert + shared hidden`` (the router's D·E
weights are the only active parameters the twin does not have).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import DenseFFN
from moekit.layers import MixtureOfDepths, MoE, MoEConfig, default_hidden
from moekit.layers.depths import capacity_tokens
from moekit.validate import check_instance, check_int, check_number

__all__ = ["TransformerConfig", "TransformerLM", "KVCache", "dense_twin", "param_counts", "flops_per_token",
           "experts_per_token", "check_causal_lm_router", "FLAT_MOE_KEYS", "DepthRoutedBlock"]

_PLACEMENTS = ("every", "every_other", "none")


# The flat spelling of the MoE fields: the run config's model section (``--set model.top_k=2``)
# and checkpoints written before `TransformerConfig.moe` existed. Each maps to its `MoEConfig`
# field; two are named after the dense FFN's ``ffn_hidden``.
FLAT_MOE_KEYS = {("expert_hidden" if f.name == "d_hidden" else "shared_hidden" if f.name == "shared_d_hidden"
                  else f.name): f.name for f in dataclasses.fields(MoEConfig)}


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a `TransformerLM`. Built once; layers receive explicit keyword arguments.

    ffn_hidden: hidden size F of a dense FFN (None: `default_hidden`, ⅔·4·D for SwiGLU).
    moe_layers: ``"every"`` | ``"every_other"`` (layers 1, 3, … after the leading dense ones)
        | ``"none"`` (a dense model).
    first_dense_layers: leading layers that stay dense whatever ``moe_layers`` says.
    moe: the MoE layers (`moekit.MoEConfig`, or a dict of its fields); any registered router
        that suits a causal LM. Unset ``moe.expert`` / ``moe.d_hidden`` follow the dense FFN
        (``ffn`` / ``ffn_hidden``), see `block_moe`. ``moe.top_k=None`` is the router's own K.
    mod_layers: Mixture-of-Depths blocks: ``"none"`` (default) | ``"every"`` | ``"every_other"``
        (blocks 1, 3, …, the paper's choice); see `DepthRoutedBlock`.
    mod_capacity: fraction c ∈ (0, 1] of each sequence a MoD block processes in training.

    `from_dict` also takes the MoE fields flat (``num_experts``, ``top_k``, ``expert_hidden``
    for ``moe.d_hidden``, ``shared_hidden`` for ``moe.shared_d_hidden`` …, see `FLAT_MOE_KEYS`).
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    ffn: str = "swiglu"
    ffn_hidden: Optional[int] = None
    moe_layers: str = "every"
    first_dense_layers: int = 0
    moe: MoEConfig = dataclasses.field(default_factory=lambda: MoEConfig(num_experts=8))
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    mod_layers: str = "none"
    mod_capacity: float = 0.125

    def __post_init__(self):
        def pos_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            pos_int(name)
        if self.ffn_hidden is not None:
            pos_int("ffn_hidden")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size")
        if self.moe_layers not in _PLACEMENTS:
            raise ValueError(f"moe_layers must be one of {_PLACEMENTS}, got {self.moe_layers!r}")
        if not isinstance(self.first_dense_layers, int) or not 0 <= self.first_dense_layers <= self.n_layers:
            raise ValueError(f"first_dense_layers must be an int in [0, n_layers={self.n_layers}], "
                             f"got {self.first_dense_layers!r}")
        if self.mod_layers not in _PLACEMENTS:
            raise ValueError(f"mod_layers must be one of {_PLACEMENTS}, got {self.mod_layers!r}")
        check_number("mod_capacity", self.mod_capacity, min=0.0, max=1.0, min_open=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        check_instance("moe", self.moe, MoEConfig, what="a moekit.MoEConfig or a dict of its fields")
        layer = self.block_moe.check(self.d_model)
        try:
            check_causal_lm_router(layer, self.vocab_size)
        except ValueError as e:
            raise ValueError(f"moe.router={self.moe.router!r} does not suit a causal LM: {e}") from None

    @property
    def dense_hidden(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else default_hidden(self.d_model, self.ffn)

    @property
    def expert_d_hidden(self) -> int:
        return self.moe.d_hidden if self.moe.d_hidden is not None else self.dense_hidden

    @property
    def shared_d_hidden(self) -> int:
        return self.moe.shared_d_hidden if self.moe.shared_d_hidden is not None else self.expert_d_hidden

    @property
    def block_moe(self) -> MoEConfig:
        """`moe` as every MoE block builds it: experts of the dense FFN's kind (``ffn``) and
        hidden size (``ffn_hidden``) unless `moe` sets its own."""
        return dataclasses.replace(self.moe, expert=self.moe.expert or self.ffn, d_hidden=self.expert_d_hidden)

    def is_moe_layer(self, i: int) -> bool:
        """Whether block i's feed-forward is an MoE layer."""
        if self.moe_layers == "none" or i < self.first_dense_layers:
            return False
        return self.moe_layers == "every" or (i - self.first_dense_layers) % 2 == 1

    def is_mod_layer(self, i: int) -> bool:
        """Whether block i is a Mixture-of-Depths block."""
        return self.mod_layers == "every" or (self.mod_layers == "every_other" and i % 2 == 1)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["moe"] = self.moe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        """From `to_dict`'s shape (``moe`` a dict), or with the MoE fields flat (`FLAT_MOE_KEYS`:
        the run config's spelling, and checkpoints written before ``moe`` existed)."""
        own = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(own) - set(FLAT_MOE_KEYS))
        if unknown:
            raise ValueError(f"unknown TransformerConfig keys {unknown}; valid: {sorted(own)} "
                             f"or, instead of moe, the flat MoE keys {sorted(FLAT_MOE_KEYS)}")
        kw = {k: v for k, v in d.items() if k in own}
        flat = {FLAT_MOE_KEYS[k]: v for k, v in d.items() if k in FLAT_MOE_KEYS}
        if flat:
            if "moe" in kw:
                raise ValueError(f"give the MoE settings either as moe or as flat keys, not both; got moe and "
                                 f"{sorted(k for k in d if k in FLAT_MOE_KEYS)}")
            kw["moe"] = dataclasses.replace(cls.__dataclass_fields__["moe"].default_factory(), **flat)
        return cls(**kw)


def check_causal_lm_router(layer: MoE, vocab_size: int) -> None:
    """Raise ValueError unless the MoE layer's router suits a causal LM: its routing of a token
    must not look at later tokens in eval (``causal_safe``), it may take no per-token input but
    the token ids, and a vocabulary it routes by must cover the model's."""
    router, name = layer.router, type(layer.router).__name__
    if not getattr(router, "causal_safe", True):
        hint = ""
        if "causal" in inspect.signature(type(router).__init__).parameters:
            hint = "; router_kwargs={'causal': True} switches it to its causal fallback in eval"
        raise ValueError(f"{name} routes a token depending on later tokens (causal_safe=False), which an "
                         f"autoregressive LM cannot decode{hint}")
    inputs = [n for n, p in inspect.signature(router.forward).parameters.items()
              if p.kind == p.KEYWORD_ONLY and n not in ("mask", "token_ids")]
    if inputs:
        raise ValueError(f"{name} routes by per-token inputs {inputs}, which TransformerLM does not have; "
                         f"it passes token_ids only")
    v = getattr(router, "vocab_size", None)
    if isinstance(v, int) and v < vocab_size:
        raise ValueError(f"{name} routes token ids below router_kwargs vocab_size={v}; the model has "
                         f"vocab_size={vocab_size} (set router_kwargs={{'vocab_size': {vocab_size}}})")


def experts_per_token(moe: MoE, *, measured: bool = False) -> float:
    """Routed experts one token uses in `moe`, for counting active parameters and FLOPs.

    Nominal (default): the router's K where it has one — fixed-k routers; the dense router's E;
    the target K of ReLU routing and the slots of null-expert routing (upper bounds of the real
    mean); expert choice's eval K under ``causal=True`` — else expert choice's capacity factor c
    (its mean), else 1: hash, BASE, THOR and StableMoE route exactly one expert, top-p at least
    one (a floor; its real count depends on the data). ``measured=True``: the mean of the last
    forward pass, ``moe.last_stats.experts_per_token``.
    """
    if measured:
        stats = moe.last_stats
        if stats is None:
            raise ValueError("measured=True needs a forward pass of every MoE layer first (last_stats is None)")
        return float(stats.experts_per_token)
    if moe.top_k is not None:
        return moe.top_k
    c = getattr(moe.router, "capacity_factor", None)
    return c if isinstance(c, float) else 1


def dense_twin(config: TransformerConfig) -> TransformerConfig:
    """The dense model with the same active parameters per token as `config`.

    Every MoE layer's ``K`` routed experts of hidden ``F_e`` plus ``S`` shared experts of hidden
    ``F_s`` become one dense FFN of hidden ``K·F_e + S·F_s``: the same matmul FLOPs per token.
    For routers that pick their own number of experts, K is the nominal count of
    `experts_per_token` (for top-p a floor). Only possible when every MoE layer has the same
    shape, so the twin keeps one ``ffn_hidden``; leading dense layers of `config` then must have
    that hidden size too, and the experts must be of the dense FFN's kind, else ValueError.
    """
    if not config.moe_layer_ids:
        return config
    moe = config.moe
    if moe.expert not in (None, config.ffn):
        raise ValueError(f"the dense twin has FFNs of one kind: moe.expert={moe.expert!r} differs from "
                         f"ffn={config.ffn!r}")
    k = experts_per_token(config.block_moe.check(config.d_model))
    twin_hidden = round(k * config.expert_d_hidden) + moe.num_shared_experts * config.shared_d_hidden
    dense_ids = [i for i in range(config.n_layers) if not config.is_moe_layer(i)]
    if dense_ids and config.dense_hidden != twin_hidden:
        raise ValueError(f"the dense twin needs one FFN size: MoE layers are active-equivalent to hidden "
                         f"{twin_hidden} but dense layers {dense_ids} have ffn_hidden={config.dense_hidden}")
    return dataclasses.replace(config, moe_layers="none", ffn_hidden=twin_hidden)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (S, head_dim/2): angle ``s · θ^(−2i/head_dim)`` (RoFormer eq. 15)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang_SH = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return ang_SH.cos().float(), ang_SH.sin().float()


def apply_rope(x_BHSd: torch.Tensor, cos_Sh: torch.Tensor, sin_Sh: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive halves (x1, x2) of each head by the position angle (GPT-NeoX layout)."""
    x1, x2 = x_BHSd.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos_Sh - x2 * sin_Sh, x2 * cos_Sh + x1 * sin_Sh], dim=-1)
    return out.to(x_BHSd.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x_BSD: torch.Tensor, cos_Sh: torch.Tensor, sin_Sh: torch.Tensor,
                kv: Optional[list] = None) -> torch.Tensor:
        """`kv`: this layer's ``[k, v]`` of the earlier positions (empty list at the start), extended in place."""
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split(D, dim=-1)
        q, k, v = (t.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, S, d)
        q, k = apply_rope(q, cos_Sh, sin_Sh), apply_rope(k, cos_Sh, sin_Sh)
        mask, causal = None, True
        if kv is not None:
            if kv:
                past = kv[0].shape[2]
                k, v = torch.cat([kv[0], k], 2), torch.cat([kv[1], v], 2)
                causal = False
                if S > 1:       # new query i sees the past and new keys j <= i
                    mask = torch.ones(S, past + S, dtype=torch.bool, device=q.device).tril(past)
            kv[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, moe: bool):
        super().__init__()
        c = config
        self.attn_norm = nn.RMSNorm(c.d_model, eps=1e-6)
        self.attn = CausalSelfAttention(c.d_model, c.n_heads, c.dropout)
        self.ffn_norm = nn.RMSNorm(c.d_model, eps=1e-6)
        self.is_moe = moe
        if moe:
            self.ffn = c.block_moe.build(c.d_model)
            # Routers that route by vocabulary id (hash routing) take token_ids; others refuse them.
            self._wants_token_ids = "token_ids" in inspect.signature(self.ffn.router.forward).parameters
        else:
            self.ffn = DenseFFN(c.d_model, c.dense_hidden, expert=c.ffn)
            self._wants_token_ids = False
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x_BSD, cos_Sh, sin_Sh, idx_BS, kv=None):
        x_BSD = x_BSD + self.drop(self.attn(self.attn_norm(x_BSD), cos_Sh, sin_Sh, kv))
        h = self.ffn_norm(x_BSD)
        h = self.ffn(h, token_ids=idx_BS) if self._wants_token_ids else self.ffn(h)
        return x_BSD + self.drop(h)

    def update(self, x_BSD, cos_Sh, sin_Sh, idx_BS):
        """The block's residual update ``forward(x) − x`` = ``a + ffn(norm(x + a))``, a = attn(norm x)."""
        a_BSD = self.drop(self.attn(self.attn_norm(x_BSD), cos_Sh, sin_Sh))
        h = self.ffn_norm(x_BSD + a_BSD)
        h = self.ffn(h, token_ids=idx_BS) if self._wants_token_ids else self.ffn(h)
        return a_BSD + self.drop(h)


class _SelectedUpdate(nn.Module):
    """MoD's ``f``: a `Block`'s residual update on the selected tokens ``(B, K, D)`` at their
    positions ``pos_BK``; the rotary tables and token ids of the whole sequence are lent by
    `DepthRoutedBlock.forward` for the duration of one call."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block
        self.context = None

    def forward(self, x_BKD, pos_BK):
        cos_Sh, sin_Sh, idx_BS = self.context
        # (B, 1, K, h): each selected token rotated by its own position, broadcast over heads.
        cos, sin = cos_Sh[pos_BK].unsqueeze(1), sin_Sh[pos_BK].unsqueeze(1)
        return self.block.update(x_BKD, cos, sin, idx_BS.gather(1, pos_BK))


class DepthRoutedBlock(nn.Module):
    """A `Block` inside `moekit.layers.MixtureOfDepths` (METHODS.md CC1): a router picks the top
    ``⌈c·S⌉`` tokens of each sequence, which run attention (causally, among themselves, at their
    positions) and the FFN; their update is scaled by σ(router logit); the others are unchanged.

    `causal_eval` (default True): in eval mode decide per token by the causal predictor (what a
    decoder can do); False keeps training's top-K over the sequence in eval too.
    """

    def __init__(self, config: TransformerConfig, moe: bool):
        super().__init__()
        self.mod = MixtureOfDepths(_SelectedUpdate(Block(config, moe)), d_model=config.d_model,
                                   capacity=config.mod_capacity, positions=True)
        self.causal_eval = True

    @property
    def inner(self) -> Block:
        return self.mod.block.block

    @property
    def is_moe(self) -> bool:
        return self.inner.is_moe

    @property
    def ffn(self) -> nn.Module:
        return self.inner.ffn

    def forward(self, x_BSD, cos_Sh, sin_Sh, idx_BS, kv=None):
        if kv is not None:
            raise ValueError("a Mixture-of-Depths block has no KV cache (its processed tokens differ per "
                             "sequence); generate with use_cache=False")
        self.mod.block.context = (cos_Sh, sin_Sh, idx_BS)
        try:
            return self.mod(x_BSD, causal=not self.training and self.causal_eval)
        finally:
            self.mod.block.context = None

    def processed_fraction(self, seq_len: int, *, measured: bool = False) -> float:
        """Share of tokens that run the block: ``⌈c·S⌉ / S`` in training, or (``measured``) the
        last pass's."""
        if measured:
            if self.mod.last_stats is None:
                raise ValueError("measured=True needs a forward pass of every MoD block first (last_stats is None)")
            return float(self.mod.last_stats.processed_fraction)
        return capacity_tokens(self.mod.capacity, seq_len) / seq_len


class TransformerLM(nn.Module):
    """``forward(idx_BS, targets_BS=None) -> (logits_BSV, loss or None)``; loss is the mean
    next-token cross-entropy (without the MoE balancing losses: add `moekit.aux_loss(model)`)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList((DepthRoutedBlock if config.is_mod_layer(i) else Block)(
            config, config.is_moe_layer(i)) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.max_seq_len, config.d_model // config.n_heads, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02) for embeddings and dense linears; residual output projections
        # scaled by 1/√(2L) so the residual stream's variance does not grow with depth. Expert
        # banks and routers keep their own initialisations (uniform per expert; router std √(0.1/D)).
        std = 0.02
        nn.init.normal_(self.embed.weight, std=std)
        for name, p in self.named_parameters():
            if p.dim() != 2 or ".ffn.router" in name or ".ffn.experts" in name or name == "embed.weight":
                continue
            if name.endswith("lm_head.weight"):
                continue
            scaled = name.endswith("attn.proj.weight") or name.endswith("down_proj.weight")
            nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers) if scaled else std)

    @property
    def moe_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.is_moe]

    def forward(self, idx_BS: torch.Tensor, targets_BS: Optional[torch.Tensor] = None, *,
                kv_cache: Optional["KVCache"] = None):
        """`kv_cache`: keys and values of the positions already seen (`KVCache`); `idx_BS` then
        holds only the new positions, and the cache is extended with them."""
        if idx_BS.dim() != 2 or idx_BS.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a (B, S) integer tensor, got {idx_BS.dtype} {tuple(idx_BS.shape)}")
        B, S = idx_BS.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + S > self.config.max_seq_len:
            raise ValueError(f"sequence length {start + S} exceeds max_seq_len={self.config.max_seq_len}")
        if kv_cache is not None and len(kv_cache.layers) != len(self.blocks):
            raise ValueError(f"kv_cache has {len(kv_cache.layers)} layers, the model {len(self.blocks)}")
        if kv_cache is not None and kv_cache.length and kv_cache.layers[0][0].shape[0] != B:
            raise ValueError(f"kv_cache holds a batch of {kv_cache.layers[0][0].shape[0]} sequences, got {B}")
        x_BSD = self.embed(idx_BS)
        cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        for i, block in enumerate(self.blocks):
            x_BSD = block(x_BSD, cos, sin, idx_BS, None if kv_cache is None else kv_cache.layers[i])
        logits_BSV = self.lm_head(self.norm(x_BSD))
        loss = None
        if targets_BS is not None:
            loss = F.cross_entropy(logits_BSV.float().reshape(B * S, -1), targets_BS.reshape(-1))
        return logits_BSV, loss

    @torch.no_grad()
    def generate(self, idx_BS: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 use_cache: Optional[bool] = None, suppress_ids: Sequence[int] = ()) -> torch.Tensor:
        """Sample `max_new_tokens` tokens autoregressively.

        With `use_cache` each step runs only the new token through the model (keys and values
        of earlier positions are kept in a `KVCache`), so an MoE layer routes one token per
        sequence per step. Once the context reaches max_seq_len it is cropped to the last
        max_seq_len tokens and recomputed each step, as without the cache. The default (None)
        uses the cache unless some MoE layer routes a token depending on other tokens (a
        capacity limit in eval mode, or a router with ``causal_safe = False``) or the model has
        Mixture-of-Depths blocks (no cache there): routing only the new tokens would then change
        what the model computes. Ids in `suppress_ids` (e.g. a
        tokenizer's unknown-character id) are never drawn.
        """
        check_int("max_new_tokens", max_new_tokens, min=0)
        check_number("temperature", temperature, min=0)
        check_int("top_k", top_k, min=1, max=self.config.vocab_size, allow_none=True)
        if use_cache is None:
            use_cache = not any(_routes_across_tokens(b.ffn.router) for b in self.moe_blocks) and \
                not any(isinstance(b, DepthRoutedBlock) for b in self.blocks)
        cache = KVCache(len(self.blocks)) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and idx_BS.shape[1] <= self.config.max_seq_len:
                logits = self(idx_BS[:, cache.length:], kv_cache=cache)[0][:, -1].float()
            else:
                logits = self(idx_BS[:, -self.config.max_seq_len:])[0][:, -1].float()
            if len(suppress_ids):
                logits[:, list(suppress_ids)] = float("-inf")
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            idx_BS = torch.cat([idx_BS, nxt], dim=1)
        return idx_BS


def _routes_across_tokens(router) -> bool:
    """Whether a token's routing (in eval mode) depends on the other tokens of the batch."""
    if not getattr(router, "causal_safe", True):
        return True
    cf = getattr(router, "current_capacity_factor", None)
    return cf is not None and cf() is not None


class KVCache:
    """Per-layer keys and values ``[k, v]`` of shape (B, H, S, d) for incremental decoding."""

    def __init__(self, n_layers: int):
        self.layers = [[] for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Positions held (0 when empty)."""
        first = self.layers[0] if self.layers else []
        return first[0].shape[2] if first else 0


def param_counts(model: TransformerLM, *, measured: bool = False,
                 experts: Optional[Sequence[float]] = None) -> dict:
    """``total``, ``active`` (used per token) and ``embedding`` parameter counts.

    Active counts each MoE layer's routed experts at ``k/E`` of their size (what one token
    touches), k from `experts_per_token`: the router's K, a nominal count for routers that pick
    their own (top-p, expert choice …), with ``measured=True`` the mean of each layer's last
    forward pass, or with `experts` the given mean experts per token of each MoE layer (in
    `TransformerLM.moe_blocks` order; e.g. averaged by the trainer over a whole evaluation).
    A tied output head is counted once.
    """
    blocks = model.moe_blocks
    if experts is not None:
        if measured:
            raise ValueError("give measured=True or experts=, not both")
        experts = list(experts)
        if len(experts) != len(blocks):
            raise ValueError(f"experts must hold one mean per MoE layer ({len(blocks)}), got {len(experts)}")
        for j, k in enumerate(experts):
            check_number(f"experts[{j}]", k, min=0, max=blocks[j].ffn.num_experts)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for j, block in enumerate(blocks):
        moe = block.ffn
        bank = sum(p.numel() for p in moe.experts.parameters())
        k = experts[j] if experts is not None else experts_per_token(moe, measured=measured)
        used = bank * k // moe.num_experts if isinstance(k, int) else round(bank * k / moe.num_experts)
        inactive += bank - used
    embedding = model.embed.weight.numel()
    return {"total": total, "active": total - inactive, "embedding": embedding}


def flops_per_token(model: TransformerLM, seq_len: int, *, measured: bool = False,
                    experts: Optional[Sequence[float]] = None) -> dict:
    """Matmul FLOPs per token: ``forward = 2·N_active_nonembed + 2·V·D (head) + 2·L·S·D``
    (causal attention scores and values, half of a full S×S), training = 3 × forward
    (Kaplan et al. 2020's 6N rule plus the attention term). `measured`, `experts`: as in
    `param_counts`."""
    c = model.config
    counts = param_counts(model, measured=measured, experts=experts)
    # Norm weights are not matmuls; embedding lookup is free, the output head is a matmul.
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    head = c.vocab_size * c.d_model
    matmul = counts["active"] - counts["embedding"] - norms - (0 if c.tie_embeddings else head)
    fwd = 2 * matmul + 2 * head + 2 * c.n_layers * seq_len * c.d_model
    for block in model.blocks:
        if isinstance(block, DepthRoutedBlock):
            # Only the processed share f of the tokens runs the block's matmuls, and they attend
            # among themselves: the attention term shrinks by f². Router and predictor run on all.
            f = block.processed_fraction(seq_len, measured=measured)
            fwd -= (1 - f) * 2 * _block_matmul_params(block.inner, measured) + (1 - f * f) * 2 * seq_len * c.d_model
    fwd = round(fwd)
    return {"forward": fwd, "train": 3 * fwd}


def _block_matmul_params(block: Block, measured: bool) -> float:
    """Matmul parameters one token uses in `block`: attention, and the FFN's active share."""
    n = sum(p.numel() for p in block.attn.parameters())
    if not block.is_moe:
        return n + sum(p.numel() for p in block.ffn.parameters())
    moe = block.ffn
    bank = sum(p.numel() for p in moe.experts.parameters())
    rest = sum(p.numel() for p in moe.parameters()) - bank
    return n + rest + bank * experts_per_token(moe, measured=measured) / moe.num_experts
