"""Mixture of meta-learners (MxML) over Prototypical Networks, and episodes drawn from several domains.

Legend: M meta-learners, W ways, P support examples, Q query examples, X input features,
D embedding dim, H gate width.

MxML (Park, Kim, Kim, Liu & Choi 2019, "MxML: Mixture of Meta-Learners for Few-Shot
Classification"; METHODS.md M1): M meta-learners, each meta-trained on its own task
distribution (here: one domain each), are frozen; a weight-prediction network reads the support
set of a new task and outputs mixing weights ``w = softmax(ρ(mean_i φ(x_i)))`` over them (a
DeepSets pooling, so the weights do not depend on the order of the support set, nor on the
queries); the task's prediction is the mixture of the learners' predictive distributions,

    p(y | q, S) = Σ_m w_m(S) · softmax_w(-‖f_m(q) - c_{m,w}‖²),

and the weight network is trained to minimise the query negative log-likelihood of that mixture
over meta-training episodes. The paper's learners and weight-network inputs differ in detail
[R]; the learners here are the library's Prototypical Networks (`moekit.models.fewshot`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers import aux_loss
from moekit.models.fewshot import Episode, EpisodeSampler, proto_logits, prototypes
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_instance, check_int, check_number, check_tensor

__all__ = ["TaskDomain", "DomainEpisodes", "SupportGate", "MixtureOfMetaLearners", "episode_log_probs",
           "meta_train_domains", "train_gate", "evaluate_domain"]


@dataclass(frozen=True)
class TaskDomain:
    """One domain of few-shot tasks: inputs (N, X), integer labels (N,) and the classes episodes may use."""

    name: str
    x_BX: torch.Tensor
    labels: torch.Tensor
    classes: tuple[int, ...]

    def __post_init__(self):
        check_tensor(f"{self.name}.x_BX", self.x_BX, ndim=2, floating=True)
        check_tensor(f"{self.name}.labels", self.labels, shape=(len(self.x_BX),), integer=True)


class DomainEpisodes:
    """Episodes from several domains: each draws a domain uniformly, then an `EpisodeSampler` episode of
    it. One seeded generator picks the domains and each domain's sampler has its own seed, so equal
    arguments give equal episode streams."""

    def __init__(self, domains: Sequence[TaskDomain], *, n_way: int, shots: int, queries: int, seed: int = 0):
        if not domains:
            raise ValueError("domains must hold at least one TaskDomain, got none")
        for i, d in enumerate(domains):
            check_instance(f"domains[{i}]", d, TaskDomain)
        check_int("seed", seed)
        self.domains = list(domains)
        self.samplers = [EpisodeSampler(d.labels, d.classes, n_way=n_way, shots=shots, queries=queries,
                                        seed=seed * 1009 + i) for i, d in enumerate(domains)]
        self.n_way = n_way
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> tuple[int, Episode]:
        """(domain index, episode)."""
        i = int(torch.randint(len(self.domains), (1,), generator=self.generator))
        return i, self.samplers[i].sample()

    def tensors(self, i: int, ep: Episode):
        """``(x_support_PX, y_support_P, x_query_QX, y_query_Q)`` of episode `ep` of domain `i`."""
        x_BX = self.domains[i].x_BX
        return x_BX[ep.support_idx_P], ep.support_y_P, x_BX[ep.query_idx_Q], ep.query_y_Q


class SupportGate(nn.Module):
    """The weight-prediction network: ``x_support (P, X) → mixing weights (M,)`` by DeepSets pooling,
    ``softmax(ρ(mean_i φ(x_i)))``; only the support inputs are read."""

    def __init__(self, *, in_features: int, num_learners: int, d_hidden: int = 64):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_learners", num_learners), ("d_hidden", d_hidden)):
            check_int(name, v, min=1)
        self.phi = nn.Sequential(nn.Linear(in_features, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_hidden), nn.ReLU())
        self.rho = nn.Sequential(nn.Linear(d_hidden, d_hidden), nn.ReLU(), nn.Linear(d_hidden, num_learners))

    def forward(self, x_support_PX: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.rho(self.phi(x_support_PX).mean(0)), -1)


def module_list(name: str, modules: Sequence[nn.Module]) -> nn.ModuleList:
    """`modules` as an ``nn.ModuleList``; ValueError when empty, TypeError naming ``name[i]`` for a non-module."""
    if not modules:
        raise ValueError(f"{name} must hold at least one module, got none")
    for i, m in enumerate(modules):
        check_instance(f"{name}[{i}]", m, nn.Module)
    return nn.ModuleList(modules)


def _proto_log_probs(net: nn.Module, x_support_PX, y_support_P, x_query_QX, n_way: int) -> torch.Tensor:
    # support and query in one forward, so an MoE embedding routes (and balances) over the whole episode
    z = net(torch.cat([x_support_PX, x_query_QX]))
    P = len(x_support_PX)
    return F.log_softmax(proto_logits(z[P:], prototypes(z[:P], y_support_P, n_way)), -1)


class MixtureOfMetaLearners(nn.Module):
    """MxML over Prototypical-Network learners (see the module docstring).

    Args:
        learners: M embedding nets ``(B, X) → (B, D)`` (e.g. `moekit.models.dense_proto_net`), each
            meta-trained on its own domain; `train_gate` freezes them.
        in_features: X, the input size the gate reads; d_hidden: the gate's width.
    """

    def __init__(self, learners: Sequence[nn.Module], *, in_features: int, d_hidden: int = 64):
        super().__init__()
        self.learners = module_list("learners", learners)
        self.gate = SupportGate(in_features=in_features, num_learners=len(learners), d_hidden=d_hidden)

    def mixing_weights(self, x_support_PX: torch.Tensor) -> torch.Tensor:
        """The weights (M,) over the learners for the task with this support set."""
        return self.gate(x_support_PX)

    def learner_log_probs(self, x_support_PX, y_support_P, x_query_QX, n_way: int) -> torch.Tensor:
        """Each learner's query log-probabilities (M, Q, W)."""
        return torch.stack([_proto_log_probs(m, x_support_PX, y_support_P, x_query_QX, n_way) for m in self.learners])

    def forward(self, x_support_PX: torch.Tensor, y_support_P: torch.Tensor, x_query_QX: torch.Tensor,
                n_way: int) -> torch.Tensor:
        """Query log-probabilities (Q, W) of the mixture ``log Σ_m w_m p_m(y | q)``."""
        check_tensor("x_support", x_support_PX, ndim=2, floating=True)
        check_tensor("x_query", x_query_QX, shape=(None, x_support_PX.shape[1]), floating=True)
        log_w_M = self.mixing_weights(x_support_PX).clamp_min(1e-30).log()
        return torch.logsumexp(log_w_M[:, None, None] + self.learner_log_probs(x_support_PX, y_support_P, x_query_QX,
                                                                                 n_way), 0)


def episode_log_probs(model: nn.Module, x_BX: torch.Tensor, ep: Episode, n_way: int) -> torch.Tensor:
    """Query log-probabilities (Q, W) of an episode (indices into `x_BX`) for a model that reads the
    support set — one with ``mixing_weights`` (`MixtureOfMetaLearners`, `HierarchicalExpertNetwork`),
    called as ``model(x_support, y_support, x_query, n_way)`` — or a single Prototypical-Network embedding."""
    xs, xq = x_BX[ep.support_idx_P], x_BX[ep.query_idx_Q]
    if hasattr(model, "mixing_weights"):
        return model(xs, ep.support_y_P, xq, n_way)
    return _proto_log_probs(model, xs, ep.support_y_P, xq, n_way)


def meta_train_domains(net: nn.Module, episodes: DomainEpisodes, *, steps: int, lr: float = 1e-3) -> list[float]:
    """Episodic Prototypical-Network training on episodes from one or several domains (the joint
    meta-learner, or one learner per domain with a one-domain `DomainEpisodes`); returns the per-step
    query cross-entropies. Adam with the learning rate decayed to 0 by a cosine (`moekit.optim`);
    an MoE embedding's balance loss is added to the loss."""
    check_instance("episodes", episodes, DomainEpisodes)
    check_int("steps", steps, min=1)
    lr = check_number("lr", lr, min=0, min_open=True)
    update = UpdateStep(net, build_optimizer(net, name="adam", lr=lr), lr=lr, total_steps=steps, schedule="cosine")
    net.train()
    losses = []
    for _ in range(steps):
        i, ep = episodes.sample()
        xs, ys, xq, yq = episodes.tensors(i, ep)
        loss = F.nll_loss(_proto_log_probs(net, xs, ys, xq, episodes.n_way), yq)
        losses.append(loss.item())
        update(loss + aux_loss(net))
    return losses


def train_gate(mixture: MixtureOfMetaLearners, episodes: DomainEpisodes, *, steps: int,
               lr: float = 1e-3) -> list[float]:
    """Train MxML's weight network on the query NLL of the mixture, the learners frozen (in eval mode,
    ``requires_grad`` off); returns the per-step losses."""
    check_instance("mixture", mixture, MixtureOfMetaLearners)
    check_instance("episodes", episodes, DomainEpisodes)
    check_int("steps", steps, min=1)
    lr = check_number("lr", lr, min=0, min_open=True)
    mixture.learners.requires_grad_(False)
    update = UpdateStep(mixture.gate, build_optimizer(mixture.gate, name="adam", lr=lr), lr=lr, total_steps=steps,
                        schedule="cosine")
    mixture.gate.train()
    mixture.learners.eval()
    losses = []
    for _ in range(steps):
        i, ep = episodes.sample()
        loss = F.nll_loss(episode_log_probs(mixture, episodes.domains[i].x_BX, ep, episodes.n_way), ep.query_y_Q)
        losses.append(loss.item())
        update(loss)
    return losses


@torch.no_grad()
def evaluate_domain(model: nn.Module, domain: TaskDomain, *, n_way: int, shots: int, queries: int, episodes: int,
                    seed: int = 0) -> tuple[float, float, np.ndarray]:
    """Mean query accuracy over `episodes` episodes of `domain`, its 95% half-width (1.96·sd/√n) and the
    per-episode accuracies; equal seeds give equal episodes, so two models can be compared pairwise."""
    check_int("episodes", episodes, min=2)
    sampler = EpisodeSampler(domain.labels, domain.classes, n_way=n_way, shots=shots, queries=queries, seed=seed)
    model.eval()
    accs = []
    for _ in range(episodes):
        ep = sampler.sample()
        accs.append((episode_log_probs(model, domain.x_BX, ep, n_way).argmax(-1) == ep.query_y_Q).float().mean().item())
    accs = np.array(accs)
    return float(accs.mean()), float(1.96 * accs.std(ddof=1) / math.sqrt(episodes)), accs

