"""The shared actor-critic network and its torsos (dense, top-k MoE, Soft MoE, the multi-task
torsos: learned and hard task routing, MOORE, CARE); the dense twin.

Legend: T rollout steps, B parallel environments, N samples, O observation features, A actions,
L tasks, D torso width, F expert hidden dim, E experts, K experts per sample, M tokens per sample.
See `moekit.models.rl` for the method and the references.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import nn

from moekit.experts import MLPExperts
from moekit.layers.config import MoEConfig
from moekit.layers.soft_moe import SoftMoE
from moekit.models.rl.multitask import ContextMixtureEncoders, OrthogonalExperts, hard_task_moe, hashed_bag_of_words
from moekit.models.transformer import experts_per_token
from moekit.validate import check_choice, check_instance, check_int

__all__ = ["TORSOS", "ActorCriticConfig", "ActorCritic", "actor_critic_dense_twin"]

TORSOS = ("dense", "moe", "soft_moe", "task_moe", "hard_task_moe", "moore", "care")
# Torsos whose task conditioning is the mixture itself (no task embedding added to the input).
_ENCODER_MIXTURES = ("moore", "care")


@dataclass(frozen=True)
class ActorCriticConfig:
    """Torso of the shared actor-critic network (see the module docstring for the kinds).

    d_hidden: F of the dense torso's MLP and of each expert (unless ``moe.d_hidden`` is set).
    moe: the top-k MoE torso's layer (`moekit.MoEConfig`, any router; a dict is accepted); the
        Soft MoE torso takes its ``num_experts``. Its ``expert`` / ``activation`` default to an MLP
        with this config's ``activation``.

    Multi-task torsos (METHODS.md RL3–RL5; `moekit.models.rl.multitask`), for ``num_tasks = L``:

    - ``"task_moe"``: the blocks' FFN is `moekit.MoE` with the learned task router (``router="task"``,
      Task-MoE: ``g = TopK(softmax(W·emb(task)))``, top-``moe.top_k``), called with the task ids.
    - ``"hard_task_moe"``: the blocks' FFN sends task t to expert t (`hard_task_moe`; needs
      ``moe.num_experts >= L``).
    - ``"moore"``: `OrthogonalExperts` (``moe.num_experts`` experts of width ``d_hidden``) on the
      input projection, then ``num_layers`` dense blocks (0 is allowed and is the paper's form).
    - ``"care"``: `ContextMixtureEncoders` over the task descriptions given to `build`
      (``task_metadata``, embedded by `hashed_bag_of_words` into ``metadata_dim``), then
      ``num_layers`` dense blocks.
    """

    torso: str = "moe"
    d_model: int = 64
    num_layers: int = 2
    d_hidden: int = 32
    moe: MoEConfig = MoEConfig(num_experts=8, top_k=2)
    num_tokens: int = 4
    slots_per_expert: int = 1
    activation: str = "relu"
    metadata_dim: int = 64

    def __post_init__(self):
        check_choice("torso", self.torso, TORSOS)
        for name in ("d_model", "d_hidden", "num_tokens", "slots_per_expert", "metadata_dim"):
            check_int(name, getattr(self, name), min=1)
        check_int("num_layers", self.num_layers, min=0 if self.torso in _ENCODER_MIXTURES else 1)
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        check_instance("moe", self.moe, MoEConfig, what="a moekit.MoEConfig or a dict of its fields")
        if self.torso in ("moe", "hard_task_moe"):
            self.block_moe.check(self.d_model)
        if self.torso == "moore" and self.moe.num_experts > self.d_model:
            raise ValueError(f"moore orthonormalises num_experts vectors of width d_model: need num_experts <= "
                             f"d_model={self.d_model}, got {self.moe.num_experts}")
        if self.torso == "soft_moe" and self.d_model % self.num_tokens:
            raise ValueError(f"soft_moe splits d_model={self.d_model} into num_tokens={self.num_tokens} "
                             f"equal chunks; d_model must be a multiple of num_tokens")

    @property
    def block_moe(self) -> MoEConfig:
        """`moe` as each torso block builds it (MLP experts of width ``d_hidden`` by default)."""
        m = self.moe
        return replace(m, expert=m.expert or "mlp", activation=m.activation or self.activation,
                       d_hidden=m.d_hidden if m.d_hidden is not None else self.d_hidden)

    def build(self, *, obs_dim: int, num_actions: int | Sequence[int], num_tasks: int = 1,
              task_metadata: Optional[Sequence[str]] = None) -> "ActorCritic":
        return ActorCritic(self, obs_dim=obs_dim, num_actions=num_actions, num_tasks=num_tasks,
                           task_metadata=task_metadata)


def actor_critic_dense_twin(config: ActorCriticConfig) -> ActorCriticConfig:
    """The dense torso with the same active FFN parameters and FLOPs per sample as `config`'s."""
    if config.torso == "dense":
        return config
    if config.torso in ("task_moe", "hard_task_moe", "moore", "care"):
        raise ValueError(f"actor_critic_dense_twin matches top-k MoE and Soft MoE torsos, got torso={config.torso!r}")
    if config.torso == "moe":
        block = config.block_moe
        k = experts_per_token(block.check(config.d_model))
        return replace(config, torso="dense", d_hidden=int(round(k * block.d_hidden)))
    slot_hidden = config.moe.num_experts * config.slots_per_expert * config.d_hidden
    if slot_hidden % config.num_tokens:
        raise ValueError(f"E·P·F = {slot_hidden} is not a multiple of num_tokens={config.num_tokens}; "
                         f"no dense width has the Soft MoE's FLOPs")
    return replace(config, torso="dense", d_hidden=slot_hidden // config.num_tokens)


class _TorsoBlock(nn.Module):
    """``x + FFN(LN(x))`` with a dense, top-k MoE (token- or task-routed) or Soft MoE FFN."""

    def __init__(self, config: ActorCriticConfig, num_tasks: int = 1):
        super().__init__()
        c = config
        self.kind = "dense" if c.torso in _ENCODER_MIXTURES else c.torso
        self.num_tokens = c.num_tokens
        self.norm = nn.LayerNorm(c.d_model)
        if self.kind == "dense":
            self.ffn = MLPExperts(1, c.d_model, c.d_hidden, activation=c.activation)
        elif c.torso == "moe":
            self.ffn = c.block_moe.build(c.d_model)
        elif c.torso == "task_moe":
            self.ffn = replace(c.block_moe, router="task", router_kwargs={
                **dict(c.block_moe.router_kwargs), "num_tasks": num_tasks}).build(c.d_model)
        elif c.torso == "hard_task_moe":
            self.ffn = hard_task_moe(c.block_moe, d_model=c.d_model, num_tasks=num_tasks)
        else:
            self.ffn = SoftMoE(d_model=c.d_model // c.num_tokens, num_experts=c.moe.num_experts,
                               slots_per_expert=c.slots_per_expert, d_hidden=c.d_hidden, expert="mlp",
                               activation=c.activation)

    def forward(self, x_BD: torch.Tensor, task_B: torch.Tensor) -> torch.Tensor:
        B, D = x_BD.shape
        h_BD = self.norm(x_BD)
        if self.kind == "dense":
            y_BD = self.ffn(h_BD, torch.full((1,), B, dtype=torch.long))
        elif self.kind == "moe":
            y_BD = self.ffn(h_BD)
        elif self.kind == "task_moe":
            y_BD = self.ffn(h_BD, task_ids=task_B)
        elif self.kind == "hard_task_moe":
            y_BD = self.ffn(h_BD, token_ids=task_B)
        else:
            y_BD = self.ffn(h_BD.reshape(B, self.num_tokens, D // self.num_tokens)).reshape(B, D)
        return x_BD + y_BD


class ActorCritic(nn.Module):
    """``(obs_BO, task_B) → (logits_BA, value_B)`` with a shared dense / MoE / Soft MoE torso.

    Multi-task (``num_tasks = L > 1``): a task embedding is added to the input projection (not
    for ``"moore"`` / ``"care"``, whose mixture is conditioned on the task), each task has its own
    value output, and ``num_actions`` may list each task's action count; the logits of actions a
    task lacks are set to the dtype's minimum (probability 0). ``task_metadata``: one text
    description per task, required by the ``"care"`` torso (and used by it only).
    """

    def __init__(self, config: ActorCriticConfig, *, obs_dim: int, num_actions: int | Sequence[int],
                 num_tasks: int = 1, task_metadata: Optional[Sequence[str]] = None):
        super().__init__()
        counts = [num_actions] * num_tasks if isinstance(num_actions, int) else list(num_actions)
        if len(counts) != num_tasks or min(counts, default=0) < 1 or obs_dim < 1:
            raise ValueError(f"need obs_dim >= 1 and num_actions: one positive int (or one per task, "
                             f"{num_tasks} tasks); got obs_dim={obs_dim}, num_actions={num_actions!r}")
        self.config, self.obs_dim, self.num_tasks = config, obs_dim, num_tasks
        D = config.d_model
        self.embed = nn.Linear(obs_dim, D)
        mixture = config.torso in _ENCODER_MIXTURES
        self.task_embed = nn.Embedding(num_tasks, D) if num_tasks > 1 and not mixture else None
        self.encoder = None
        if config.torso == "care":
            if task_metadata is None or len(task_metadata) != num_tasks:
                raise ValueError(f"the care torso needs task_metadata: one description (str) per task "
                                 f"({num_tasks}), got {task_metadata!r}")
            self.encoder = ContextMixtureEncoders(
                d_model=D, num_experts=config.moe.num_experts, d_hidden=config.d_hidden,
                metadata_LW=hashed_bag_of_words(task_metadata, config.metadata_dim), activation=config.activation)
        elif config.torso == "moore":
            self.encoder = OrthogonalExperts(d_model=D, num_experts=config.moe.num_experts, num_tasks=num_tasks,
                                             d_hidden=config.d_hidden, activation=config.activation)
        self.blocks = nn.ModuleList(_TorsoBlock(config, num_tasks) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(D)
        self.policy_head = nn.Linear(D, max(counts))
        self.value_head = nn.Linear(D, num_tasks)
        mask_LA = torch.arange(max(counts))[None, :] < torch.tensor(counts)[:, None]
        self.register_buffer("action_mask_LA", mask_LA, persistent=False)
        # Near-uniform initial policy and unit-scale values (Huang et al. 2022, detail 2).
        nn.init.orthogonal_(self.policy_head.weight, gain=0.01)
        nn.init.zeros_(self.policy_head.bias)
        nn.init.orthogonal_(self.value_head.weight, gain=1.0)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, obs_BO: torch.Tensor, task_B: Optional[torch.Tensor] = None):
        if obs_BO.dim() != 2 or obs_BO.shape[1] != self.obs_dim:
            raise ValueError(f"obs must have shape (B, {self.obs_dim}), got {tuple(obs_BO.shape)}")
        if task_B is None:
            if self.num_tasks > 1:
                raise ValueError(f"this network serves {self.num_tasks} tasks; pass task ids of shape (B,)")
            task_B = torch.zeros(obs_BO.shape[0], dtype=torch.long, device=obs_BO.device)
        x_BD = self.embed(obs_BO)
        if self.task_embed is not None:
            x_BD = x_BD + self.task_embed(task_B)
        if self.encoder is not None:
            x_BD = self.encoder(x_BD, task_B)
        for block in self.blocks:
            x_BD = block(x_BD, task_B)
        h_BD = self.norm(x_BD)
        logits_BA = self.policy_head(h_BD)
        logits_BA = logits_BA.masked_fill(~self.action_mask_LA[task_B], torch.finfo(logits_BA.dtype).min)
        value_B = self.value_head(h_BD).gather(1, task_B[:, None]).squeeze(1)
        return logits_BA, value_B
