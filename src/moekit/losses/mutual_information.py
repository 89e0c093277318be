"""Mutual information between tasks and experts: Mod-Squad's loss — METHODS.md MT4.

Chen, Shen, Ding, Chen, Zhang, Learned-Miller & Gan (2023), CVPR, "Mod-Squad: Designing
Mixtures of Experts As Modular Multi-Task Learners".

Legend: T tokens, E experts, M tasks.

The joint distribution of task and expert is estimated from a batch's gate probabilities,

    P(t, e) = (1 / T) Σ_{tokens x of task t} p(e | x)

(so P(t) is task t's share of the tokens and P(e | t) its mean gate), and

    I(T; E) = Σ_{t,e} P(t, e) log P(t, e) / (P(t) P(e))  =  H(E) − H(E | T)  ≥ 0.

Maximising I pushes each task onto few experts (low H(E | T)) while the experts stay busy in
total (high H(E)): the loss is ``−weight · I``. I = 0 exactly when routing does not depend on
the task (P(e | t) the same for every t). `moekit.analysis.routing.mutual_information` gives the
same I from a joint count table (numpy, no gradient).
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.losses.balance import check_mask, check_scores
from moekit.validate import check_int, check_number, check_tensor

__all__ = ["task_expert_joint", "mutual_information_from_joint", "mutual_information_loss"]


def task_expert_joint(probs_TE: torch.Tensor, task_ids_T: torch.Tensor, *, num_tasks: int,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(M, E) float32 joint ``P(t, e)`` from per-token gate probabilities (with gradient).

    probs_TE: (T, E) gate probabilities (each row sums to 1). task_ids_T: (T,) int task of each
    token, in [0, num_tasks). mask: (T,) bool, False = padding (left out). Sums to 1 over the
    valid tokens; all zeros when there is none.
    """
    check_scores("probs_TE", probs_TE)
    T, E = probs_TE.shape
    check_int("num_tasks", num_tasks, min=1)
    check_tensor("task_ids_T", task_ids_T, shape=(T,), integer=True)
    check_mask(mask, T, "probs_TE")
    p = probs_TE if probs_TE.dtype == torch.float64 else probs_TE.float()
    if mask is not None:
        p = p * mask.unsqueeze(1).to(p.dtype)
    n = max(T, 1) if mask is None else mask.sum().clamp_min(1).to(p.dtype)
    joint_ME = p.new_zeros(num_tasks, E).index_add(0, task_ids_T.to(p.device).long(), p)
    return joint_ME / n


def mutual_information_from_joint(joint_ME: torch.Tensor) -> torch.Tensor:
    """``I(T; E)`` in nats of a joint ``P(t, e)`` (M, E) (normalised here; 0·log 0 = 0)."""
    check_tensor("joint_ME", joint_ME, ndim=2, floating=True)
    p = joint_ME / joint_ME.sum().clamp_min(1e-30)
    pt_M1, pe_1E = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    # log p − log(P(t)P(e)) with zero cells contributing 0 and no NaN in the gradient.
    tiny = 1e-30
    ratio = torch.log(p.clamp_min(tiny)) - torch.log((pt_M1 * pe_1E).clamp_min(tiny))
    return (torch.where(p > 0, p * ratio, torch.zeros_like(p))).sum()


def mutual_information_loss(probs_TE: torch.Tensor, task_ids_T: torch.Tensor, *, num_tasks: int,
                            mask: Optional[torch.Tensor] = None, weight: float = 1.0) -> torch.Tensor:
    """Mod-Squad's loss ``−weight · I(T; E)`` (float32 scalar, with gradient through probs_TE)."""
    weight = check_number("weight", weight, min=0)
    joint = task_expert_joint(probs_TE, task_ids_T, num_tasks=num_tasks, mask=mask)
    return -weight * mutual_information_from_joint(joint)
