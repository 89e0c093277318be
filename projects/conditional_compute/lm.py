"""The language-model side of the study: MoE, Mixture-of-Depths and per-token early exits, each
trained on the main job's data and measured as validation loss against forward FLOPs per token.

Legend: B batch, S sequence, D model dim, V vocabulary, X exits.

Every model is a `moekit.models.TransformerLM`; every update a `moekit.optim.UpdateStep` (AdamW,
the trainer's defaults: lr 3e-3, betas (0.9, 0.95), weight decay 0.1, warmup, cosine to 10 %,
clipping at norm 1), loss = cross-entropy + `moekit.aux_loss(model)`.

FLOPs per token are counted from what ran in the evaluation pass (`flops_per_token(...,
measured=True)`): the mean experts per token of every MoE layer and the processed share of every
MoD block, batch by batch. Early exits are the exception, see `ExitLM`.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import moekit
from moekit.layers.early_exit import exit_scores
from moekit.models.transformer import DepthRoutedBlock, TransformerConfig, TransformerLM, flops_per_token
from moekit.optim import UpdateStep, build_optimizer

# The dense baseline: the main job's model shape (D = 128, 4 blocks, 4 heads, SwiGLU hidden 344).
BASE = dict(d_model=128, n_layers=4, n_heads=4, moe_layers="none")


def variant_configs(vocab_size: int, seq_len: int, **shape) -> dict[str, TransformerConfig]:
    """The models compared. MoE: E = 8 experts of half the dense hidden (176) in every block, so
    top-2 does the dense model's FFN work; top-1 half of it; top-p (p = 0.4, entropy loss) what
    its routing takes. MoD: every other block at c = 12.5 % and 50 % (Raposo et al.). `shape`
    overrides `BASE` (tests use a tiny model)."""
    base = TransformerConfig(vocab_size=vocab_size, max_seq_len=seq_len, **{**BASE, **shape})
    moe = dict(moe_layers="every")
    mk = lambda **m: dataclasses.replace(base, **moe, moe={"num_experts": 8, "d_hidden": 176, **m})  # noqa: E731
    return {
        "dense": base,
        "mod_c50": dataclasses.replace(base, mod_layers="every_other", mod_capacity=0.5),
        "mod_c12.5": dataclasses.replace(base, mod_layers="every_other", mod_capacity=0.125),
        "moe_top1": mk(router="switch", top_k=None),
        "moe_top2": mk(router="topk", top_k=2),
        "moe_top_p0.4": mk(router="top_p", top_k=None, router_kwargs={"p": 0.4}),
    }


def train_lm(model: nn.Module, sampler, *, steps: int, lr: float = 3e-3, loss_fn=None, log=print) -> float:
    """`steps` AdamW updates on the sampler's batches; returns the wall time in seconds.
    `loss_fn(model, x, y)` gives the task loss (default: the LM's next-token cross-entropy)."""
    opt = build_optimizer(model, name="adamw", lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    update = UpdateStep(model, opt, lr=lr, total_steps=steps, warmup_steps=max(1, steps // 10),
                        min_lr_ratio=0.1, grad_clip=1.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x, y, _ = sampler.next_batch()
        loss = model(x, y)[1] if loss_fn is None else loss_fn(model, x, y)
        info = update(loss + moekit.aux_loss(model))
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"    step {step + 1:4d}/{steps}  loss {info['loss']:.3f}  {time.perf_counter() - t0:6.1f}s")
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate_lm(model: TransformerLM, batches, seq_len: int) -> dict:
    """Mean validation loss and forward FLOPs per token measured batch by batch (eval mode:
    MoD blocks decide by their causal predictor)."""
    model.eval()
    losses, flops, processed = [], [], []
    for x, y, _ in batches:
        losses.append(float(model(x, y)[1]))
        flops.append(flops_per_token(model, seq_len, measured=True)["forward"])
        processed += [b.processed_fraction(seq_len, measured=True) for b in model.blocks
                      if isinstance(b, DepthRoutedBlock)]
    out = {"val_loss": float(np.mean(losses)), "flops_forward": float(np.mean(flops))}
    if processed:
        out["mod_processed_fraction"] = float(np.mean(processed))
    eps = [float(b.ffn.last_stats.experts_per_token) for b in model.moe_blocks
           if getattr(b.ffn.last_stats, "experts_per_token", None) is not None]
    if eps:
        out["experts_per_token_last_batch"] = float(np.mean(eps))
    return out


# ---------------------------------------------------------------------------------------------
# Per-token early exits.

class ExitLM(nn.Module):
    """A dense `TransformerLM` with an exit after every block: exit i is ``lm_head(norm_i(h_i))``
    (its own RMSNorm, the shared tied output head). Trained on the mean of the X exits' losses
    (BranchyNet's weighted sum, equal weights; METHODS.md CC2).

    At inference each token leaves at the first exit whose max probability exceeds the threshold
    (`moekit.layers.early_exit.exit_scores`, the rule of `moekit.layers.EarlyExit`). A decoder
    cannot drop a token from later blocks outright, since later tokens attend to it: as in CALM
    (Schuster et al. 2022) its hidden state is copied upward and later blocks compute only its
    keys and values. This study evaluates teacher-forced, running every block on every token
    (the decisions depend only on the token's own prefix, so they are the ones a decoder would
    make), and counts the FLOPs that decoder would execute: see `exit_flops`.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.lm = TransformerLM(config)
        self.norms = nn.ModuleList(nn.RMSNorm(config.d_model, eps=1e-6) for _ in range(config.n_layers - 1))

    def forward_exits(self, idx_BS: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits ``[(B, S, V)] * X``."""
        lm = self.lm
        S = idx_BS.shape[1]
        h = lm.embed(idx_BS)
        cos, sin = lm.rope_cos[:S], lm.rope_sin[:S]
        out = []
        for i, block in enumerate(lm.blocks):
            h = block(h, cos, sin, idx_BS)
            norm = lm.norm if i == len(lm.blocks) - 1 else self.norms[i]
            out.append(lm.lm_head(norm(h)))
        return out

    def loss(self, idx_BS, targets_BS) -> torch.Tensor:
        zs = self.forward_exits(idx_BS)
        return sum(F.cross_entropy(z.float().flatten(0, 1), targets_BS.reshape(-1)) for z in zs) / len(zs)


def exit_flops(config: TransformerConfig, seq_len: int, depth_T: torch.Tensor) -> float:
    """Mean forward FLOPs per token when token t leaves at exit ``depth_T[t]`` (0-based): the
    blocks up to it in full (their matmuls and attention), the exit heads it checked (RMSNorm +
    the V×D head, each), and in every later block the K and V projections of its copied state."""
    D, V, L, S = config.d_model, config.vocab_size, config.n_layers, seq_len
    lm = TransformerLM(dataclasses.replace(config, vocab_size=2))      # block sizes only
    block = 2 * sum(p.numel() for n, p in lm.blocks[0].named_parameters() if "norm" not in n) + 2 * S * D
    kv = 2 * 2 * D * D
    d = depth_T.double() + 1                                             # blocks run in full
    per_token = d * block + d * 2 * V * D + (L - d) * kv
    return float(per_token.mean())


@torch.no_grad()
def exit_sweep(model: ExitLM, batches, seq_len: int, thresholds) -> list[dict]:
    """For each confidence threshold: validation loss of the exits taken, mean exits depth
    (blocks run per token), share leaving at each exit and FLOPs per token (`exit_flops`)."""
    model.eval()
    X = len(model.lm.blocks)
    nll = {t: [] for t in thresholds}
    depth = {t: [] for t in thresholds}
    for x, y, _ in batches:
        zs = model.forward_exits(x)
        nll_XT = torch.stack([F.cross_entropy(z.float().flatten(0, 1), y.reshape(-1), reduction="none") for z in zs])
        conf_XT = torch.stack([exit_scores(z.flatten(0, 1), "confidence") for z in zs])
        for t in thresholds:
            passes_XT = conf_XT > t
            passes_XT[-1] = True                                        # the last exit answers the rest
            d_T = passes_XT.float().argmax(0)                           # first exit passed
            nll[t].append(nll_XT.gather(0, d_T[None])[0])
            depth[t].append(d_T)
    out = []
    for t in thresholds:
        d_T = torch.cat(depth[t])
        out.append({"threshold": t, "val_loss": float(torch.cat(nll[t]).mean()),
                    "mean_blocks": float(d_T.float().mean() + 1),
                    "exit_share": [float((d_T == i).float().mean()) for i in range(X)],
                    "flops_forward": exit_flops(model.lm.config, seq_len, d_T)})
    return out


__all__ = ["variant_configs", "train_lm", "evaluate_lm", "ExitLM", "exit_flops", "exit_sweep", "BASE"]
