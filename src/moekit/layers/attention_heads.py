"""Attention heads as experts: Mixture of Attention heads (MoA) — METHODS.md X4.

Zhang, Shen, Meng, Zhou, Zhang & Xiong (2022), EMNLP, "Mixture of Attention Heads: Selecting
Attention Heads Per Token".

Legend: B batch, S query positions, T key positions (= S), D model dim, E head experts,
K heads per token, h head dim.

Keys and values are one shared projection each (``k = x W_k``, ``v = x W_v``, (B, T, h)); every
expert e owns a query projection ``W_q^e`` (h, D) and an output projection ``W_o^e`` (D, h). A
router picks K heads per token from ``p = softmax(x W_r)``, the gates are the renormalised top-k
probabilities, and

    y_s = Σ_{e ∈ topK(s)} g_{s,e} · W_o^e · Σ_t softmax_t(q^e_s · k_t / √h) v_t ,  q^e_s = W_q^e x_s

With K = E and uniform gates the layer is multi-query attention (shared K/V) with E heads whose
outputs are averaged (the sum of standard multi-head attention scaled by 1/E).

Cost: queries are projected for all E heads (``E·h·D`` per token, like a standard E-head
attention), but attention scores and values are computed only for the K selected heads of each
token, which is where attention's cost over the sequence lies. The balancing loss is Switch's
``E Σ f P`` (MoA uses a load-balancing loss) plus an optional router z-loss, exposed as
``aux_loss`` so `moekit.aux_loss(model)` collects it.

Task-conditioned heads (Mod-Squad, Chen et al. 2023, CVPR — METHODS.md MT4): with ``num_tasks=M``
the router is one gate per task (`moekit.routing.TaskTokenRouter`'s logits, ``p = softmax(W_t x)``
for a token of task t) and ``forward`` takes ``task_ids``; ``mi_loss_coef`` adds Mod-Squad's
``−coef · I(T; E)`` over the batch to ``aux_loss``. `subset` keeps some head experts (and tasks)
for an extracted sub-model; under the renormalised gates a token whose K heads are all kept gets
the same output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.base import uniform_init_
from moekit.layers.protocol import LayerStats, MoELayer
from moekit.losses import load_balancing_loss, mutual_information_loss, z_loss
from moekit.ops.topk import topk_stable
from moekit.routing.pairs import check_token_input
from moekit.routing.task_token import TaskTokenRouter
from moekit.validate import check_bool, check_int, check_number

__all__ = ["MixtureOfAttentionHeads"]


@dataclass
class AttentionHeadStats(LayerStats):
    """tokens_per_expert: (E,) (unmasked) tokens routed to each head expert; topk_ids: (B, S, K)."""

    tokens_per_expert: torch.Tensor
    topk_ids: torch.Tensor


class MixtureOfAttentionHeads(MoELayer):
    """``(B, S, D) → (B, S, D)`` attention whose heads are routed experts.

    Args:
        d_model: D.
        num_experts: E head experts.
        top_k: K heads per token.
        head_dim: h (default ``D // K`` so K active heads have D channels, as in MoA).
        causal: mask future keys (decoder use).
        aux_loss_coef: weight of the Switch balancing loss.
        z_loss_coef: weight of the router z-loss.
        num_tasks: None (one router), or M: one router per task, and ``forward`` needs ``task_ids``.
        mi_loss_coef: weight of the task–head mutual-information loss (needs num_tasks).
    """

    def __init__(self, *, d_model: int, num_experts: int, top_k: int = 2, head_dim: Optional[int] = None,
                 causal: bool = False, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0,
                 num_tasks: Optional[int] = None, mi_loss_coef: float = 0.0):
        super().__init__()
        for name, v in (("d_model", d_model), ("num_experts", num_experts), ("top_k", top_k)):
            check_int(name, v, min=1)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got top_k={top_k}")
        head_dim = max(1, d_model // top_k) if head_dim is None else head_dim
        check_int("head_dim", head_dim, min=1)
        for name, v in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef),
                        ("mi_loss_coef", mi_loss_coef)):
            check_number(name, v, min=0)
        check_int("num_tasks", num_tasks, min=1, allow_none=True)
        if mi_loss_coef > 0 and num_tasks is None:
            raise ValueError(f"mi_loss_coef={mi_loss_coef} needs num_tasks (the loss is between tasks and heads)")
        self.num_tasks, self.mi_loss_coef = num_tasks, float(mi_loss_coef)
        check_bool("causal", causal)
        self.d_model, self.num_experts, self.top_k, self.head_dim = d_model, num_experts, top_k, head_dim
        self.causal = bool(causal)
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.k_proj = nn.Linear(d_model, head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, head_dim, bias=False)
        self.q_proj = nn.Parameter(uniform_init_(torch.empty(num_experts, head_dim, d_model)))   # (E, h, D)
        self.o_proj = nn.Parameter(uniform_init_(torch.empty(num_experts, d_model, head_dim)))   # (E, D, h)
        if num_tasks is None:
            self.router = nn.Linear(d_model, num_experts, bias=False)
            std = math.sqrt(0.1 / d_model)           # Switch router init
            nn.init.trunc_normal_(self.router.weight, std=std, a=-2 * std, b=2 * std)
        else:
            self.router = TaskTokenRouter(d_model, num_experts, top_k, num_tasks=num_tasks)

    def route(self, x_BSD: torch.Tensor, task_ids_BS: Optional[torch.Tensor] = None):
        """``(logits_BSE float32, topk_ids_BSK, gates_BSK)`` with gates renormalised to sum to 1."""
        if self.num_tasks is None:
            logits = F.linear(x_BSD.float(), self.router.weight.float())
        else:
            B, S, D = x_BSD.shape
            logits = self.router.task_logits(x_BSD.reshape(B * S, D), task_ids_BS.reshape(-1)).view(B, S, -1)
        probs = torch.softmax(logits, -1)
        vals, ids = topk_stable(probs, self.top_k)
        return logits, ids, vals / vals.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask`` (B, S) bool, False = padding (never attended to, not in the losses);
        ``task_ids`` (B, S) or (B,) int, the task of each token (only with ``num_tasks``)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x)}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, S, {self.d_model}), got {tuple(x.shape)}")
        B, S, D = x.shape
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (B, S)):
            raise ValueError(f"mask must be a bool tensor of shape ({B}, {S}), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        E, K, h = self.num_experts, self.top_k, self.head_dim
        task_BS = None
        if self.num_tasks is None:
            if task_ids is not None:
                raise ValueError("task_ids given to a MixtureOfAttentionHeads built without num_tasks")
        else:
            if isinstance(task_ids, torch.Tensor) and task_ids.shape == (B,):
                task_ids = task_ids[:, None].expand(B, S)
            if isinstance(task_ids, torch.Tensor) and task_ids.shape not in ((B, S),):
                raise ValueError(f"task_ids must have shape ({B}, {S}) or ({B},), got {tuple(task_ids.shape)}")
            task_BS = check_token_input("task_ids", None if task_ids is None else task_ids.reshape(-1), B * S,
                                        self.num_tasks).to(x.device).long().view(B, S)
        logits_BSE, ids_BSK, gates_BSK = self.route(x, task_BS)

        k_BTh, v_BTh = self.k_proj(x), self.v_proj(x)
        q_BSEh = torch.einsum("bsd,ehd->bseh", x, self.q_proj.to(x.dtype))
        q_BSKh = q_BSEh.gather(2, ids_BSK[..., None].expand(B, S, K, h))          # selected heads only
        scores_BSKT = torch.einsum("bskh,bth->bskt", q_BSKh, k_BTh).float() / math.sqrt(h)
        allowed_ST = None
        if self.causal:
            allowed_ST = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        if mask is not None:
            kp = mask[:, None, :]                                          # (B, 1, T)
            allowed_ST = kp if allowed_ST is None else allowed_ST & kp
        if allowed_ST is not None:
            allowed = allowed_ST if allowed_ST.dim() == 3 else allowed_ST[None]
            scores_BSKT = scores_BSKT.masked_fill(~allowed[:, :, None, :], float("-inf"))
        attn_BSKT = torch.softmax(scores_BSKT, -1).nan_to_num(0.0).to(x.dtype)     # all-masked rows → 0
        o_BSKh = torch.einsum("bskt,bth->bskh", attn_BSKT, v_BTh)
        # Gate-weighted head outputs scattered to their experts, then one output projection.
        o_BSEh = torch.zeros(B, S, E, h, dtype=x.dtype, device=x.device)
        o_BSEh = o_BSEh.scatter_add(2, ids_BSK[..., None].expand(B, S, K, h), gates_BSK.to(x.dtype)[..., None] * o_BSKh)
        y = torch.einsum("bseh,edh->bsd", o_BSEh, self.o_proj.to(x.dtype))

        mask_T = None if mask is None else mask.reshape(-1)
        probs_TE = torch.softmax(logits_BSE.reshape(-1, E), -1)
        ids_TK = ids_BSK.reshape(-1, K) if mask_T is None else ids_BSK.reshape(-1, K)[mask_T]
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=E)
        total = torch.zeros((), device=x.device)
        if self.aux_loss_coef > 0:
            total = total + self.aux_loss_coef * load_balancing_loss(probs_TE, counts_E, K, mask=mask_T)
        if self.z_loss_coef > 0:
            total = total + self.z_loss_coef * z_loss(logits_BSE.reshape(-1, E), mask=mask_T)
        if self.mi_loss_coef > 0:
            total = total + mutual_information_loss(probs_TE, task_BS.reshape(-1), num_tasks=self.num_tasks,
                                                    mask=mask_T, weight=self.mi_loss_coef)
        self.aux_loss = total
        self.last_stats = AttentionHeadStats(tokens_per_expert=counts_E.detach(), topk_ids=ids_BSK.detach())
        return y

    @torch.no_grad()
    def subset(self, experts: Sequence[int], tasks: Optional[Sequence[int]] = None) -> "MixtureOfAttentionHeads":
        """A new layer with head experts `experts` (in that order) and, for a task-conditioned
        layer, the routers of `tasks` (renumbered 0, 1, …); K becomes ``min(K, len(experts))``."""
        E = self.num_experts
        experts = [check_int(f"experts[{j}]", e, min=0, max=E - 1) for j, e in enumerate(experts)]
        if not experts or len(set(experts)) != len(experts):
            raise ValueError(f"experts must be a non-empty list of distinct head ids, got {experts}")
        if tasks is not None and self.num_tasks is None:
            raise ValueError("tasks only apply to a MixtureOfAttentionHeads built with num_tasks")
        idx = torch.tensor(experts, device=self.q_proj.device)
        n_tasks = None if self.num_tasks is None else (self.num_tasks if tasks is None else len(tasks))
        out = MixtureOfAttentionHeads(d_model=self.d_model, num_experts=len(experts),
                                      top_k=min(self.top_k, len(experts)), head_dim=self.head_dim, causal=self.causal,
                                      aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef,
                                      num_tasks=n_tasks, mi_loss_coef=self.mi_loss_coef).to(self.q_proj)
        out.k_proj.load_state_dict(self.k_proj.state_dict())
        out.v_proj.load_state_dict(self.v_proj.state_dict())
        out.q_proj.data.copy_(self.q_proj[idx])
        out.o_proj.data.copy_(self.o_proj[idx])
        if self.num_tasks is None:
            out.router.weight.data.copy_(self.router.weight[idx])
        else:
            out.router = self.router.subset(experts, tasks)
            out.router.top_k = out.top_k
        return out

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"head_dim={self.head_dim}, causal={self.causal}, num_tasks={self.num_tasks}")
