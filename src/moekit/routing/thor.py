"""THOR: stochastic experts with consistency regularisation (Zuo et al. 2022, "Taming Sparsely
Activated Transformer with Stochastic Experts") — METHODS.md G14.

Legend: T tokens, E experts, V output classes.

No router parameters. In training each forward picks experts uniformly at random: one expert
for the whole forward (``granularity="batch"``, THOR's choice) or one per token
(``"token"``); gate 1. Training runs the model twice on the same batch — two independent
draws — and adds the symmetric KL between the two predictions:

``loss = CE(a) + CE(b) + α · ½ (KL(p_a ‖ p_b) + KL(p_b ‖ p_a))`` (`consistency_loss`),

which pulls the experts towards interchangeable, mutually consistent functions.
In eval (deterministic, METHODS.md contract 8): ``eval_mode="ensemble"`` averages all experts
(weights 1/E; the expectation of the training-time draw) or ``"fixed"`` uses ``eval_expert``.
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.routing.base import Router, Routing, check_no_top_k
from moekit.routing.pairs import no_drops
from moekit.validate import check_choice, check_int

__all__ = ["ThorRouter", "consistency_loss"]


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, *,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``½ (KL(p_a ‖ p_b) + KL(p_b ‖ p_a))`` over the last axis, mean over the other positions.

    Zero iff the two predictions agree; gradients reach both forward passes.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits must have one shape, got {tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    la, lb = torch.log_softmax(logits_a.float(), -1), torch.log_softmax(logits_b.float(), -1)
    sym = 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))
    if mask is None:
        return sym.mean()
    return (sym * mask).sum() / mask.sum().clamp_min(1)


class ThorRouter(Router):
    """``top_k`` is not used (one expert per token); an explicit ``top_k`` other than its own count is refused."""

    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None, *,
                 granularity: str = "batch", eval_mode: str = "ensemble", eval_expert: int = 0):
        check_no_top_k("thor", top_k, 1)
        super().__init__(d_model, num_experts, None)
        check_choice("granularity", granularity, ("batch", "token"))
        check_choice("eval_mode", eval_mode, ("ensemble", "fixed"))
        check_int("eval_expert", eval_expert, min=0, max=num_experts - 1)
        self.granularity, self.eval_mode, self.eval_expert = granularity, eval_mode, eval_expert

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        T, E, device = x_TD.shape[0], self.num_experts, x_TD.device
        token_T = torch.arange(T, device=device) if mask is None else mask.nonzero()[:, 0]
        n = token_T.numel()
        if not self.training and self.eval_mode == "ensemble":
            token_ids = token_T.repeat_interleave(E)
            expert_ids = torch.arange(E, device=device).repeat(n)
            weights = torch.full((n * E,), 1.0 / E, device=device)
        else:
            if not self.training:
                expert_ids = torch.full((n,), self.eval_expert, dtype=torch.long, device=device)
            elif self.granularity == "batch":
                expert_ids = torch.randint(E, (1,), device=device).expand(n).clone()
            else:
                expert_ids = torch.randint(E, (n,), device=device)
            token_ids, weights = token_T, torch.ones(n, device=device)
        return Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights, logits=None,
                       dropped=no_drops(device), num_experts=E)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, granularity={self.granularity!r}, eval_mode={self.eval_mode!r}, "
                f"eval_expert={self.eval_expert}")
