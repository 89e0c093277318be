"""Task-level routing, Task-MoE (Kudugunta et al. 2021, "Beyond Distillation: Task-level
Mixture-of-Experts for Efficient Inference") — METHODS.md L1.

Legend: T tokens, E experts, K experts per token, M tasks, R task-embedding dim.

The router input is the task, not the token: ``g = TopK(softmax(W · emb(task)))``, so every
token of one task takes the same K experts with the same weights in a layer. At serving time
`task_experts` lists those experts, and the sub-network made of them alone reproduces the full
layer for that task (a small dense model per task). Needs ``task_ids`` (T,) in ``forward``
(``MoE.forward(x, task_ids=...)``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.ops.topk import topk_stable
from moekit.routing.base import TokenChoiceRouter, router_float
from moekit.routing.pairs import check_token_input
from moekit.routing.topk import init_router_weight, normalise
from moekit.validate import check_choice, check_int

__all__ = ["TaskRouter"]


class TaskRouter(TokenChoiceRouter):
    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, num_tasks: Optional[int] = None,
                 d_task: int = 16, norm: str = "renorm", capacity_factor=None, eval_capacity_factor="same",
                 drop_policy: str = "position"):
        super().__init__(d_model, num_experts, top_k, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy)
        if num_tasks is None:
            raise ValueError("router 'task' needs num_tasks (how many task ids it routes): pass it through "
                             "router_kwargs, e.g. MoE(router='task', router_kwargs={'num_tasks': N})")
        check_int("num_tasks", num_tasks, min=1)
        check_int("d_task", d_task, min=1)
        check_choice("norm", norm, ("renorm", "raw"))
        self.num_tasks, self.d_task, self.norm = num_tasks, d_task, norm
        self.task_embed = nn.Embedding(num_tasks, d_task)
        self.weight = nn.Parameter(torch.empty(num_experts, d_task))
        init_router_weight(self.weight.data, scale=1.0)

    def task_logits(self) -> torch.Tensor:
        """(M, E) float32 logits of every task (float64 for a float64 router)."""
        return F.linear(router_float(self.task_embed.weight), router_float(self.weight))

    def select(self, logits_TE: torch.Tensor):
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_p_TK, topk_ids_TK = topk_stable(probs_TE, self.top_k)
        return topk_ids_TK, normalise(top_p_TK, self.norm, 1.0), probs_TE

    @torch.no_grad()
    def task_experts(self, task_id: int):
        """``(expert_ids_K, weights_K)`` that every token of `task_id` uses (dropless)."""
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task_id must be in [0, {self.num_tasks}), got {task_id}")
        ids_1K, w_1K, _ = self.select(self.task_logits()[task_id:task_id + 1])
        return ids_1K[0], w_1K[0]

    def forward(self, x_TD, *, mask=None, task_ids=None):
        self.check_input(x_TD, mask)
        ids_T = check_token_input("task_ids", task_ids, x_TD.shape[0], self.num_tasks,
                                  sync_free=self.sync_free).to(x_TD.device)
        logits_TE = self.task_logits()[ids_T]
        topk_ids_TK, weights_TK, probs_TE = self.select(logits_TE)
        return self.build_routing(logits_TE, probs_TE, topk_ids_TK, weights_TK, mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_tasks={self.num_tasks}, d_task={self.d_task}"
