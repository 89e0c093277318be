"""Hierarchical expert networks for meta-learning: a selector over expert learners trained with
information-processing costs (bounded rationality).

Legend: B tasks, M experts, N inputs per task (queries), Y outputs (classes), W ways,
P support examples, Q query examples, X input features, H selector width.

Hihn & Braun (2020), "Hierarchical Expert Networks for Meta-Learning" (arXiv:1911.00348; also
Hihn, Gottwald & Braun 2019, "An information-theoretic on-line learning principle for
specialization in hierarchical decision-making systems"; METHODS.md M5): a selector
``p(m | x)`` sends each task x — the selector sees the task's *training set*, here a pooled
embedding of the support set — to one of M experts, and expert m answers with ``p(y | x, m)``.
Both stages are bounded-rational decision-makers; the system maximises the free energy

    J = E[U(x, m, y)] - (1/β1) · I(X; M) - (1/β2) · I(X; Y | M),

    I(X; M)     = E_x KL(p(m | x) ‖ p(m)),            p(m)     = E_x p(m | x),
    I(X; Y | M) = E_{x,m} KL(p(y | x, m) ‖ p(y | m)),  p(y | m) = E_{x | m} p(y | x, m).

Parametrisation [D]: β1, β2 are *inverse temperatures* (resource parameters); the cost weights are
1/β. ``β = math.inf`` removes a cost (an unbounded, "rational" stage) and β → 0 makes the cost
dominate. For a fixed prior p(m) the selector's optimum is ``p*(m | x) ∝ p(m) · exp(β1 · U(x, m))``
(`optimal_selector`): as β1 → ∞ (cost weight 1/β1 → 0, which METHODS.md M5 writes "β → 0" with β a
cost weight) it is the deterministic argmax of the utility; as β1 → 0 it is the prior. With the
prior itself the marginal the joint optimum is a rate-distortion solution (`blahut_arimoto`).

The priors are the marginals [R]: of the current batch (an exact mutual information over the
batch), or blended with a running average (``prior_momentum > 0``, as the paper keeps them), in
which case the cost is ``E_x KL(p(· | x) ‖ q) = I + KL(p ‖ q) ≥ I``, an upper bound on the MI.

`HierarchicalExpertNetwork` instantiates this for few-shot classification: the experts are
Prototypical-Network embeddings (`moekit.models.dense_proto_net`), the utility of expert m on a
task is its mean query log-likelihood, the selector a DeepSets pooling of the support inputs
(MxML's `SupportGate`), and few-shot adaptation is *choosing an expert* from the support set and
classifying with its prototypes. The paper trains the selector on sampled expert choices with
a policy gradient [R]; here (`HierarchicalExpertNetwork.training_loss`) the experts are trained
under the closed-form optimal selection for their current utilities and the selector network is
fitted to it, an EM-like split of the same free energy [D].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers import aux_loss
from moekit.meta.mxml import DomainEpisodes, SupportGate, _proto_log_probs, module_list
from moekit.models.fewshot import proto_logits, prototypes
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_instance, check_int, check_number, check_tensor

__all__ = ["InformationTerms", "mutual_information", "conditional_mutual_information", "information_objective",
           "optimal_selector", "blahut_arimoto", "HierarchicalExpertNetwork", "train_hierarchical_experts"]


def _weights(weights_B: Optional[torch.Tensor], B: int, like: torch.Tensor) -> torch.Tensor:
    if weights_B is None:
        return like.new_full((B,), 1.0 / B)
    check_tensor("weights", weights_B, shape=(B,), floating=True, finite=True)
    if (weights_B < 0).any() or not weights_B.sum() > 0:
        raise ValueError(f"weights must be ≥ 0 with a positive sum, got min {float(weights_B.min())}, "
                         f"sum {float(weights_B.sum())}")
    return weights_B / weights_B.sum()


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Σ_last p log(p / q)`` with ``0 log 0 = 0``; the logs are clamped at the smallest normal
    number so that a probability that underflowed to 0 (a far prototype) gives a finite gradient."""
    tiny = torch.finfo(p.dtype).tiny
    return (p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum(-1)


def _marginal_given_m(joint_BM: torch.Tensor, p_y_given_xm_BMY: torch.Tensor) -> torch.Tensor:
    """``p(y | m) = Σ_x p(x, m) p(y | x, m) / p(m)`` (M, Y) from the joint of (x, m)."""
    return (joint_BM[..., None] * p_y_given_xm_BMY).sum(0) / joint_BM.sum(0).clamp_min(1e-30)[:, None]


def mutual_information(p_m_given_x_BM: torch.Tensor, *, weights_B: Optional[torch.Tensor] = None,
                       prior_M: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``E_x KL(p(m | x) ‖ p(m))`` in nats, x weighted by `weights_B` (uniform by default).

    With ``prior_M=None`` the prior is the marginal ``Σ_x p(x) p(m | x)`` and the value is I(X; M);
    any other prior gives ``I(X; M) + KL(p(m) ‖ prior) ≥ I(X; M)``. Always ≥ 0. Differentiable.
    """
    check_tensor("p_m_given_x", p_m_given_x_BM, ndim=2, floating=True)
    w_B = _weights(weights_B, p_m_given_x_BM.shape[0], p_m_given_x_BM)
    if prior_M is None:
        prior_M = (w_B[:, None] * p_m_given_x_BM).sum(0)
    else:
        check_tensor("prior", prior_M, shape=(p_m_given_x_BM.shape[1],), floating=True)
    return (w_B * _kl_rows(p_m_given_x_BM, prior_M)).sum().clamp_min(0.0)


def conditional_mutual_information(p_m_given_x_BM: torch.Tensor, p_y_given_xm_BMY: torch.Tensor, *,
                                   weights_B: Optional[torch.Tensor] = None,
                                   prior_MY: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``E_{x, m} KL(p(y | x, m) ‖ p(y | m))`` in nats, the joint of (x, m) being ``p(x) p(m | x)``.

    With ``prior_MY=None`` the priors are the marginals ``p(y | m) = Σ_x p(x | m) p(y | x, m)`` and the
    value is I(X; Y | M); other priors give an upper bound. Always ≥ 0. Differentiable.
    """
    check_tensor("p_m_given_x", p_m_given_x_BM, ndim=2, floating=True)
    B, M = p_m_given_x_BM.shape
    check_tensor("p_y_given_xm", p_y_given_xm_BMY, shape=(B, M, None), floating=True)
    joint_BM = _weights(weights_B, B, p_m_given_x_BM)[:, None] * p_m_given_x_BM
    if prior_MY is None:
        prior_MY = _marginal_given_m(joint_BM, p_y_given_xm_BMY)
    else:
        check_tensor("prior", prior_MY, shape=(M, p_y_given_xm_BMY.shape[2]), floating=True)
    return (joint_BM * _kl_rows(p_y_given_xm_BMY, prior_MY)).sum().clamp_min(0.0)


@dataclass
class InformationTerms:
    """The free energy ``objective = utility - mi_selector / β1 - mi_expert / β2`` and its parts (scalars)."""

    objective: torch.Tensor
    utility: torch.Tensor
    mi_selector: torch.Tensor
    mi_expert: torch.Tensor


def _cost_weight(name: str, beta: float) -> float:
    beta = check_number(name, beta, min=0, min_open=True, allow_inf=True)
    return 0.0 if math.isinf(beta) else 1.0 / beta


def information_objective(utility_BM: torch.Tensor, p_m_given_x_BM: torch.Tensor,
                          p_y_given_xm_BNMY: Optional[torch.Tensor] = None, *, beta_selector: float,
                          beta_expert: float = math.inf, selector_prior_M: Optional[torch.Tensor] = None,
                          expert_prior_MY: Optional[torch.Tensor] = None) -> InformationTerms:
    """The hierarchical free energy of a batch of B equally weighted tasks (module docstring).

    Args:
        utility_BM: U(x, m), the utility of expert m on task x (e.g. its query log-likelihood).
        p_m_given_x_BM: the selector's distribution over the M experts per task.
        p_y_given_xm_BNMY: each expert's output distribution on the task's N inputs (None: no expert
            cost); the expert cost treats every (task, input) pair as one x of weight 1/(B·N).
        beta_selector, beta_expert: β1, β2 > 0 (``math.inf``: no cost).
        selector_prior_M, expert_prior_MY: fixed priors; None = the batch marginals (exact MI).
    """
    check_tensor("utility", utility_BM, ndim=2, floating=True)
    check_tensor("p_m_given_x", p_m_given_x_BM, shape=tuple(utility_BM.shape), floating=True)
    w1, w2 = _cost_weight("beta_selector", beta_selector), _cost_weight("beta_expert", beta_expert)
    utility = (p_m_given_x_BM * utility_BM).sum(1).mean()
    mi_sel = mutual_information(p_m_given_x_BM, prior_M=selector_prior_M)
    if p_y_given_xm_BNMY is None:
        mi_exp = utility.new_zeros(())
    else:
        B, M = p_m_given_x_BM.shape
        check_tensor("p_y_given_xm", p_y_given_xm_BNMY, shape=(B, None, M, None), floating=True)
        N = p_y_given_xm_BNMY.shape[1]
        mi_exp = conditional_mutual_information(p_m_given_x_BM.repeat_interleave(N, 0),
                                                p_y_given_xm_BNMY.flatten(0, 1), prior_MY=expert_prior_MY)
    return InformationTerms(objective=utility - w1 * mi_sel - w2 * mi_exp, utility=utility, mi_selector=mi_sel,
                            mi_expert=mi_exp)


def optimal_selector(utility_BM: torch.Tensor, beta: float, prior_M: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The free-energy optimum for a fixed prior, ``p*(m | x) ∝ p(m) exp(β U(x, m))`` (B, M).

    It maximises ``Σ_m p(m | x) U(x, m) - (1/β) KL(p(· | x) ‖ p(m))`` for every x. ``β = inf`` gives
    the one-hot argmax of U among the experts with prior mass (lowest index on ties); β → 0 the prior.
    Uniform prior by default.
    """
    check_tensor("utility", utility_BM, ndim=2, floating=True)
    beta = check_number("beta", beta, min=0, allow_inf=True)
    M = utility_BM.shape[1]
    prior_M = utility_BM.new_full((M,), 1.0 / M) if prior_M is None else prior_M
    check_tensor("prior", prior_M, shape=(M,), floating=True)
    if math.isinf(beta):
        masked = utility_BM.masked_fill(prior_M <= 0, -math.inf)
        return F.one_hot(masked.argmax(1), M).to(utility_BM.dtype)
    return F.softmax(torch.log(prior_M) + beta * utility_BM, -1)


def blahut_arimoto(utility_BM: torch.Tensor, beta: float, *, iterations: int = 500,
                   weights_B: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The self-consistent optimum of ``E[U] - (1/β) I(X; M)`` by Blahut-Arimoto iterations:
    ``p(m | x) ∝ p(m) exp(β U)`` and ``p(m) = Σ_x p(x) p(m | x)`` in turn from a uniform prior.
    Returns ``(p(m | x) (B, M), p(m) (M,))``; a reference for what the trained selector approaches."""
    check_int("iterations", iterations, min=1)
    w_B = _weights(weights_B, utility_BM.shape[0], utility_BM)
    prior_M = utility_BM.new_full((utility_BM.shape[1],), 1.0 / utility_BM.shape[1])
    for _ in range(iterations):
        cond_BM = optimal_selector(utility_BM, beta, prior_M)
        prior_M = (w_B[:, None] * cond_BM).sum(0)
    return cond_BM, prior_M


class HierarchicalExpertNetwork(nn.Module):
    """A selector over M Prototypical-Network experts, trained with the free energy above.

    Args:
        experts: M embedding nets ``(n, X) → (n, D)`` (e.g. `moekit.models.dense_proto_net`).
        in_features: X, what the selector reads; d_hidden: the selector's width H.
        beta_selector, beta_expert: β1, β2 (``math.inf`` = no information cost).
        prior_momentum: weight of the running average in the priors p(m), p(y | m) (0 = the batch
            marginals, an exact MI; the running averages follow the batches in training mode).
    """

    def __init__(self, experts: Sequence[nn.Module], *, in_features: int, d_hidden: int = 64,
                 beta_selector: float = math.inf, beta_expert: float = math.inf, prior_momentum: float = 0.0):
        super().__init__()
        self.experts = module_list("experts", experts)
        self.num_experts = M = len(experts)
        self.selector = SupportGate(in_features=in_features, num_learners=M, d_hidden=d_hidden)
        self.beta_selector = check_number("beta_selector", beta_selector, min=0, min_open=True, allow_inf=True)
        self.beta_expert = check_number("beta_expert", beta_expert, min=0, min_open=True, allow_inf=True)
        self.prior_momentum = check_number("prior_momentum", prior_momentum, min=0, max=1, max_open=True)
        self.register_buffer("selector_prior_M", torch.full((M,), 1.0 / M))
        self.register_buffer("expert_prior_MY", torch.empty(M, 0))

    def selector_log_probs(self, x_support_BPX: torch.Tensor) -> torch.Tensor:
        """log p(m | support set) (B, M): DeepSets pooling of the support inputs only."""
        check_tensor("x_support", x_support_BPX, ndim=3, floating=True)
        return F.log_softmax(self.selector.rho(self.selector.phi(x_support_BPX).mean(1)), -1)

    def mixing_weights(self, x_support_PX: torch.Tensor) -> torch.Tensor:
        """p(m | support set) (M,) of one task (the name `moekit.meta.evaluate_domain` looks for)."""
        return self.selector_log_probs(x_support_PX.unsqueeze(0))[0].exp()

    def expert_log_probs(self, x_support_BPX: torch.Tensor, y_support_BP: torch.Tensor, x_query_BQX: torch.Tensor,
                         n_way: int) -> torch.Tensor:
        """Each expert's Prototypical-Network query log-probabilities (B, M, Q, W)."""
        check_tensor("x_support", x_support_BPX, ndim=3, floating=True)
        B, P, X = x_support_BPX.shape
        check_tensor("y_support", y_support_BP, shape=(B, P), integer=True)
        check_tensor("x_query", x_query_BQX, shape=(B, None, X), floating=True)
        # support and query of every task in one forward per expert, so an MoE embedding routes over all
        inputs = torch.cat([x_support_BPX, x_query_BQX], 1).flatten(0, 1)
        out = []
        for expert in self.experts:
            z_BND = expert(inputs).unflatten(0, (B, -1))
            out.append(torch.stack([F.log_softmax(proto_logits(z[P:], prototypes(z[:P], y, n_way)), -1)
                                    for z, y in zip(z_BND, y_support_BP)]))
        return torch.stack(out, 1)

    def forward(self, x_support_PX: torch.Tensor, y_support_P: torch.Tensor, x_query_QX: torch.Tensor,
                n_way: int) -> torch.Tensor:
        """Few-shot adaptation by choosing an expert: query log-probabilities (Q, W) of the expert with
        the highest ``p(m | support set)`` (the selector's deterministic decision at test time)."""
        return self.predict(x_support_PX[None], y_support_P[None], x_query_QX[None], n_way)[0]

    def predict(self, x_support_BPX: torch.Tensor, y_support_BP: torch.Tensor, x_query_BQX: torch.Tensor,
                n_way: int, *, hard: bool = True) -> torch.Tensor:
        """Query log-probabilities (B, Q, W): of the chosen expert alone (``hard``, one expert forward
        per task), or of the mixture ``log Σ_m p(m | S) p_m(y | q)``."""
        log_sel_BM = self.selector_log_probs(x_support_BPX)
        if hard:
            return torch.stack([_proto_log_probs(self.experts[m], xs, ys, xq, n_way) for xs, ys, xq, m in
                                zip(x_support_BPX, y_support_BP, x_query_BQX, log_sel_BM.argmax(1).tolist())])
        lp_BMQW = self.expert_log_probs(x_support_BPX, y_support_BP, x_query_BQX, n_way)
        return torch.logsumexp(log_sel_BM[:, :, None, None] + lp_BMQW, 1)

    def _priors(self, sel_BM: torch.Tensor, pol_BQMW: torch.Tensor):
        """The priors the costs use: the batch marginals blended with the running averages."""
        a = self.prior_momentum
        if a == 0:
            return None, None
        W = pol_BQMW.shape[-1]
        if self.expert_prior_MY.shape[1] != W:
            self.expert_prior_MY = sel_BM.new_full((self.num_experts, W), 1.0 / W)
        sel_prior_M = a * self.selector_prior_M + (1 - a) * sel_BM.mean(0)
        exp_prior_MW = a * self.expert_prior_MY + (1 - a) * _marginal_given_m(
            sel_BM.repeat_interleave(pol_BQMW.shape[1], 0), pol_BQMW.flatten(0, 1))
        if self.training:
            self.selector_prior_M.copy_(sel_prior_M.detach())
            self.expert_prior_MY = exp_prior_MW.detach()
        return sel_prior_M, exp_prior_MW

    def _utilities(self, x_support_BPX, y_support_BP, x_query_BQX, y_query_BQ, n_way):
        check_tensor("y_query", y_query_BQ, shape=tuple(x_query_BQX.shape[:2]), integer=True)
        lp_BMQW = self.expert_log_probs(x_support_BPX, y_support_BP, x_query_BQX, n_way)
        y_BMQ = y_query_BQ[:, None, :].expand(-1, self.num_experts, -1)
        return lp_BMQW.gather(-1, y_BMQ[..., None])[..., 0].mean(-1), lp_BMQW.exp().transpose(1, 2)

    def information_terms(self, x_support_BPX: torch.Tensor, y_support_BP: torch.Tensor, x_query_BQX: torch.Tensor,
                          y_query_BQ: torch.Tensor, n_way: int) -> InformationTerms:
        """The free energy of a batch of tasks under the selector network: U(task, m) is expert m's mean
        query log-likelihood, the expert cost reads each expert's query distributions (both costs are
        reported even where a β is inf)."""
        utility_BM, pol_BQMW = self._utilities(x_support_BPX, y_support_BP, x_query_BQX, y_query_BQ, n_way)
        sel_BM = self.selector_log_probs(x_support_BPX).exp()
        sel_prior_M, exp_prior_MW = self._priors(sel_BM, pol_BQMW)
        return information_objective(utility_BM, sel_BM, pol_BQMW, beta_selector=self.beta_selector,
                                     beta_expert=self.beta_expert, selector_prior_M=sel_prior_M,
                                     expert_prior_MY=exp_prior_MW)

    def training_loss(self, x_support_BPX: torch.Tensor, y_support_BP: torch.Tensor, x_query_BQX: torch.Tensor,
                      y_query_BQ: torch.Tensor, n_way: int) -> tuple[torch.Tensor, InformationTerms]:
        """``(loss, terms)`` of one batch, optimised in two parts like an EM step [D]:

        - the experts maximise the free energy under the *optimal* selection for their current
          utilities, ``p*(m | x) ∝ p(m) exp(β1 U(x, m))`` (`optimal_selector`; with β1 = inf the
          winner takes the task), which sees the query labels;
        - the selector network, which sees only the support set, is fitted to p* by cross-entropy
          (it amortises the free-energy-optimal decision, so it can make it at test time).

        (Differentiating ``Σ_m p(m | S) U(x, m)`` through the selector network instead weights each
        expert's gradient by the selector's guess rather than by how well the expert did; on our
        toy domains the first expert to get ahead then took every task.)
        ``terms`` are those of p*; `information_terms` gives the selector network's.
        """
        utility_BM, pol_BQMW = self._utilities(x_support_BPX, y_support_BP, x_query_BQX, y_query_BQ, n_way)
        log_sel_BM = self.selector_log_probs(x_support_BPX)
        sel_prior_M, exp_prior_MW = self._priors(log_sel_BM.exp(), pol_BQMW)
        prior_M = (log_sel_BM.exp().mean(0) if sel_prior_M is None else sel_prior_M).detach()
        target_BM = optimal_selector(utility_BM.detach(), self.beta_selector, prior_M)
        terms = information_objective(utility_BM, target_BM, pol_BQMW, beta_selector=self.beta_selector,
                                      beta_expert=self.beta_expert, selector_prior_M=prior_M,
                                      expert_prior_MY=exp_prior_MW)
        selector_loss = -(target_BM * log_sel_BM).sum(1).mean()
        return selector_loss - terms.objective, terms


def train_hierarchical_experts(model: HierarchicalExpertNetwork, episodes: DomainEpisodes, *, steps: int,
                               tasks_per_step: int = 4, lr: float = 1e-3) -> list[dict]:
    """Maximise the free energy over `steps` batches of `tasks_per_step` episodes (from `episodes`,
    any mix of domains); returns per step ``{"loss", "utility", "mi_selector", "mi_expert"}``.

    Loss `HierarchicalExpertNetwork.training_loss` ``+ moekit.aux_loss(model)``; Adam with a cosine decay of `lr` to 0
    (`moekit.optim`). With one expert, one task per step and ``beta_expert=inf`` this is
    `moekit.meta.meta_train_domains` step for step.
    """
    check_instance("model", model, HierarchicalExpertNetwork)
    check_instance("episodes", episodes, DomainEpisodes)
    check_int("steps", steps, min=1)
    check_int("tasks_per_step", tasks_per_step, min=1)
    lr = check_number("lr", lr, min=0, min_open=True)
    update = UpdateStep(model, build_optimizer(model, name="adam", lr=lr), lr=lr, total_steps=steps, schedule="cosine")
    model.train()
    history = []
    for _ in range(steps):
        batch = [episodes.sample() for _ in range(tasks_per_step)]
        xs, ys, xq, yq = (torch.stack(t) for t in zip(*[episodes.tensors(i, ep) for i, ep in batch]))
        loss, terms = model.training_loss(xs, ys, xq, yq, episodes.n_way)
        update(loss + aux_loss(model))
        history.append({"loss": loss.item(), "utility": terms.utility.item(), "mi_selector": terms.mi_selector.item(),
                        "mi_expert": terms.mi_expert.item()})
    return history
