"""Branch-Train-Merge's ensemble: the branches weighted by the domain posterior — METHODS.md T7.

Legend: B batch, S sequence positions, V vocabulary, N branches (domain expert LMs).

Li et al. (2022), "Branch-Train-Merge" (after Gururangan et al.'s DEMix): N language models,
each trained on one domain, are used together as a mixture whose weights are the posterior
over domains given the context so far, by Bayes' rule with the branches as the likelihoods:

    p(x_t | x_<t) = Σ_j p_j(x_t | x_<t) · P(D = j | x_<t),
    P(D = j | x_<t) ∝ P(D = j) · Π_{s < t} p_j(x_s | x_<s),

the product running over the first ``context_tokens`` predicted tokens only when that is set
(BTM estimates the posterior from a short prefix; ``None`` uses every earlier token). The
prior P(D = j) is uniform, given, or estimated from held-out sequences (BTM's "cached prior":
a moving average of the posteriors, `BTMEnsemble.update_prior`). ``top_k`` keeps the k most
probable branches per position and renormalises (BTM's sparser ensemble; ties go to the lower
index); ``None`` keeps all.

Only the first prediction (position 0, no evidence yet) uses the prior alone. The ensemble is
causal: the output at position t depends on ``idx[:, :t+1]`` only. `domain_posterior_reference`
recomputes the posterior one prefix at a time and is what the fast cumulative form is tested
against.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.ops.topk import topk_stable
from moekit.validate import check_int, check_number, check_tensor

__all__ = ["BTMEnsemble", "domain_posterior", "domain_posterior_reference", "branch_log_probs"]


def branch_log_probs(model: nn.Module, idx_BS: torch.Tensor) -> torch.Tensor:
    """(B, S, V) next-token log-probabilities of one LM (``model(idx)`` returns logits or (logits, …))."""
    out = model(idx_BS)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return F.log_softmax(logits.float(), dim=-1)


def _log_prior(log_prior_N: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    if log_prior_N is None:
        return torch.full((n,), -torch.log(torch.tensor(float(n))).item(), device=device)
    return log_prior_N.to(device)


def domain_posterior(token_logp_NBS: torch.Tensor, log_prior_N: Optional[torch.Tensor] = None, *,
                     context_tokens: Optional[int] = None) -> torch.Tensor:
    """(B, S, N) posterior over branches for predicting position t's target.

    Args:
        token_logp_NBS: log p_j(target_s) of each branch j at each position s (the log-likelihood
            of the token that position s predicts, ``idx[:, s + 1]``).
        log_prior_N: log P(D = j); None = uniform.
        context_tokens: use the first this-many predicted tokens as evidence (None = all earlier).

    Position t's evidence is Σ_{s < min(t, context_tokens)} token_logp[j, :, s] — tokens up to
    ``idx[:, t]``, never the target of position t itself.
    """
    N, _, S = token_logp_NBS.shape
    evidence_NBS = torch.cumsum(token_logp_NBS, dim=-1) - token_logp_NBS       # exclusive prefix sums
    if context_tokens is not None:
        # From position `context_tokens` on, the evidence stays that of the first tokens.
        evidence_NBS = evidence_NBS[..., torch.arange(S, device=evidence_NBS.device).clamp(max=context_tokens)]
    log_post_NBS = evidence_NBS + _log_prior(log_prior_N, N, token_logp_NBS.device).view(N, 1, 1)
    return torch.softmax(log_post_NBS, dim=0).permute(1, 2, 0)


@torch.no_grad()
def domain_posterior_reference(models: Sequence[nn.Module], idx_BS: torch.Tensor,
                               log_prior_N: Optional[torch.Tensor] = None, *,
                               context_tokens: Optional[int] = None) -> torch.Tensor:
    """`domain_posterior` by its definition: for every t, score the prefix ``idx[:, :t+1]`` again
    with each branch and apply Bayes' rule (S forward passes per branch; for tests)."""
    B, S = idx_BS.shape
    N = len(models)
    log_prior = _log_prior(log_prior_N, N, idx_BS.device)
    out = torch.empty(B, S, N, device=idx_BS.device)
    for t in range(S):
        n_ev = t if context_tokens is None else min(t, context_tokens)
        ll = torch.zeros(N, B, device=idx_BS.device)
        if n_ev > 0:
            prefix = idx_BS[:, : n_ev + 1]
            for j, m in enumerate(models):
                lp = branch_log_probs(m, prefix)[:, :-1]                    # predicts prefix[:, 1:]
                ll[j] = lp.gather(-1, prefix[:, 1:, None])[..., 0].sum(-1)
        out[:, t] = torch.softmax(ll + log_prior[:, None], dim=0).T
    return out


class BTMEnsemble(nn.Module):
    """N domain LMs as one LM: ``forward(idx_BS, targets_BS=None) -> (log_probs_BSV, loss or None)``.

    Args:
        models: the branches (same vocabulary), each ``model(idx_BS)`` → logits (B, S, V) or a
            tuple starting with them (moekit's `TransformerLM` and Hugging Face causal LMs both fit).
        prior: P(D = j) as N non-negative numbers (normalised here); None = uniform.
        context_tokens: predicted tokens used as evidence for the posterior (None = all earlier).
        top_k: mix only the k most probable branches per position (None = all).

    The returned log-probabilities are valid logits (their log-softmax is themselves), so the
    ensemble drops into code that expects an LM; the loss is the mean next-token cross-entropy.
    """

    def __init__(self, models: Sequence[nn.Module], *, prior: Optional[Sequence[float]] = None,
                 context_tokens: Optional[int] = None, top_k: Optional[int] = None):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("BTMEnsemble needs at least one branch model, got none")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"models[{i}] must be an nn.Module, got {type(m).__name__}")
        self.branches = nn.ModuleList(models)
        N = len(models)
        self.context_tokens = check_int("context_tokens", context_tokens, min=1, allow_none=True)
        self.top_k = check_int("top_k", top_k, min=1, max=N, allow_none=True)
        self.register_buffer("log_prior", torch.full((N,), -torch.log(torch.tensor(float(N))).item()))
        if prior is not None:
            self.set_prior(prior)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def set_prior(self, prior) -> None:
        """P(D = j) ← `prior` (N non-negative numbers, not all zero; normalised here)."""
        p = torch.as_tensor(prior, dtype=torch.float32)
        if p.shape != (self.num_branches,):
            raise ValueError(f"prior must hold {self.num_branches} numbers (one per branch), "
                             f"got shape {tuple(p.shape)}")
        check_tensor("prior", p, finite=True)
        if bool((p < 0).any()) or float(p.sum()) <= 0:
            raise ValueError(f"prior must be non-negative and not all zero, got {p.tolist()}")
        self.log_prior.copy_(torch.log(p / p.sum()).to(self.log_prior.device))

    def token_log_probs(self, idx_BS: torch.Tensor):
        """``(log_probs_NBSV, token_logp_NBS)``: each branch's next-token distribution and the
        log-likelihood of the observed next token (0 at the last position, which predicts nothing)."""
        check_tensor("idx", idx_BS, ndim=2, integer=True)
        lp_NBSV = torch.stack([branch_log_probs(m, idx_BS) for m in self.branches])
        tok_NBS = torch.zeros(lp_NBSV.shape[:3], device=lp_NBSV.device)
        tok_NBS[..., :-1] = lp_NBSV[:, :, :-1].gather(-1, idx_BS[None, :, 1:, None].expand(
            lp_NBSV.shape[0], -1, -1, 1))[..., 0]
        return lp_NBSV, tok_NBS

    def posterior(self, idx_BS: torch.Tensor) -> torch.Tensor:
        """(B, S, N) domain posterior used at each position (after `top_k`)."""
        _, tok_NBS = self.token_log_probs(idx_BS)
        return self._mix_weights(tok_NBS)

    def _mix_weights(self, tok_NBS: torch.Tensor) -> torch.Tensor:
        post_BSN = domain_posterior(tok_NBS, self.log_prior, context_tokens=self.context_tokens)
        if self.top_k is not None and self.top_k < self.num_branches:
            B, S, N = post_BSN.shape
            _, keep_TK = topk_stable(post_BSN.reshape(B * S, N), self.top_k)      # ties: lowest index
            keep = torch.zeros(B * S, N, dtype=torch.bool, device=post_BSN.device).scatter_(1, keep_TK, True)
            post_BSN = torch.where(keep.view(B, S, N), post_BSN, torch.zeros_like(post_BSN))
            post_BSN = post_BSN / post_BSN.sum(-1, keepdim=True)
        return post_BSN

    def forward(self, idx_BS: torch.Tensor, targets_BS: Optional[torch.Tensor] = None):
        lp_NBSV, tok_NBS = self.token_log_probs(idx_BS)
        post_BSN = self._mix_weights(tok_NBS)
        # log Σ_j post_j · p_j, stably; a zero weight contributes exactly nothing.
        w_NBS = post_BSN.permute(2, 0, 1)
        log_w_NBS1 = torch.where(w_NBS > 0, torch.log(w_NBS.clamp_min(torch.finfo(w_NBS.dtype).tiny)),
                                 float("-inf")).unsqueeze(-1)
        log_probs_BSV = torch.logsumexp(log_w_NBS1 + lp_NBSV, dim=0)
        loss = None
        if targets_BS is not None:
            loss = F.nll_loss(log_probs_BSV.reshape(-1, log_probs_BSV.shape[-1]), targets_BS.reshape(-1))
        return log_probs_BSV, loss

    @torch.no_grad()
    def update_prior(self, idx_BS: torch.Tensor, *, momentum: float = 0.3) -> torch.Tensor:
        """BTM's cached prior: P ← (1 − momentum) · P + momentum · mean posterior of `idx_BS`'s
        sequences at their last position (all their tokens as evidence). Returns the new prior."""
        momentum = check_number("momentum", momentum, min=0, max=1, min_open=True)
        _, tok_NBS = self.token_log_probs(idx_BS)
        post_BN = domain_posterior(tok_NBS, self.log_prior)[:, -1]
        # The last position's evidence excludes its own (absent) target: every observed token counts.
        new = (1 - momentum) * self.log_prior.exp() + momentum * post_BN.mean(0)
        self.log_prior.copy_(torch.log(new / new.sum()))
        return new / new.sum()

    def extra_repr(self) -> str:
        return f"branches={self.num_branches}, context_tokens={self.context_tokens}, top_k={self.top_k}"
