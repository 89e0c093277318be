"""Balancing losses as pure functions — METHODS.md T1, T2, G2, G13.

Legend: T tokens, E experts, K experts per token, S sequence length, B sequences.

Every function takes an optional ``mask`` (T,) bool, False for padding tokens, which are left
out of every mean and count; a mean over no valid token is 0, never NaN. All return float32
scalars with gradient through the probabilities/logits only (counts are not differentiable).

Each loss is a function of sums over tokens (its sufficient statistics): the ``*_from_sums``
formulas below are the only place a loss is formed, shared by the public functions here and
by `moekit.losses.sufficient`, which gathers the sums of one forward pass so they can be added
up over ranks before the losses are formed (global-batch balancing).
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.ops.counting import count_ids
from moekit.validate import check_int, check_number, check_tensor

__all__ = [
    "load_balancing_loss", "z_loss", "importance_loss", "load_loss", "cv_squared",
    "sequence_balance_loss", "router_entropy", "selection_counts", "first_choice_loss",
    "device_balance_loss", "global_batch_balance_loss",
]


# -- argument checks (shapes and dtypes only: metadata, never a host sync) -----------------
def check_scores(name: str, x: torch.Tensor) -> torch.Tensor:
    """(T, E) float scores (probabilities, gates or logits) with E >= 1."""
    check_tensor(name, x, ndim=2, floating=True)
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one expert column, got shape {tuple(x.shape)}")
    return x


def check_mask(mask: Optional[torch.Tensor], T: int, of: str) -> Optional[torch.Tensor]:
    """None or a (T,) bool tensor (T = rows of `of`)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a bool tensor of shape ({T},) (one entry per row of {of}), "
                        f"got {type(mask).__name__}")
    if mask.shape != (T,):
        raise ValueError(f"mask must have shape ({T},) (one entry per row of {of}), got {tuple(mask.shape)}")
    check_tensor("mask", mask, dtype=torch.bool)
    return mask


def check_ids(name: str, ids_TK: torch.Tensor, T: int, of: str) -> torch.Tensor:
    """(T, K) integer expert ids with K >= 1 (T = rows of `of`)."""
    check_tensor(name, ids_TK, ndim=2, integer=True)
    if ids_TK.shape[0] != T or ids_TK.shape[1] == 0:
        raise ValueError(f"{name} must have shape ({T}, K) with K >= 1 (one row per row of {of}), "
                         f"got {tuple(ids_TK.shape)}")
    return ids_TK


# -- sums over the valid tokens ------------------------------------------------------------
def acc(x: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype of the losses: float32 at least, float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def masked_row_sum(x_TE: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(E,) float32 (float64 for float64 input) ``Σ_t mask_t · x_te`` (differentiable)."""
    x = acc(x_TE)
    return x.sum(0) if mask is None else (x * mask.unsqueeze(-1).to(x.dtype)).sum(0)


def masked_sum(x_T: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """0-d float32 (float64 for float64 input) ``Σ_t mask_t · x_t`` (differentiable)."""
    x = acc(x_T)
    return x.sum() if mask is None else (x * mask.to(x.dtype)).sum()


def num_valid(T: int, mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """0-d float32 count of valid tokens (on the device: no host sync)."""
    if mask is None:
        return torch.full((), float(T), device=device)
    return mask.sum().float()


def logsumexp_sq(logits_TE: torch.Tensor) -> torch.Tensor:
    """(T,) ``(logsumexp_e logits)²`` in float32."""
    return torch.logsumexp(acc(logits_TE), dim=-1).square()


def entropy_rows(probs_TE: torch.Tensor) -> torch.Tensor:
    """(T,) ``−Σ_e p log p`` in float32 (nats; 0·log 0 = 0)."""
    p = acc(probs_TE)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def sequence_sums(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, seq_len: int,
                  mask: Optional[torch.Tensor]) -> tuple:
    """``(Σ_b loss_b, #sequences holding a valid token)`` of DeepSeek-V3's sequence-wise loss
    (see `sequence_balance_loss`); both 0-d float32, the first differentiable."""
    T, E = probs_TE.shape
    K = topk_ids_TK.shape[-1]
    B = T // seq_len
    m_T = torch.ones(T, device=probs_TE.device) if mask is None else mask.float()
    onehot_TE = torch.zeros(T, E, device=probs_TE.device).scatter_add_(
        1, topk_ids_TK.long(), torch.ones(topk_ids_TK.shape, device=probs_TE.device)) * m_T.unsqueeze(-1)
    n_B = m_T.view(B, seq_len).sum(1)                                               # (B,)
    f_BE = onehot_TE.view(B, seq_len, E).sum(1) * (E / (K * n_B.clamp_min(1))).unsqueeze(-1)
    P_BE = (acc(probs_TE) * m_T.unsqueeze(-1)).view(B, seq_len, E).sum(1) / n_B.clamp_min(1).unsqueeze(-1)
    has_tokens_B = (n_B > 0).float()
    return ((f_BE * P_BE).sum(-1) * has_tokens_B).sum(), has_tokens_B.sum()


# -- losses from sums (the one place each formula lives) -----------------------------------
def mean_from_sums(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` as float32 (float64 when `total` is), 0 when count is 0."""
    return acc(total / count.to(total.dtype).clamp_min(1))


def switch_from_sums(prob_sum_E: torch.Tensor, counts_E: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """``E · Σ_e f_e · P_e`` with ``f = counts / Σ counts`` and ``P = prob_sum / n_valid``."""
    E = prob_sum_E.shape[-1]
    counts = counts_E.to(prob_sum_E.dtype)
    f_E = counts / counts.sum().clamp_min(1)
    P_E = prob_sum_E / n_valid.to(prob_sum_E.dtype).clamp_min(1)
    return acc(E * (f_E * P_E).sum())


def device_from_sums(prob_sum_E: torch.Tensor, counts_E: torch.Tensor, n_valid: torch.Tensor,
                     num_devices: int) -> torch.Tensor:
    """DeepSeek's device-level loss ``Σ_d f'_d · P'_d`` over `num_devices` contiguous groups of
    ``E / num_devices`` experts: ``f_e = E · counts_e / Σ counts`` (1 at balance),
    ``f'_d = mean_{e∈d} f_e``, ``P'_d = Σ_{e∈d} P_e``. Equals 1 at balance; with one expert
    per device it is the Switch form."""
    E = prob_sum_E.shape[-1]
    counts = counts_E.to(prob_sum_E.dtype)
    f_DG = (E * counts / counts.sum().clamp_min(1)).view(num_devices, E // num_devices)
    P_DG = (prob_sum_E / n_valid.to(prob_sum_E.dtype).clamp_min(1)).view(num_devices, E // num_devices)
    return acc((f_DG.mean(-1) * P_DG.sum(-1)).sum())


def cv_squared_from_sums(x_E: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean²`` (population variance); 0 if uniform."""
    if x_E.numel() <= 1:
        return x_E.new_zeros((), dtype=torch.float32)
    x = acc(x_E)
    return x.var(unbiased=False) / (x.mean().square() + eps)


# -- public functions ----------------------------------------------------------------------
def selection_counts(topk_ids_TK: torch.Tensor, num_experts: int,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(E,) int64: how many (token, slot) selections went to each expert, padding excluded.

    Ids must lie in ``[0, num_experts)`` (not checked: that would read them on the host).
    """
    check_int("num_experts", num_experts, min=1)
    check_tensor("topk_ids_TK", topk_ids_TK, ndim=2, integer=True)
    check_mask(mask, topk_ids_TK.shape[0], "topk_ids_TK")
    return count_ids(topk_ids_TK, num_experts, None if mask is None else mask.unsqueeze(-1))


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int, *,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer's balancing loss ``E · Σ_e f_e · P_e``.

    ``f_e = counts_e / Σ counts`` (fraction of the ``T·K`` selections that went to e, not
    differentiable) and ``P_e`` = mean router probability of e over the (unmasked) tokens.
    Equals 1 under perfect balance (f = P = 1/E) and E when every token picks one expert
    with probability 1.

    probs_TE: (T, E) float. counts_E: (E,) pre-capacity selections per expert (integer, or
    float holding whole numbers); they must sum to ``(valid tokens) · top_k`` — checked,
    which reads the sum on the host.
    """
    check_scores("probs_TE", probs_TE)
    T, E = probs_TE.shape
    check_tensor("counts_E", counts_E, shape=(E,))
    if counts_E.dtype == torch.bool or counts_E.is_complex():
        raise ValueError(f"counts_E must be an integer or float tensor, got dtype {counts_E.dtype}")
    top_k = check_int("top_k", top_k, min=1)
    check_mask(mask, T, "probs_TE")
    n_valid = num_valid(T, mask, probs_TE.device)
    c = counts_E.double()
    total, low, n = torch.stack([c.sum(), c.min(), n_valid.double()]).tolist()     # one host read
    if low < 0:
        raise ValueError(f"counts_E must be >= 0, got {counts_E.tolist()}")
    if total != n * top_k:
        raise ValueError(f"counts_E must sum to (valid tokens) · top_k = {n:g} · {top_k} = {n * top_k:g} "
                         f"(one count per pre-capacity selection), got {total:g}")
    return switch_from_sums(masked_row_sum(probs_TE, mask), counts_E, n_valid)


def first_choice_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, *,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GShard's balancing loss in its raw form ``(1/E) Σ_e (c_e / S) · m_e`` (METHODS.md G3, T1 (b)).

    ``c_e`` = tokens whose FIRST choice (column 0 of `topk_ids_TK`) is e, ``S`` = valid tokens,
    ``m_e`` = mean router probability of e. Minimum ``1/E²`` at perfect balance; ``E² ·`` this
    is the scaled form the MoE layer uses (``balance_loss="gshard"``, 1 at balance). Unlike the
    Switch form it ignores the second and later choices.

    probs_TE: (T, E) float; topk_ids_TK: (T, K) integer ids in ``[0, E)`` in preference order
    (checked, which reads them on the host).
    """
    check_scores("probs_TE", probs_TE)
    T, E = probs_TE.shape
    check_ids("topk_ids_TK", topk_ids_TK, T, "probs_TE")
    check_mask(mask, T, "probs_TE")
    _check_id_range(topk_ids_TK, E)
    first = count_ids(topk_ids_TK[:, :1], E, None if mask is None else mask.unsqueeze(-1))
    return switch_from_sums(masked_row_sum(probs_TE, mask), first, num_valid(T, mask, probs_TE.device)) / E ** 2


def device_balance_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, *, num_devices: int,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeepSeekMoE / DeepSeek-V2's device-level balance loss ``Σ_d f'_d · P'_d`` (METHODS.md X2, T1 (d)).

    Experts are placed on `num_devices` devices in contiguous groups of ``E / num_devices``
    (expert e on device ``e // (E / num_devices)``, the expert-parallel sharding); no process
    group is needed. ``f_e = E / (K·T) · #{t : e ∈ topk(t)}``, ``P_e = mean_t p_te``,
    ``f'_d = mean_{e∈d} f_e``, ``P'_d = Σ_{e∈d} P_e``. Equals 1 at balance; it balances devices,
    not experts inside a device (``num_devices = E``: the Switch form; 1: constant 1).

    probs_TE: (T, E) float; topk_ids_TK: (T, K) ids in ``[0, E)`` (checked on the host);
    num_devices must divide E.
    """
    check_scores("probs_TE", probs_TE)
    T, E = probs_TE.shape
    check_ids("topk_ids_TK", topk_ids_TK, T, "probs_TE")
    check_mask(mask, T, "probs_TE")
    check_devices(num_devices, E)
    _check_id_range(topk_ids_TK, E)
    counts = count_ids(topk_ids_TK, E, None if mask is None else mask.unsqueeze(-1))
    return device_from_sums(masked_row_sum(probs_TE, mask), counts, num_valid(T, mask, probs_TE.device), num_devices)


def global_batch_balance_loss(probs: list, topk_ids: list, *, masks: Optional[list] = None) -> torch.Tensor:
    """The Switch form ``E · Σ_e f_e · P_e`` with f and P taken over all micro-batches together
    (Qiu et al. 2025, "Demons in the Detail"; METHODS.md T1 (f)).

    ``probs[a]``: (T_a, E) probabilities of micro-batch a; ``topk_ids[a]``: (T_a, K) its
    selections; ``masks[a]``: None or (T_a,) bool. Equals `load_balancing_loss` on the
    concatenated batch: the sums over tokens (selections, probabilities, valid tokens) are added
    over micro-batches before the loss is formed. (`moekit.MoE` with
    ``balance_scope="global_batch"`` accumulates the selection counts the same way over the
    micro-batches of one optimizer step.)
    """
    if not isinstance(probs, (list, tuple)) or not isinstance(topk_ids, (list, tuple)) or not probs:
        raise TypeError("probs and topk_ids must be non-empty lists of per-micro-batch tensors, got "
                        f"{type(probs).__name__} and {type(topk_ids).__name__}")
    if len(probs) != len(topk_ids) or (masks is not None and len(masks) != len(probs)):
        raise ValueError(f"probs, topk_ids and masks must have one entry per micro-batch, got lengths "
                         f"{len(probs)}, {len(topk_ids)}, {None if masks is None else len(masks)}")
    E = None
    prob_sum = counts = n = None
    for a, (p, ids) in enumerate(zip(probs, topk_ids)):
        check_scores(f"probs[{a}]", p)
        if E is not None and p.shape[1] != E:
            raise ValueError(f"probs[{a}] must have {E} expert columns like probs[0], got {p.shape[1]}")
        T, E = p.shape
        check_ids(f"topk_ids[{a}]", ids, T, f"probs[{a}]")
        m = None if masks is None else check_mask(masks[a], T, f"probs[{a}]")
        _check_id_range(ids, E)
        ps, c, v = masked_row_sum(p, m), count_ids(ids, E, None if m is None else m.unsqueeze(-1)), \
            num_valid(T, m, p.device)
        prob_sum, counts, n = (ps, c, v) if prob_sum is None else (prob_sum + ps, counts + c, n + v)
    return switch_from_sums(prob_sum, counts, n)


def check_devices(num_devices, num_experts: int) -> int:
    """num_devices: an int >= 1 that divides E."""
    check_int("num_devices", num_devices, min=1)
    if num_experts % num_devices:
        raise ValueError(f"num_devices must divide num_experts={num_experts} (equal expert groups), got {num_devices}")
    return num_devices


def _check_id_range(ids_TK: torch.Tensor, E: int) -> None:
    if ids_TK.numel() and bool(((ids_TK < 0) | (ids_TK >= E)).any()):
        raise ValueError(f"topk_ids must hold expert ids in [0, {E}), got values in "
                         f"[{int(ids_TK.min())}, {int(ids_TK.max())}]")


def z_loss(logits_TE: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean_t (logsumexp_e logits)²``. logits_TE: (T, E) float."""
    check_scores("logits_TE", logits_TE)
    check_mask(mask, logits_TE.shape[0], "logits_TE")
    return mean_from_sums(masked_sum(logsumexp_sq(logits_TE), mask),
                          num_valid(logits_TE.shape[0], mask, logits_TE.device))


def cv_squared(x_E: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean²`` (population variance); 0 if uniform.

    x_E: (E,) integer or float values per expert.
    """
    check_tensor("x_E", x_E, ndim=1)
    if x_E.dtype == torch.bool or x_E.is_complex():
        raise ValueError(f"x_E must be an integer or float tensor, got dtype {x_E.dtype}")
    eps = check_number("eps", eps, min=0)
    return cv_squared_from_sums(x_E, eps)


def importance_loss(gates_TE: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shazeer et al.'s ``CV(Importance)²`` with ``Importance_e = Σ_t G(x_t)_e``. gates_TE: (T, E)."""
    check_scores("gates_TE", gates_TE)
    check_mask(mask, gates_TE.shape[0], "gates_TE")
    return cv_squared_from_sums(masked_row_sum(gates_TE, mask))


def load_loss(load_probs_TE: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shazeer et al.'s ``CV(Load)²`` with the smooth load ``Load_e = Σ_t P(x_t, e)``.
    load_probs_TE: (T, E)."""
    check_scores("load_probs_TE", load_probs_TE)
    check_mask(mask, load_probs_TE.shape[0], "load_probs_TE")
    return cv_squared_from_sums(masked_row_sum(load_probs_TE, mask))


def sequence_balance_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, *, seq_len: int,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over sequences.

    For each sequence of ``S = seq_len`` consecutive tokens:
    ``f_e = E / (K · S') · #{t : e ∈ topk(t)}``, ``P_e = mean_t probs_te`` (S' = unmasked
    tokens), loss ``Σ_e f_e P_e`` — equal to 1 under perfect balance inside the sequence.
    The mean is over the sequences holding a valid token (0 when none does).

    probs_TE: (T, E) float; topk_ids_TK: (T, K) integer ids in ``[0, E)`` (checked, which
    reads them on the host); `seq_len` must divide T.
    """
    check_scores("probs_TE", probs_TE)
    T, E = probs_TE.shape
    check_ids("topk_ids_TK", topk_ids_TK, T, "probs_TE")
    seq_len = check_int("seq_len", seq_len, min=1)
    if T % seq_len:
        raise ValueError(f"seq_len must divide the token count T={T}, got {seq_len}")
    check_mask(mask, T, "probs_TE")
    if topk_ids_TK.numel() and bool(((topk_ids_TK < 0) | (topk_ids_TK >= E)).any()):
        raise ValueError(f"topk_ids_TK must hold expert ids in [0, {E}), got values in "
                         f"[{int(topk_ids_TK.min())}, {int(topk_ids_TK.max())}]")
    return mean_from_sums(*sequence_sums(probs_TE, topk_ids_TK, seq_len, mask))


def router_entropy(probs_TE: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens of ``−Σ_e p log p`` (nats). probs_TE: (T, E) float."""
    check_scores("probs_TE", probs_TE)
    check_mask(mask, probs_TE.shape[0], "probs_TE")
    return mean_from_sums(masked_sum(entropy_rows(probs_TE), mask),
                          num_valid(probs_TE.shape[0], mask, probs_TE.device))
