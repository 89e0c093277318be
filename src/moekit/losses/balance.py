"""Balancing losses as pure functions — METHODS.md T1, T2, G2, G13.

Legend: T tokens, E experts, K experts per token, S sequence length.

Every function takes an optional ``mask`` (T,) bool, False for padding tokens, which are left
out of every mean and count. All return float32 scalars with gradient through the
probabilities/logits only (counts are not differentiable).
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.ops.counting import count_ids

__all__ = [
    "load_balancing_loss", "z_loss", "importance_loss", "load_loss", "cv_squared",
    "sequence_balance_loss", "router_entropy", "selection_counts", "balance_loss", "BALANCE_LOSSES",
]

BALANCE_LOSSES = ("switch", "importance_load", "sequence", "none")


def _masked_mean_rows(x_TE: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return x_TE.mean(0)
    m = mask.to(x_TE.dtype).unsqueeze(-1)
    return (x_TE * m).sum(0) / m.sum().clamp_min(1)


def selection_counts(topk_ids_TK: torch.Tensor, num_experts: int,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(E,) how many (token, slot) selections went to each expert, padding excluded."""
    return count_ids(topk_ids_TK, num_experts, None if mask is None else mask.unsqueeze(-1))


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int, *,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer's balancing loss ``E · Σ_e f_e · P_e``.

    ``f_e = counts_e / Σ counts`` (fraction of the ``T·K`` selections that went to e, not
    differentiable) and ``P_e`` = mean router probability of e over the (unmasked) tokens.
    Equals 1 under perfect balance (f = P = 1/E) and E when every token picks one expert
    with probability 1. `top_k` is checked against the counts (their sum must be T·K).
    """
    E = probs_TE.shape[-1]
    if counts_E.shape != (E,):
        raise ValueError(f"counts_E must have shape ({E},), got {tuple(counts_E.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    total = counts_E.sum()
    f_E = counts_E.float() / total.clamp_min(1).float()
    P_E = _masked_mean_rows(probs_TE.float(), mask)
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean_t (logsumexp_e logits)²``."""
    lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
    sq = lse_T.square()
    if mask is None:
        return sq.mean()
    return (sq * mask).sum() / mask.sum().clamp_min(1)


def cv_squared(x_E: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean²`` (population variance); 0 if uniform."""
    x = x_E.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(unbiased=False) / (x.mean().square() + eps)


def importance_loss(gates_TE: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shazeer et al.'s ``CV(Importance)²`` with ``Importance_e = Σ_t G(x_t)_e``."""
    g = gates_TE.float() if mask is None else gates_TE.float() * mask.unsqueeze(-1)
    return cv_squared(g.sum(0))


def load_loss(load_probs_TE: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shazeer et al.'s ``CV(Load)²`` with the smooth load ``Load_e = Σ_t P(x_t, e)``."""
    p = load_probs_TE.float() if mask is None else load_probs_TE.float() * mask.unsqueeze(-1)
    return cv_squared(p.sum(0))


def sequence_balance_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, *, seq_len: int,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over sequences.

    For each sequence of ``S = seq_len`` consecutive tokens:
    ``f_e = E / (K · S') · #{t : e ∈ topk(t)}``, ``P_e = mean_t probs_te`` (S' = unmasked
    tokens), loss ``Σ_e f_e P_e`` — equal to 1 under perfect balance inside the sequence.
    """
    T, E = probs_TE.shape
    K = topk_ids_TK.shape[-1]
    if seq_len <= 0 or T % seq_len:
        raise ValueError(f"seq_len must divide the token count T={T}, got {seq_len}")
    B = T // seq_len
    m_T = torch.ones(T, device=probs_TE.device) if mask is None else mask.float()
    onehot_TE = torch.zeros(T, E, device=probs_TE.device).scatter_add_(
        1, topk_ids_TK, torch.ones_like(topk_ids_TK, dtype=torch.float)) * m_T.unsqueeze(-1)
    n_B = m_T.view(B, seq_len).sum(1).clamp_min(1)                                # (B,)
    f_BE = onehot_TE.view(B, seq_len, E).sum(1) * (E / (K * n_B)).unsqueeze(-1)
    P_BE = (probs_TE.float() * m_T.unsqueeze(-1)).view(B, seq_len, E).sum(1) / n_B.unsqueeze(-1)
    per_seq = (f_BE * P_BE).sum(-1)
    # Mean over the sequences that hold a token (0 when none does).
    has_tokens = (m_T.view(B, seq_len).sum(1) > 0).to(per_seq.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1)


def router_entropy(probs_TE: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens of ``−Σ_e p log p`` (nats)."""
    p = probs_TE.float()
    h_T = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    if mask is None:
        return h_T.mean()
    return (h_T * mask).sum() / mask.sum().clamp_min(1)


def balance_loss(kind: str, routing, *, mask: Optional[torch.Tensor] = None,
                 seq_len: Optional[int] = None) -> torch.Tensor:
    """The balancing loss `kind` computed from a `Routing` (unweighted).

    ``"switch"`` uses ``routing.probs`` and the pre-capacity selection ``routing.topk_ids``;
    ``"importance_load"`` uses the noisy router's ``extras`` (falls back to hard selection
    counts for the load term when no smooth estimate exists, e.g. in eval);
    ``"sequence"`` needs `seq_len`; ``"none"`` is 0. Returns 0 when the router provides
    nothing the loss needs (hash, random).
    """
    if kind not in BALANCE_LOSSES:
        raise ValueError(f"balance loss must be one of {BALANCE_LOSSES}, got {kind!r}")
    probs, topk = routing.probs, routing.topk_ids
    device = routing.weights.device
    zero = torch.zeros((), device=device)
    if kind == "none" or probs is None:
        return zero
    E = routing.num_experts
    if kind == "switch":
        if topk is None:
            counts = routing.tokens_per_expert()
            return load_balancing_loss(probs, counts, 1, mask=mask)
        return load_balancing_loss(probs, selection_counts(topk, E, mask), topk.shape[-1], mask=mask)
    if kind == "importance_load":
        gates = routing.extras.get("gates")
        if gates is None:
            raise ValueError("balance loss 'importance_load' needs routing.extras['gates'] (noisy_topk router)")
        load = routing.extras.get("load_probs")
        load_term = load_loss(load, mask=mask) if load is not None else cv_squared(
            selection_counts(topk, E, mask).float())
        return importance_loss(gates, mask=mask) + load_term
    # "sequence"
    if topk is None:
        raise ValueError("balance loss 'sequence' needs a token-choice router (routing.topk_ids)")
    T = probs.shape[0]
    return sequence_balance_loss(probs, topk, seq_len=seq_len or T, mask=mask)
