"""Experts per token against token difficulty, character class and domain.

Legend: T validation tokens, L MoE layers.

Huang et al. (2024) report that top-p routing spends more experts on harder inputs (BBH over
HellaSwag) and in lower layers. Here a token's difficulty is the model's own cross-entropy of
its next-token prediction (the output its hidden states feed); each MoE layer's count for the
token is the number of (token, expert) pairs it kept there.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["token_routing", "char_class", "CLASSES", "by_quantile", "by_group", "rank_correlation"]

CLASSES = ("letters", "whitespace", "punctuation", "digits", "mixed")


@torch.no_grad()
def token_routing(model, batches) -> dict:
    """Run ``(x_BS, y_BS, doc_BS)`` batches through `model` in eval mode; per token:
    ``ce`` (T,) next-token cross-entropy, ``experts`` (L, T) experts kept in each MoE layer,
    ``ids`` (T,) token ids, ``docs`` (T,) document ids, and ``layers`` the MoE block indices."""
    blocks = [(i, b.ffn) for i, b in enumerate(model.blocks) if b.is_moe]
    if not blocks:
        raise ValueError("the model has no MoE layers")
    was = model.training
    model.eval()
    ce, experts, ids, docs = [], [[] for _ in blocks], [], []
    try:
        for x_BS, y_BS, doc_BS in batches:
            logits_BSV, _ = model(x_BS)
            ce.append(F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.flatten(), reduction="none"))
            T = x_BS.numel()
            for j, (_, moe) in enumerate(blocks):
                r = moe.last_routing.compact()
                experts[j].append(torch.bincount(r.token_ids, minlength=T))
            ids.append(x_BS.flatten())
            docs.append(doc_BS.flatten())
    finally:
        model.train(was)
    return {"ce": torch.cat(ce).numpy(), "experts": torch.stack([torch.cat(e) for e in experts]).numpy(),
            "ids": torch.cat(ids).numpy(), "docs": torch.cat(docs).numpy(), "layers": [i for i, _ in blocks]}


def char_class(text: str) -> str:
    """The class of a token's text: letters, whitespace, punctuation (no letter or digit),
    digits, or mixed. Leading and trailing spaces of a word piece are ignored."""
    t = text.strip()
    if not t:
        return "whitespace"
    if t.isalpha():
        return "letters"
    if t.isdigit():
        return "digits"
    if not any(c.isalnum() for c in t):
        return "punctuation"
    return "mixed"


def by_quantile(ce_T: np.ndarray, experts_LT: np.ndarray, q: int = 4) -> list[dict]:
    """Tokens cut into `q` equal-count bins by cross-entropy (easiest first); per bin the CE
    range, its mean, the mean experts per token over layers and per layer."""
    if ce_T.shape != experts_LT.shape[1:]:
        raise ValueError(f"ce has shape {ce_T.shape}, experts {experts_LT.shape}: one CE per token expected")
    order = np.argsort(ce_T, kind="stable")
    out = []
    for b, idx in enumerate(np.array_split(order, q)):
        out.append({"bin": b, "ce_lo": float(ce_T[idx].min()), "ce_hi": float(ce_T[idx].max()),
                    "ce_mean": float(ce_T[idx].mean()), "tokens": int(len(idx)),
                    "experts": float(experts_LT[:, idx].mean()),
                    "per_layer": experts_LT[:, idx].mean(1).tolist()})
    return out


def by_group(groups_T: Sequence[str], experts_LT: np.ndarray, ce_T: np.ndarray, names: Sequence[str]) -> list[dict]:
    """Per group name (in `names` order, skipping empty ones): its token count, share, mean CE and
    mean experts per token (over layers, and per layer)."""
    groups_T = np.asarray(groups_T)
    out = []
    for g in names:
        m = groups_T == g
        if not m.any():
            continue
        out.append({"group": g, "tokens": int(m.sum()), "share": float(m.mean()), "ce_mean": float(ce_T[m].mean()),
                    "experts": float(experts_LT[:, m].mean()), "per_layer": experts_LT[:, m].mean(1).tolist()})
    return out


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ (average ranks for ties); 0 when either is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]
    ra, rb = ranks(a), ranks(b)
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return 0.0
    return float(((ra - ra.mean()) * (rb - rb.mean())).mean() / (sa * sb))
