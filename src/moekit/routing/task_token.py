"""Task-conditioned token routing: one gate per task over a shared expert pool — METHODS.md MT4, MT5.

Legend: T tokens, D model dim, E experts, K experts per token, M tasks.

Mod-Squad (Chen et al. 2023, CVPR) and M³ViT (Liang et al. 2022, NeurIPS) share one expert pool
among tasks and give each task its own router on the token: for a token x of task t,

    g_t(x) = TopK(softmax(W_t x)),   W_t: (E, D),

then the K weights are renormalised to sum to 1 (``norm="renorm"``) or kept raw. Unlike
Task-MoE (`moekit.routing.task`, the same K experts for every token of a task) each token
still picks its own experts.

``task_experts`` (M, E) bool restricts task t to a fixed subset of the experts (the others get
probability 0): the strict form of M³ViT's "only task-relevant experts run", under which the
experts a task can activate in a layer are a fixed subset whatever the input, so only those
need to be in memory when serving that task. `m3vit_task_experts` builds evenly overlapping
windows. ``mi_loss_coef`` adds Mod-Squad's loss ``−coef · I(T; E)`` over the batch
(`moekit.losses.mutual_information_loss`) to ``routing.aux_losses["mutual_information"]``, which
the MoE layer adds to its ``aux_loss``.

`subset` builds the router of an extracted sub-model: some experts, some tasks. Under
``"renorm"`` a token whose top-K experts are all kept is routed with the same weights, since
``p_e / Σ_topK p`` does not depend on the other experts' probabilities.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.losses.mutual_information import mutual_information_loss
from moekit.ops.topk import topk_stable
from moekit.routing.base import TokenChoiceRouter, router_float
from moekit.routing.pairs import check_token_input
from moekit.routing.topk import init_router_weight, normalise
from moekit.validate import check_choice, check_int, check_number, check_tensor

__all__ = ["TaskTokenRouter", "m3vit_task_experts"]


def m3vit_task_experts(num_tasks: int, num_experts: int, experts_per_task: int) -> torch.Tensor:
    """(M, E) bool: task t may use the window of `experts_per_task` consecutive experts starting at
    ``round(t · (E − m) / (M − 1))`` — windows spread evenly, neighbouring tasks overlapping."""
    check_int("num_tasks", num_tasks, min=1)
    check_int("num_experts", num_experts, min=1)
    check_int("experts_per_task", experts_per_task, min=1, max=num_experts)
    out = torch.zeros(num_tasks, num_experts, dtype=torch.bool)
    span = num_experts - experts_per_task
    for t in range(num_tasks):
        start = round(t * span / (num_tasks - 1)) if num_tasks > 1 else 0
        out[t, start:start + experts_per_task] = True
    return out


class TaskTokenRouter(TokenChoiceRouter):
    """Per-task top-k token routers over one expert pool; ``forward(x_TD, *, mask=None, task_ids)``.

    Args:
        num_tasks: M (required).
        norm: ``"renorm"`` (default) or ``"raw"`` combine weights (see `moekit.routing.topk`).
        task_experts: None (every task may use every expert) or an (M, E) bool tensor; each task
            needs at least K allowed experts.
        mi_loss_coef: weight of the mutual-information loss (0: off).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, num_tasks: Optional[int] = None,
                 norm: str = "renorm", task_experts: Optional[torch.Tensor] = None, mi_loss_coef: float = 0.0,
                 capacity_factor=None, eval_capacity_factor="same", drop_policy: str = "position"):
        super().__init__(d_model, num_experts, top_k, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy)
        if num_tasks is None:
            raise ValueError("router 'task_topk' needs num_tasks (how many task ids it routes): pass it through "
                             "router_kwargs, e.g. MoE(router='task_topk', router_kwargs={'num_tasks': M})")
        check_int("num_tasks", num_tasks, min=1)
        check_choice("norm", norm, ("renorm", "raw"))
        self.num_tasks, self.norm = num_tasks, norm
        self.mi_loss_coef = check_number("mi_loss_coef", mi_loss_coef, min=0)
        if task_experts is None:
            task_experts = torch.ones(num_tasks, num_experts, dtype=torch.bool, device="cpu")
        check_tensor("task_experts", task_experts, shape=(num_tasks, num_experts), dtype=torch.bool)
        fewest = top_k if task_experts.is_meta else int(task_experts.sum(1).min())
        if fewest < top_k:
            raise ValueError(f"task_experts must allow every task at least top_k={top_k} experts, "
                             f"got a task with {fewest}")
        # Expert-major layouts (E, M, D) and (E, M): every per-expert tensor leads with E, as in
        # the expert banks, so slicing experts is one index on dim 0.
        self.weight = nn.Parameter(torch.empty(num_experts, num_tasks, d_model))
        for t in range(num_tasks):
            init_router_weight(self.weight.data[:, t])
        self.register_buffer("allowed_EM", task_experts.t().contiguous().clone())

    @property
    def task_experts(self) -> torch.Tensor:
        """(M, E) bool: the experts each task may use."""
        return self.allowed_EM.t()

    def task_logits(self, x_TD: torch.Tensor, task_ids_T: torch.Tensor) -> torch.Tensor:
        """(T, E) float32 logits ``W_t x`` of each token under its task; −inf outside its subset."""
        E, M, D = self.weight.shape
        # All M gates on every token, then each token's own: M·E·D per token, tiny next to the experts.
        w_MED = router_float(self.weight).transpose(0, 1).reshape(M * E, D)
        logits_TME = F.linear(router_float(x_TD), w_MED).view(-1, M, E)
        logits_TE = logits_TME.gather(1, task_ids_T.view(-1, 1, 1).expand(-1, 1, E)).squeeze(1)
        allowed_TE = self.allowed_EM.t()[task_ids_T]
        return logits_TE.masked_fill(~allowed_TE, float("-inf"))

    def select(self, logits_TE: torch.Tensor):
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_p_TK, topk_ids_TK = topk_stable(probs_TE, self.top_k)
        return topk_ids_TK, normalise(top_p_TK, self.norm, 1.0), probs_TE

    def forward(self, x_TD, *, mask=None, task_ids=None):
        self.check_input(x_TD, mask)
        ids_T = check_token_input("task_ids", task_ids, x_TD.shape[0], self.num_tasks,
                                  sync_free=self.sync_free).to(x_TD.device).long()
        logits_TE = self.task_logits(x_TD, ids_T)
        topk_ids_TK, weights_TK, probs_TE = self.select(logits_TE)
        aux = {}
        if self.mi_loss_coef > 0:
            aux["mutual_information"] = mutual_information_loss(probs_TE, ids_T, num_tasks=self.num_tasks, mask=mask,
                                                                weight=self.mi_loss_coef)
        return self.build_routing(logits_TE, probs_TE, topk_ids_TK, weights_TK, mask, aux_losses=aux)

    @torch.no_grad()
    def subset(self, experts: Sequence[int], tasks: Optional[Sequence[int]] = None) -> "TaskTokenRouter":
        """A new router over `experts` (in that order) for `tasks` (default all; renumbered
        0, 1, …); K becomes ``min(K, fewest experts any kept task may use)``."""
        E, M = self.num_experts, self.num_tasks
        experts = [check_int(f"experts[{j}]", e, min=0, max=E - 1) for j, e in enumerate(experts)]
        tasks = list(range(M)) if tasks is None else [check_int(f"tasks[{j}]", t, min=0, max=M - 1)
                                                      for j, t in enumerate(tasks)]
        if not experts or len(set(experts)) != len(experts) or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"experts and tasks must be non-empty lists of distinct ids, got {experts} and {tasks}")
        e_idx = torch.tensor(experts, device=self.weight.device)
        t_idx = torch.tensor(tasks, device=self.weight.device)
        allowed_EM = self.allowed_EM[e_idx][:, t_idx]
        fewest = int(allowed_EM.sum(0).min())
        if fewest == 0:
            raise ValueError("every kept task must be allowed at least one kept expert")
        out = TaskTokenRouter(self.d_model, len(experts), min(self.top_k, fewest), num_tasks=len(tasks),
                              norm=self.norm, task_experts=allowed_EM.t().cpu(), mi_loss_coef=self.mi_loss_coef,
                              capacity_factor=self.capacity_factor, eval_capacity_factor=self.eval_capacity_factor,
                              drop_policy=self.drop_policy)
        out.weight.data = self.weight.detach()[e_idx][:, t_idx].clone()
        out.allowed_EM = out.allowed_EM.to(self.weight.device)
        return out.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_tasks={self.num_tasks}, norm={self.norm!r}, "
                f"mi_loss_coef={self.mi_loss_coef}")
