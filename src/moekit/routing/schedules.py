"""Training schedules around routers — METHODS.md T4, T5, T8.

Legend: T tokens, D model dim, E experts, K experts per token, V vocabulary size.

- `DenseToSparseRouter` (T4, EvoMoE; Nie et al. 2021, "EvoMoE: An Evolutional Mixture-of-Experts
  Training Framework via Dense-To-Sparse Gate"): a Gumbel-softmax gate whose temperature is
  annealed (`TemperatureSchedule`) from dense to sparse, then plain top-k.
- `StableMoERouter` (T5, Dai et al. 2022, "StableMoE: Stable Routing Strategy for Mixture of
  Experts"): stage 1 learns routing and distils it into a light token-id router; stage 2
  freezes that router so every token id keeps its expert.
- `RoutingDropout` (T8): expert-output masking (NLLB Team 2022, "No Language Left Behind") and
  random (token, expert) pair dropout around any router, training only;
  `freeze_moe_parameters` toggles ``requires_grad`` on expert/router parameters only
  (ST-MoE's fine-tuning finding, Zoph et al. 2022).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.ops.topk import topk_stable
from moekit.routing.base import Router, Routing, check_no_top_k, router_float
from moekit.routing.pairs import check_token_input, no_drops, pairs_from_selection
from moekit.routing.topk import init_router_weight
from moekit.validate import check_int, check_number

__all__ = ["TemperatureSchedule", "DenseToSparseRouter", "StableMoERouter", "RoutingDropout",
           "freeze_moe_parameters"]


# ---------------------------------------------------------------------------------------------
# T4: dense-to-sparse gate
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TemperatureSchedule:
    """τ(step): geometric interpolation from `start` to `end` over `steps`, then `end`."""

    start: float = 2.0
    end: float = 0.3
    steps: int = 1000

    def __post_init__(self):
        check_number("end", self.end, min=0, min_open=True)
        check_number("start", self.start, min=self.end)        # τ only falls
        check_int("steps", self.steps, min=0)

    def __call__(self, step: int) -> float:
        if self.steps == 0 or step >= self.steps:
            return self.end
        frac = max(step, 0) / self.steps
        return self.start * (self.end / self.start) ** frac

    def finished(self, step: int) -> bool:
        return step >= self.steps


class DenseToSparseRouter(Router):
    """EvoMoE's dense-to-sparse gate (METHODS.md T4).

    While the schedule runs: ``G = softmax((x W_rᵀ + g) / τ)`` with Gumbel noise g (training
    only); a token keeps its top-K experts and every other expert with ``G ≥ threshold``, and
    the kept gates are renormalised to sum to 1. At a high τ the gate is nearly uniform, so
    with ``threshold < 1/E`` every expert is active; as τ falls each expert's gate crosses the
    threshold at most once (it rises and then falls in 1/τ), so the number of active experts
    never grows, and it never drops below K. Once the schedule ends the router is plain
    softmax top-k (renormalised): the count meets K without a jump. (EvoMoE prunes by the
    threshold alone; keeping the top-K is our choice so the hand-over is monotone.)

    Every training forward advances the schedule by one step (``step`` buffer); eval uses the
    current τ without noise.
    """

    default_balance_loss = "switch"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, start_temperature: float = 2.0,
                 end_temperature: float = 0.3, anneal_steps: int = 1000, threshold: Optional[float] = None):
        super().__init__(d_model, num_experts, top_k)
        for name, v in (("start_temperature", start_temperature), ("end_temperature", end_temperature)):
            check_number(name, v, min=0, min_open=True)
        if start_temperature < end_temperature:
            raise ValueError(f"start_temperature must be >= end_temperature={end_temperature} (τ only falls), "
                             f"got {start_temperature}")
        check_int("anneal_steps", anneal_steps, min=0)
        self.schedule = TemperatureSchedule(start_temperature, end_temperature, anneal_steps)
        threshold = 0.5 / num_experts if threshold is None else check_number("threshold", threshold)
        if not 0 <= threshold < 1.0 / num_experts:
            raise ValueError(f"threshold must be in [0, 1/E = {1 / num_experts:.4g}) so training starts dense, "
                             f"got {threshold}")
        self.threshold = float(threshold)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        init_router_weight(self.weight.data)

    @property
    def temperature(self) -> float:
        return self.schedule(int(self.step))

    def forward(self, x_TD, *, mask=None) -> Routing:
        self.check_input(x_TD, mask)
        logits_TE = F.linear(router_float(x_TD), router_float(self.weight))
        probs_TE = torch.softmax(logits_TE, dim=-1)
        step = int(self.step)
        if self.schedule.finished(step):
            top_TK, ids_TK = topk_stable(probs_TE, self.top_k)
            gates_TE = torch.zeros_like(probs_TE).scatter(1, ids_TK, top_TK / top_TK.sum(-1, keepdim=True))
            selected_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter(1, ids_TK, True)
        else:
            noisy_TE = logits_TE
            if self.training:
                u = torch.rand_like(logits_TE).clamp(1e-10, 1 - 1e-10)
                noisy_TE = logits_TE - torch.log(-torch.log(u))
            soft_TE = torch.softmax(noisy_TE / self.schedule(step), dim=-1)
            # The top-k (an order that τ does not change) always stays, so the count shrinks
            # towards exactly K and the hand-over to plain top-k never adds experts.
            _, ids_TK = topk_stable(noisy_TE.detach(), self.top_k)
            selected_TE = (soft_TE >= self.threshold).scatter(1, ids_TK, True)
            kept_TE = soft_TE * selected_TE
            gates_TE = kept_TE / kept_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.training:
            self.step += 1
        token_ids, expert_ids, weights = pairs_from_selection(selected_TE, gates_TE, mask)
        return Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights, logits=logits_TE,
                       dropped=no_drops(x_TD.device), num_experts=self.num_experts, probs=probs_TE,
                       extras={"temperature": torch.tensor(self.schedule(step))})

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"schedule={self.schedule}, threshold={self.threshold}")


# ---------------------------------------------------------------------------------------------
# T5: StableMoE two-stage routing
# ---------------------------------------------------------------------------------------------

class StableMoERouter(Router):
    """StableMoE (METHODS.md T5): top-1 routing by expert centroids, distilled into a token-id router.

    Scores ``s_{t,e} = x_t · w_e``; the gate of the chosen expert is ``σ(s_{t,a(t)})`` in both
    stages, so the expert output still sends gradient to x and w.

    - Stage 1 (``stage == 1``): ``a(t) = argmax_e s_{t,e}``; the light router
      ``emb(token_id) W_dᵀ`` learns that assignment by cross-entropy, added as
      ``routing.aux_losses["distill"]`` (× ``distill_coef``). The Switch balance loss applies.
    - Stage 2 (after `freeze`): ``a(t) = argmax`` of the frozen light router, a function of
      the token id alone, so each token id keeps one expert for the rest of training.

    Needs ``token_ids``. ``top_k`` is not used (one expert per token); an explicit ``top_k`` other than 1 is refused.
    """

    default_balance_loss = "switch"

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None, *, vocab_size: Optional[int] = None,
                 d_distill: int = 16, distill_coef: float = 1.0):
        check_no_top_k("stable_moe", top_k, 1)
        super().__init__(d_model, num_experts, None)
        if vocab_size is None:
            raise ValueError("router 'stable_moe' needs vocab_size (the number of token ids it distils routing "
                             "for): pass it through router_kwargs, e.g. MoE(router='stable_moe', "
                             "router_kwargs={'vocab_size': V})")
        check_int("vocab_size", vocab_size, min=1)
        check_int("d_distill", d_distill, min=1)
        check_number("distill_coef", distill_coef, min=0)
        self.vocab_size, self.distill_coef = vocab_size, float(distill_coef)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))          # centroids w_e
        init_router_weight(self.weight.data)
        self.distill_embed = nn.Embedding(vocab_size, d_distill)
        self.distill_proj = nn.Linear(d_distill, num_experts, bias=False)
        self.register_buffer("stage_buf", torch.ones((), dtype=torch.long))

    @property
    def stage(self) -> int:
        return int(self.stage_buf)

    def distilled_logits(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        return self.distill_proj(self.distill_embed(token_ids_T)).float()

    def freeze(self) -> None:
        """Enter stage 2: the light router is frozen and decides every assignment."""
        self.stage_buf.fill_(2)
        for p in (*self.distill_embed.parameters(), *self.distill_proj.parameters()):
            p.requires_grad_(False)

    def forward(self, x_TD, *, mask=None, token_ids=None) -> Routing:
        self.check_input(x_TD, mask)
        T = x_TD.shape[0]
        ids = check_token_input("token_ids", token_ids, T, self.vocab_size).to(x_TD.device)
        logits_TE = F.linear(router_float(x_TD), router_float(self.weight))
        distilled_TE = self.distilled_logits(ids)
        aux = {}
        if self.stage == 1:
            expert_T = logits_TE.detach().argmax(-1)
            if self.training and self.distill_coef > 0:
                ce_T = F.cross_entropy(distilled_TE, expert_T, reduction="none")
                ce = ce_T.mean() if mask is None else (ce_T * mask).sum() / mask.sum().clamp_min(1)
                aux["distill"] = self.distill_coef * ce
        else:
            expert_T = distilled_TE.detach().argmax(-1)
        token_T = torch.arange(T, device=x_TD.device)
        topk_ids_T1 = expert_T.unsqueeze(-1)
        if mask is not None:
            token_T, expert_T = token_T[mask], expert_T[mask]
        weights = torch.sigmoid(logits_TE[token_T, expert_T])
        return Routing(token_ids=token_T, expert_ids=expert_T, weights=weights, logits=logits_TE,
                       dropped=no_drops(x_TD.device), num_experts=self.num_experts,
                       probs=torch.softmax(logits_TE, -1), topk_ids=topk_ids_T1, aux_losses=aux)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, vocab_size={self.vocab_size}, "
                f"stage={self.stage}")


# ---------------------------------------------------------------------------------------------
# T8: fine-tuning regularisers
# ---------------------------------------------------------------------------------------------

class RoutingDropout(Router):
    """Wrap a router; in training drop whole tokens and/or single (token, expert) pairs.

    - ``token_rate``: expert-output masking (NLLB-200 MoE): a random fraction of tokens loses
      all its pairs, so its MoE output is exactly 0 and the residual stream carries it.
    - ``pair_rate``: expert dropout: each kept pair is dropped independently.

    Kept weights are not rescaled (as in EOM). Eval is the inner router unchanged. The
    wrapper forwards per-token inputs (``token_ids`` …) to the inner router; masked tokens are
    reported in ``routing.extras["masked_tokens"]`` and are not counted in ``dropped``.
    """

    def __init__(self, router: Router, *, token_rate: float = 0.1, pair_rate: float = 0.0):
        if not isinstance(router, Router):
            raise TypeError(f"router must be a moekit Router, got {type(router).__name__}")
        super().__init__(router.d_model, router.num_experts, router.top_k)
        for name, v in (("token_rate", token_rate), ("pair_rate", pair_rate)):
            check_number(name, v, min=0, max=1, max_open=True)
        self.inner, self.token_rate, self.pair_rate = router, float(token_rate), float(pair_rate)
        self.default_balance_loss = router.default_balance_loss
        self.causal_safe = router.causal_safe

    # Sync-free routing is the inner router's (the wrapper itself never syncs).
    @property
    def supports_sync_free(self) -> bool:
        return getattr(self.inner, "supports_sync_free", False)

    @property
    def sync_free(self) -> bool:
        return getattr(self.inner, "sync_free", False)

    @sync_free.setter
    def sync_free(self, value: bool) -> None:
        self.inner.sync_free = value

    def forward(self, x_TD, *, mask=None, **router_inputs) -> Routing:
        routing = self.inner(x_TD, mask=mask, **router_inputs)
        if not self.training or (self.token_rate == 0 and self.pair_rate == 0):
            return routing
        T = x_TD.shape[0]
        masked_T = torch.rand(T, device=x_TD.device) < self.token_rate
        keep_N = ~masked_T[routing.token_ids]
        if self.pair_rate > 0:
            keep_N &= torch.rand(keep_N.shape, device=x_TD.device) >= self.pair_rate
        routing.extras["masked_tokens"] = masked_T
        if routing.keep is not None or self.sync_free:
            # Static layout: mark the dropped-out pairs instead of removing them.
            keep_N = keep_N if routing.keep is None else keep_N & routing.keep
            routing.keep = keep_N
            routing.weights = torch.where(keep_N, routing.weights, torch.zeros_like(routing.weights))
            return routing
        routing.token_ids = routing.token_ids[keep_N]
        routing.expert_ids = routing.expert_ids[keep_N]
        routing.weights = routing.weights[keep_N]
        routing.slots_per_token = None          # pairs are no longer every token × K slots
        return routing

    def extra_repr(self) -> str:
        return f"token_rate={self.token_rate}, pair_rate={self.pair_rate}"


def freeze_moe_parameters(model: nn.Module, *, experts: bool = True, routers: bool = True,
                          requires_grad: bool = False) -> int:
    """Set ``requires_grad`` on the routed experts and/or routers of every MoE layer in `model`.

    Other parameters (attention, embeddings, shared experts) are left as they are. Returns the
    number of parameter tensors changed.
    """
    n = 0
    # An MoE layer here is any module holding a moekit `Router` (routing sits below layers).
    for layer in (m for m in model.modules() if isinstance(getattr(m, "router", None), Router)):
        parts = ([layer.experts] if experts and hasattr(layer, "experts") else []) + (
            [layer.router] if routers and hasattr(layer, "router") else [])
        for part in parts:
            for p in part.parameters():
                p.requires_grad_(requires_grad)
                n += 1
    return n
