"""Few-shot classification with Prototypical Networks, on a dense or an MoE embedding net.

Legend: W ways (classes per episode), P support examples (W · shots), Q query examples
(W · queries), X input features, D embedding dim, F FFN hidden dim, E experts, K experts per token.

Prototypical Networks (Snell, Swersky & Zemel 2017, "Prototypical Networks for Few-shot
Learning", NeurIPS): an embedding f maps the P support examples of an episode to D-vectors, each
class's prototype is the mean of its support embeddings, ``c_w = mean_{y_i = w} f(x_i)``, and a
query is classified by ``softmax_w(-‖f(q) - c_w‖²)``; meta-training minimises the query
cross-entropy over episodes sampled from the training classes, and the test episodes come from
classes never seen in training.

The embedding net is ``x → GELU(Linear) → h + FFN(LN(h)) → LN``, with the FFN either dense
(hidden F) or a `moekit.MoE` layer of E experts, top-K, each of hidden ``F / K``: the same active
FFN parameters per example (the router's D·E weights aside), see `active_ffn_params`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import DenseFFN
from moekit.layers import MoE, aux_loss
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_int, check_number

__all__ = ["Episode", "EpisodeSampler", "ProtoEmbedding", "active_ffn_params", "dense_proto_net",
           "evaluate_episodes", "meta_train", "moe_proto_net", "proto_logits", "prototypes"]


@dataclass(frozen=True)
class Episode:
    """One W-way episode: dataset indices and episode labels in ``[0, W)``.

    support_idx_P / query_idx_Q: indices into the sampler's labels, grouped by episode class
    (class w holds rows ``w·shots … (w+1)·shots - 1``); classes_W: the original class ids.
    """

    classes_W: torch.Tensor
    support_idx_P: torch.Tensor
    support_y_P: torch.Tensor
    query_idx_Q: torch.Tensor
    query_y_Q: torch.Tensor


class EpisodeSampler:
    """Draws W-way ``shots``-shot episodes with ``queries`` queries per class from the allowed classes.

    The W classes are drawn without replacement, then ``shots + queries`` distinct examples of
    each, so support and query never share an example. All randomness comes from one
    ``torch.Generator`` seeded with `seed`, so two samplers with equal arguments give equal episodes.
    """

    def __init__(self, labels, classes: Sequence[int], *, n_way: int, shots: int, queries: int, seed: int = 0):
        labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
        if labels.ndim != 1 or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {tuple(labels.shape)}")
        classes = [int(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct, got {classes}")
        for name, v in (("n_way", n_way), ("shots", shots), ("queries", queries)):
            check_int(name, v, min=1)
        check_int("seed", seed)
        if n_way > len(classes):
            raise ValueError(f"n_way={n_way} exceeds the {len(classes)} allowed classes {classes}")
        self.pools = []
        for c in classes:
            pool = torch.nonzero(labels == c).flatten()
            if len(pool) < shots + queries:
                raise ValueError(f"class {c} has {len(pool)} examples, fewer than shots + queries = "
                                 f"{shots} + {queries}")
            self.pools.append(pool)
        self.classes = torch.tensor(classes)
        self.n_way, self.shots, self.queries = n_way, shots, queries
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Episode:
        W, s, q, g = self.n_way, self.shots, self.queries, self.generator
        picked = torch.randperm(len(self.pools), generator=g)[:W]
        support, query = [], []
        for i in picked.tolist():
            pool = self.pools[i]
            rows = pool[torch.randperm(len(pool), generator=g)[:s + q]]
            support.append(rows[:s])
            query.append(rows[s:])
        return Episode(classes_W=self.classes[picked], support_idx_P=torch.cat(support),
                       support_y_P=torch.arange(W).repeat_interleave(s),
                       query_idx_Q=torch.cat(query), query_y_Q=torch.arange(W).repeat_interleave(q))


def prototypes(z_PD: torch.Tensor, y_P: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means ``c_w = mean_{y_i = w} z_i`` (Snell et al. 2017, eq. 1): (P, D), (P,) → (W, D)."""
    if z_PD.ndim != 2 or y_P.shape != z_PD.shape[:1]:
        raise ValueError(f"expected z (P, D) and y (P,), got {tuple(z_PD.shape)} and {tuple(y_P.shape)}")
    if len(y_P) and (y_P.min() < 0 or y_P.max() >= n_way):
        raise ValueError(f"labels must lie in [0, {n_way}), got [{int(y_P.min())}, {int(y_P.max())}]")
    counts_W = torch.bincount(y_P, minlength=n_way)
    if (counts_W == 0).any():
        empty = torch.nonzero(counts_W == 0).flatten().tolist()
        raise ValueError(f"every class needs a support example; classes {empty} have none")
    sums_WD = z_PD.new_zeros(n_way, z_PD.shape[1]).index_add_(0, y_P, z_PD)
    return sums_WD / counts_W.unsqueeze(1).to(z_PD.dtype)


def proto_logits(z_QD: torch.Tensor, protos_WD: torch.Tensor) -> torch.Tensor:
    """Logits ``-‖z_q - c_w‖²`` (Snell et al. 2017, eq. 2 with squared Euclidean d): (Q, D), (W, D) → (Q, W)."""
    if z_QD.ndim != 2 or protos_WD.ndim != 2 or z_QD.shape[1] != protos_WD.shape[1]:
        raise ValueError(f"expected queries (Q, D) and prototypes (W, D), got {tuple(z_QD.shape)} and "
                         f"{tuple(protos_WD.shape)}")
    # the expanded ‖z‖² - 2 z·c + ‖c‖² loses digits when z ≈ c; the difference form is exact enough
    return -(z_QD.unsqueeze(1) - protos_WD.unsqueeze(0)).pow(2).sum(-1)


class ProtoEmbedding(nn.Module):
    """``x (B, X) → (B, D)``: ``h = GELU(W x)``, ``h + ffn(LN(h))``, then LayerNorm; `ffn` is dense or MoE."""

    def __init__(self, *, in_features: int, d_model: int, ffn: nn.Module):
        super().__init__()
        self.stem = nn.Linear(in_features, d_model)
        self.norm_in = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, x_BX: torch.Tensor) -> torch.Tensor:
        h_BD = F.gelu(self.stem(x_BX))
        h_BD = h_BD + self.ffn(self.norm_in(h_BD))
        return self.norm_out(h_BD)


def dense_proto_net(*, in_features: int, d_model: int = 64, d_hidden: int = 256) -> ProtoEmbedding:
    """The dense embedding: one GELU MLP of hidden F = `d_hidden`."""
    return ProtoEmbedding(in_features=in_features, d_model=d_model,
                          ffn=DenseFFN(d_model, d_hidden, expert="mlp", activation="gelu"))


def moe_proto_net(*, in_features: int, d_model: int = 64, d_hidden: int = 256, num_experts: int = 8,
                  top_k: int = 2, aux_loss_coef: float = 0.01) -> ProtoEmbedding:
    """The MoE twin of `dense_proto_net`: E GELU experts of hidden ``F / K``, top-K, dropless."""
    for name, v in (("in_features", in_features), ("d_model", d_model), ("d_hidden", d_hidden),
                    ("num_experts", num_experts), ("top_k", top_k)):
        check_int(name, v, min=1)
    if d_hidden % top_k:
        raise ValueError(f"d_hidden={d_hidden} must be a multiple of top_k={top_k} for equal active params")
    ffn = MoE(d_model=d_model, num_experts=num_experts, top_k=top_k, d_hidden=d_hidden // top_k,
              expert="mlp", activation="gelu", aux_loss_coef=aux_loss_coef)
    return ProtoEmbedding(in_features=in_features, d_model=d_model, ffn=ffn)


def active_ffn_params(net: ProtoEmbedding) -> tuple[int, int]:
    """(active, total) parameters of the FFN per example: for MoE, router + K of the E experts."""
    ffn = net.ffn
    total = sum(p.numel() for p in ffn.parameters())
    if not isinstance(ffn, MoE):
        return total, total
    expert_params = sum(p.numel() for p in ffn.experts.parameters())
    per_expert = expert_params // ffn.num_experts
    return total - expert_params + ffn.top_k * per_expert, total


def _episode_loss(net: nn.Module, x_BX: torch.Tensor, ep: Episode, n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
    # one forward over support and query together, so MoE routing and aux loss see the whole episode
    z = net(torch.cat([x_BX[ep.support_idx_P], x_BX[ep.query_idx_Q]]))
    P = len(ep.support_idx_P)
    logits_QW = proto_logits(z[P:], prototypes(z[:P], ep.support_y_P, n_way))
    return F.cross_entropy(logits_QW, ep.query_y_Q), (logits_QW.argmax(-1) == ep.query_y_Q).float().mean()


def meta_train(net: nn.Module, x_BX: torch.Tensor, labels, classes: Sequence[int], *, n_way: int, shots: int,
               queries: int, steps: int, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Episodic training (Snell et al. 2017, Algorithm 1); returns the per-step query cross-entropies.

    Each step samples one episode and minimises its query cross-entropy plus `moekit.aux_loss`
    (the MoE balance loss is trained, not reported) with Adam (`moekit.optim.build_optimizer`),
    the learning rate decayed from `lr` to 0 at the last step by a cosine (`moekit.optim.UpdateStep`).
    """
    check_int("steps", steps, min=1)
    check_number("lr", lr, min=0, min_open=True)
    sampler = EpisodeSampler(labels, classes, n_way=n_way, shots=shots, queries=queries, seed=seed)
    update = UpdateStep(net, build_optimizer(net, name="adam", lr=lr), lr=lr, total_steps=steps, schedule="cosine",
                        min_lr_ratio=0.0)
    net.train()
    losses = []
    for _ in range(steps):
        loss, _ = _episode_loss(net, x_BX, sampler.sample(), n_way)
        losses.append(loss.item())
        update(loss + aux_loss(net))
    return losses


@torch.no_grad()
def evaluate_episodes(net: nn.Module, x_BX: torch.Tensor, labels, classes: Sequence[int], *, n_way: int,
                      shots: int, queries: int, episodes: int, seed: int = 0) -> tuple[float, float, np.ndarray]:
    """Mean query accuracy over `episodes` test episodes, its 95% CI half-width (1.96·sd/√n), and the
    per-episode accuracies."""
    check_int("episodes", episodes, min=2)              # a confidence interval needs two
    sampler = EpisodeSampler(labels, classes, n_way=n_way, shots=shots, queries=queries, seed=seed)
    net.eval()
    accs = np.array([_episode_loss(net, x_BX, sampler.sample(), n_way)[1].item() for _ in range(episodes)])
    return float(accs.mean()), float(1.96 * accs.std(ddof=1) / math.sqrt(episodes)), accs
