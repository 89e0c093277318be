"""PPO actor-critic agents with Mixture-of-Experts torsos (METHODS.md §10, RL1 and RL5).

Legend: T rollout steps, B parallel environments, N = T·B samples (valid ones only after
`flatten_valid`), O observation features, A actions, L tasks, D torso width, F expert hidden
dim, E experts, K experts per sample, M tokens per sample (Soft MoE).

The algorithm is PPO with the clipped surrogate objective (Schulman, Wolski, Dhariwal, Radford
& Klimov 2017, arXiv:1707.06347) and generalised advantage estimation (GAE; Schulman, Moritz,
Levine, Jordan & Abbeel, ICLR 2016), with the usual implementation choices listed by Huang et
al. (2022, "The 37 Implementation Details of PPO"): per-batch advantage normalisation, an
entropy bonus, global gradient clipping, no value clipping. Actor and critic share one torso,
as in the Atari PPO agents of Willi et al. (2024, "Mixture of Experts in a Mixture of RL
settings"), where MoE layers replace the dense ones; Obando-Ceron et al. (ICML 2024, "Mixtures
of Experts Unlock Parameter Scaling for Deep RL") use Soft MoE there. Torsos:

- ``"dense"``: ``x + FFN(LN(x))`` residual blocks; the FFN is a one-expert `MLPExperts` bank,
  the very module an expert is, so the dense twin differs from the MoE only by routing.
- ``"moe"``: the FFN is `moekit.MoE` (top-k router, one token per sample); its balancing loss
  is added to the PPO loss.
- ``"soft_moe"``: `moekit.layers.SoftMoE` over M tokens obtained by splitting the D-vector into
  M chunks of D/M (a per-feature-group tokenisation; a sample's tokens never mix with other
  samples, so each state's action distribution depends on that state alone).

`actor_critic_dense_twin` gives the dense torso whose FFN has the MoE's *active* parameters
and FLOPs per sample (K·F hidden units; for Soft MoE the E·P slot evaluations of D/M-wide
experts, i.e. E·P·F/M hidden units).

Environments follow the gymnasium ≥ 1.0 vector API with its default *next-step* autoreset:
after ``terminated | truncated`` the returned observation is the final one, and the next
``step`` resets that environment (ignoring its action) and returns reward 0. So the value of
the stored next row is the truncation bootstrap, and reset rows are marked invalid and left
out of the loss. `CartPoleVecEnv` (Barto, Sutton & Anderson 1983, gymnasium's constants) and
`ReachVecEnv` are pure-numpy environments with that API for tests; `make_gym_vec_env` builds
gymnasium's (optional extra ``moekit[rl]``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import MLPExperts
from moekit.layers.moe import MoE, aux_loss, moe_layers
from moekit.layers.soft_moe import SoftMoE

__all__ = ["TORSOS", "ActorCriticConfig", "ActorCritic", "actor_critic_dense_twin", "gae_advantages",
           "clipped_policy_loss", "Rollout", "RolloutCollector", "PPOConfig", "ppo_update", "RLTrainResult",
           "train_ppo", "expert_usage", "CartPoleVecEnv", "ReachVecEnv", "MultiTaskVecEnv", "make_gym_vec_env"]

TORSOS = ("dense", "moe", "soft_moe")


# ---------------------------------------------------------------------------------------------
# Network
@dataclass(frozen=True)
class ActorCriticConfig:
    """Torso of the shared actor-critic network (see the module docstring for the kinds)."""

    torso: str = "moe"
    d_model: int = 64
    num_layers: int = 2
    d_hidden: int = 32
    num_experts: int = 8
    top_k: int = 2
    num_tokens: int = 4
    slots_per_expert: int = 1
    activation: str = "relu"
    aux_loss_coef: float = 0.01

    def __post_init__(self):
        if self.torso not in TORSOS:
            raise ValueError(f"torso must be one of {TORSOS}, got {self.torso!r}")
        for name in ("d_model", "num_layers", "d_hidden", "num_experts", "top_k", "num_tokens", "slots_per_expert"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.torso == "moe" and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.torso == "soft_moe" and self.d_model % self.num_tokens:
            raise ValueError(f"soft_moe splits d_model={self.d_model} into num_tokens={self.num_tokens} "
                             f"equal chunks; d_model must be a multiple of num_tokens")

    def build(self, *, obs_dim: int, num_actions: int | Sequence[int], num_tasks: int = 1) -> "ActorCritic":
        return ActorCritic(self, obs_dim=obs_dim, num_actions=num_actions, num_tasks=num_tasks)


def actor_critic_dense_twin(config: ActorCriticConfig) -> ActorCriticConfig:
    """The dense torso with the same active FFN parameters and FLOPs per sample as `config`'s."""
    if config.torso == "dense":
        return config
    if config.torso == "moe":
        return replace(config, torso="dense", d_hidden=config.top_k * config.d_hidden)
    slot_hidden = config.num_experts * config.slots_per_expert * config.d_hidden
    if slot_hidden % config.num_tokens:
        raise ValueError(f"E·P·F = {slot_hidden} is not a multiple of num_tokens={config.num_tokens}; "
                         f"no dense width has the Soft MoE's FLOPs")
    return replace(config, torso="dense", d_hidden=slot_hidden // config.num_tokens)


class _TorsoBlock(nn.Module):
    """``x + FFN(LN(x))`` with a dense, top-k MoE or Soft MoE FFN."""

    def __init__(self, config: ActorCriticConfig):
        super().__init__()
        c = config
        self.kind, self.num_tokens = c.torso, c.num_tokens
        self.norm = nn.LayerNorm(c.d_model)
        if c.torso == "dense":
            self.ffn = MLPExperts(1, c.d_model, c.d_hidden, activation=c.activation)
        elif c.torso == "moe":
            self.ffn = MoE(d_model=c.d_model, num_experts=c.num_experts, top_k=c.top_k, d_hidden=c.d_hidden,
                           router="topk", expert="mlp", activation=c.activation, aux_loss_coef=c.aux_loss_coef)
        else:
            self.ffn = SoftMoE(c.d_model // c.num_tokens, c.num_experts, c.slots_per_expert, d_hidden=c.d_hidden,
                               expert="mlp", activation=c.activation)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        B, D = x_BD.shape
        h_BD = self.norm(x_BD)
        if self.kind == "dense":
            y_BD = self.ffn(h_BD, torch.full((1,), B, dtype=torch.long))
        elif self.kind == "moe":
            y_BD = self.ffn(h_BD)
        else:
            y_BD = self.ffn(h_BD.reshape(B, self.num_tokens, D // self.num_tokens)).reshape(B, D)
        return x_BD + y_BD


class ActorCritic(nn.Module):
    """``(obs_BO, task_B) → (logits_BA, value_B)`` with a shared dense / MoE / Soft MoE torso.

    Multi-task (``num_tasks = L > 1``): a task embedding is added to the input projection, each
    task has its own value output, and ``num_actions`` may list each task's action count; the
    logits of actions a task lacks are set to the dtype's minimum (probability 0).
    """

    def __init__(self, config: ActorCriticConfig, *, obs_dim: int, num_actions: int | Sequence[int],
                 num_tasks: int = 1):
        super().__init__()
        counts = [num_actions] * num_tasks if isinstance(num_actions, int) else list(num_actions)
        if len(counts) != num_tasks or min(counts, default=0) < 1 or obs_dim < 1:
            raise ValueError(f"need obs_dim >= 1 and num_actions: one positive int (or one per task, "
                             f"{num_tasks} tasks); got obs_dim={obs_dim}, num_actions={num_actions!r}")
        self.config, self.obs_dim, self.num_tasks = config, obs_dim, num_tasks
        D = config.d_model
        self.embed = nn.Linear(obs_dim, D)
        self.task_embed = nn.Embedding(num_tasks, D) if num_tasks > 1 else None
        self.blocks = nn.ModuleList(_TorsoBlock(config) for _ in range(config.num_layers))
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
        for block in self.blocks:
            x_BD = block(x_BD)
        h_BD = self.norm(x_BD)
        logits_BA = self.policy_head(h_BD)
        logits_BA = logits_BA.masked_fill(~self.action_mask_LA[task_B], torch.finfo(logits_BA.dtype).min)
        value_B = self.value_head(h_BD).gather(1, task_B[:, None]).squeeze(1)
        return logits_BA, value_B


# ---------------------------------------------------------------------------------------------
# PPO maths
def gae_advantages(*, rewards_TB: torch.Tensor, values_TB: torch.Tensor, last_value_B: torch.Tensor,
                   terminated_TB: torch.Tensor, truncated_TB: torch.Tensor, gamma: float, lam: float):
    """GAE(γ, λ) (Schulman et al. 2016, eq. 16) under next-step autoreset → ``(advantages_TB, returns_TB)``.

    ``δ_t = r_t + γ·V_{t+1}·(1 − terminated_t) − V_t`` and ``A_t = δ_t + γλ·(1 − done_t)·A_{t+1}``,
    where ``V_{t+1}`` is row t+1's value (``last_value_B`` after the last row) — the value of
    the final observation when episode t was truncated, hence the bootstrap — and
    ``done = terminated | truncated`` cuts the trace. Returns are ``A + V`` (the λ-return).
    """
    if not (rewards_TB.shape == values_TB.shape == terminated_TB.shape == truncated_TB.shape) or \
            last_value_B.shape != rewards_TB.shape[1:]:
        raise ValueError(f"need rewards, values, terminated, truncated all (T, B) and last_value (B,); got "
                         f"{[tuple(t.shape) for t in (rewards_TB, values_TB, terminated_TB, truncated_TB, last_value_B)]}")
    next_values_TB = torch.cat([values_TB[1:], last_value_B[None]])
    delta_TB = rewards_TB + gamma * next_values_TB * (~terminated_TB) - values_TB
    cont_TB = (~(terminated_TB | truncated_TB)).to(values_TB.dtype)
    adv_TB = torch.empty_like(values_TB)
    running_B = torch.zeros_like(last_value_B)
    for t in range(rewards_TB.shape[0] - 1, -1, -1):
        running_B = delta_TB[t] + gamma * lam * cont_TB[t] * running_B
        adv_TB[t] = running_B
    return adv_TB, adv_TB + values_TB


def clipped_policy_loss(*, logp_new_N: torch.Tensor, logp_old_N: torch.Tensor, adv_N: torch.Tensor,
                        clip_eps: float) -> torch.Tensor:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated for minimisation.

    ``−mean_n min(ρ_n A_n, clip(ρ_n, 1 − ε, 1 + ε) A_n)`` with ``ρ = exp(logp_new − logp_old)``.
    """
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps!r}")
    ratio_N = (logp_new_N - logp_old_N).exp()
    return -torch.min(ratio_N * adv_N, ratio_N.clamp(1 - clip_eps, 1 + clip_eps) * adv_N).mean()


# ---------------------------------------------------------------------------------------------
# Rollouts
@dataclass
class Rollout:
    """T steps of B environments. ``valid_TB`` is False on next-step reset rows (action ignored)."""

    obs_TBO: torch.Tensor
    task_TB: torch.Tensor
    actions_TB: torch.Tensor
    logp_TB: torch.Tensor
    values_TB: torch.Tensor
    rewards_TB: torch.Tensor
    terminated_TB: torch.Tensor
    truncated_TB: torch.Tensor
    valid_TB: torch.Tensor
    last_value_B: torch.Tensor


class RolloutCollector:
    """Steps a gymnasium-style vector env (next-step autoreset) with an agent's sampled actions.

    Keeps the env's current observations between calls and the returns of finished episodes
    in ``episodes`` as ``(env steps so far, task, return)``. Task ids come from the env's
    ``task_ids`` attribute (one per sub-environment) when it has one, else 0.
    """

    def __init__(self, envs, *, seed: Optional[int] = None):
        mode = getattr(envs, "metadata", {}).get("autoreset_mode")
        if mode is not None and str(getattr(mode, "value", mode)).lower().replace("_", "").replace("-", "") != "nextstep":
            raise ValueError(f"RolloutCollector needs next-step autoreset (gymnasium's default), got {mode!r}")
        self.envs = envs
        obs, _ = envs.reset(seed=seed)
        self.obs_BO = np.asarray(obs, dtype=np.float32)
        B = self.obs_BO.shape[0]
        self.task_B = torch.as_tensor(np.asarray(getattr(envs, "task_ids", np.zeros(B)), dtype=np.int64))
        self.prev_done_B = np.zeros(B, dtype=bool)
        self.ep_return_B, self.env_steps = np.zeros(B), 0
        self.episodes: list[tuple[int, int, float]] = []

    @torch.no_grad()
    def collect(self, agent: ActorCritic, num_steps: int) -> Rollout:
        B = self.obs_BO.shape[0]
        buf = {k: [] for k in ("obs", "actions", "logp", "values", "rewards", "terminated", "truncated", "valid")}
        for _ in range(num_steps):
            obs_BO = torch.from_numpy(self.obs_BO)
            logits_BA, value_B = agent(obs_BO, self.task_B)
            dist = torch.distributions.Categorical(logits=logits_BA)
            action_B = dist.sample()
            obs, reward, terminated, truncated, _ = self.envs.step(action_B.numpy())
            valid_B = ~self.prev_done_B
            reward_B = np.where(valid_B, np.asarray(reward, dtype=np.float64), 0.0)
            done_B = np.asarray(terminated, dtype=bool) | np.asarray(truncated, dtype=bool)
            self.env_steps += int(valid_B.sum())
            self.ep_return_B += reward_B
            for b in np.flatnonzero(done_B & valid_B):
                self.episodes.append((self.env_steps, int(self.task_B[b]), float(self.ep_return_B[b])))
            self.ep_return_B[~valid_B | done_B] = 0.0
            for k, v in (("obs", obs_BO), ("actions", action_B), ("logp", dist.log_prob(action_B)),
                         ("values", value_B), ("rewards", torch.from_numpy(reward_B).float()),
                         ("terminated", torch.from_numpy(np.asarray(terminated, dtype=bool))),
                         ("truncated", torch.from_numpy(np.asarray(truncated, dtype=bool))),
                         ("valid", torch.from_numpy(valid_B))):
                buf[k].append(v)
            self.prev_done_B, self.obs_BO = done_B, np.asarray(obs, dtype=np.float32)
        _, last_value_B = agent(torch.from_numpy(self.obs_BO), self.task_B)
        st = {k: torch.stack(v) for k, v in buf.items()}
        return Rollout(obs_TBO=st["obs"], task_TB=self.task_B.expand(num_steps, B), actions_TB=st["actions"],
                       logp_TB=st["logp"], values_TB=st["values"], rewards_TB=st["rewards"],
                       terminated_TB=st["terminated"], truncated_TB=st["truncated"], valid_TB=st["valid"],
                       last_value_B=last_value_B)


# ---------------------------------------------------------------------------------------------
# Training
@dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters: CleanRL's classic-control PPO with shorter rollouts (32 steps per env)
    and a higher learning rate, so that CartPole-v1 is learnt in tens of thousands of steps."""

    num_steps: int = 32
    lr: float = 1e-3
    anneal_lr: bool = True
    gamma: float = 0.99
    lam: float = 0.95
    epochs: int = 4
    minibatches: int = 4
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    max_grad_norm: float = 0.5


def ppo_update(agent: ActorCritic, optimizer: torch.optim.Optimizer, rollout: Rollout, *, config: PPOConfig,
               generator: Optional[torch.Generator] = None) -> dict:
    """One PPO update on a rollout: GAE, then ``epochs × minibatches`` steps on the valid rows.

    Loss: clipped policy loss + ``vf_coef``·½(V − R)² − ``ent_coef``·entropy + the MoE layers'
    auxiliary (balancing) losses, each already scaled by its layer's ``aux_loss_coef``.
    Returns the mean of each term over the minibatches, and ``approx_kl`` / ``clip_fraction``.
    """
    c = config
    adv_TB, ret_TB = gae_advantages(rewards_TB=rollout.rewards_TB, values_TB=rollout.values_TB,
                                    last_value_B=rollout.last_value_B, terminated_TB=rollout.terminated_TB,
                                    truncated_TB=rollout.truncated_TB, gamma=c.gamma, lam=c.lam)
    keep = rollout.valid_TB.reshape(-1)
    obs_NO = rollout.obs_TBO.reshape(-1, rollout.obs_TBO.shape[-1])[keep]
    task_N, act_N, logp_N, adv_N, ret_N = (t.reshape(-1)[keep] for t in (
        rollout.task_TB, rollout.actions_TB, rollout.logp_TB, adv_TB, ret_TB))
    adv_N = (adv_N - adv_N.mean()) / (adv_N.std(unbiased=False) + 1e-8)
    N = obs_NO.shape[0]
    mb = max(1, math.ceil(N / c.minibatches))
    sums = dict(policy_loss=0.0, value_loss=0.0, entropy=0.0, aux_loss=0.0, approx_kl=0.0, clip_fraction=0.0)
    steps = 0
    agent.train()
    for _ in range(c.epochs):
        perm = torch.randperm(N, generator=generator)
        for i in range(0, N, mb):
            idx = perm[i:i + mb]
            logits_BA, value_B = agent(obs_NO[idx], task_N[idx])
            dist = torch.distributions.Categorical(logits=logits_BA)
            logp_new = dist.log_prob(act_N[idx])
            pl = clipped_policy_loss(logp_new_N=logp_new, logp_old_N=logp_N[idx], adv_N=adv_N[idx],
                                     clip_eps=c.clip_eps)
            vl = 0.5 * (value_B - ret_N[idx]).square().mean()
            ent = dist.entropy().mean()
            aux = aux_loss(agent)
            loss = pl + c.vf_coef * vl - c.ent_coef * ent + aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), c.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                log_ratio = logp_new - logp_N[idx]
                # k3 estimator of KL(old ‖ new), unbiased and non-negative (Schulman 2020, "Approximating KL").
                kl = ((log_ratio.exp() - 1) - log_ratio).mean()
                clipped = ((log_ratio.exp() - 1).abs() > c.clip_eps).float().mean()
            for k, v in (("policy_loss", pl), ("value_loss", vl), ("entropy", ent), ("aux_loss", aux),
                         ("approx_kl", kl), ("clip_fraction", clipped)):
                sums[k] += float(v.detach())
            steps += 1
    return {k: v / steps for k, v in sums.items()}


@torch.no_grad()
def expert_usage(agent: ActorCritic, obs_NO: torch.Tensor, task_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(L, layers, E)`` share of each task's kept (sample, expert) pairs per expert, per top-k MoE layer.

    Soft MoE layers run every expert on every sample, so they have no usage to report and
    are skipped; a dense agent gives a ``(L, 0, 0)`` tensor.
    """
    was_training = agent.training
    agent.eval()
    task_N = torch.zeros(obs_NO.shape[0], dtype=torch.long) if task_N is None else task_N
    agent(obs_NO, task_N)
    agent.train(was_training)
    layers = [m for m in moe_layers(agent) if isinstance(m, MoE)]
    L = agent.num_tasks
    if not layers:
        return torch.zeros(L, 0, 0)
    E = layers[0].num_experts
    out = torch.zeros(L, len(layers), E)
    for j, layer in enumerate(layers):
        r = layer.last_routing
        out[:, j] = torch.bincount(task_N[r.token_ids] * E + r.expert_ids, minlength=L * E).reshape(L, E).float()
    return out / out.sum(-1, keepdim=True).clamp_min(1)


@dataclass
class RLTrainResult:
    """``episodes``: (env step, task, return) of every finished episode; ``updates``: `ppo_update` dicts."""

    episodes: list
    updates: list = field(default_factory=list)
    env_steps: int = 0
    wall_s: float = 0.0
    usage: Optional[torch.Tensor] = None


def train_ppo(agent: ActorCritic, envs, *, total_steps: int, config: PPOConfig = PPOConfig(),
              seed: int = 0) -> RLTrainResult:
    """Train `agent` with PPO on `envs` for about `total_steps` (valid) environment steps.

    Adam (ε = 1e-5) with the learning rate annealed linearly to 0 when ``config.anneal_lr``.
    ``usage`` is `expert_usage` on the last rollout's valid observations.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(agent.parameters(), lr=config.lr, eps=1e-5)
    collector = RolloutCollector(envs, seed=seed)
    t0 = time.perf_counter()
    updates, rollout = [], None
    while collector.env_steps < total_steps:
        if config.anneal_lr:
            for g in opt.param_groups:
                g["lr"] = config.lr * max(0.0, 1.0 - collector.env_steps / total_steps)
        rollout = collector.collect(agent, config.num_steps)
        updates.append(ppo_update(agent, opt, rollout, config=config, generator=gen))
    keep = rollout.valid_TB.reshape(-1)
    usage = expert_usage(agent, rollout.obs_TBO.reshape(-1, rollout.obs_TBO.shape[-1])[keep],
                         rollout.task_TB.reshape(-1)[keep])
    return RLTrainResult(episodes=collector.episodes, updates=updates, env_steps=collector.env_steps,
                         wall_s=time.perf_counter() - t0, usage=usage)


# ---------------------------------------------------------------------------------------------
# Environments (numpy, gymnasium vector API with next-step autoreset)
class _NumpyVecEnv:
    """Shared autoreset bookkeeping; subclasses define `_reset_rows(rows)` and `_advance(action_B)`."""

    metadata = {"autoreset_mode": "next-step"}
    obs_dim: int
    num_actions: int

    def __init__(self, num_envs: int, *, max_episode_steps: int):
        if num_envs < 1 or max_episode_steps < 1:
            raise ValueError(f"need num_envs >= 1 and max_episode_steps >= 1, got {num_envs}, {max_episode_steps}")
        self.num_envs, self.max_episode_steps = num_envs, max_episode_steps
        self.rng = np.random.default_rng()
        self.steps_B = np.zeros(num_envs, dtype=np.int64)
        self.prev_done_B = np.zeros(num_envs, dtype=bool)

    def reset(self, *, seed: Optional[int] = None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self._reset_rows(np.ones(self.num_envs, dtype=bool))
        self.steps_B[:], self.prev_done_B[:] = 0, False
        return self._obs(), {}

    def step(self, action_B):
        action_B = np.asarray(action_B)
        if action_B.shape != (self.num_envs,) or ((action_B < 0) | (action_B >= self.num_actions)).any():
            raise ValueError(f"actions must be ints in [0, {self.num_actions}) of shape ({self.num_envs},), "
                             f"got {action_B!r}")
        reward_B, terminated_B = self._advance(action_B)
        self.steps_B += 1
        truncated_B = (self.steps_B >= self.max_episode_steps) & ~terminated_B
        reset = self.prev_done_B
        self._reset_rows(reset)
        self.steps_B[reset] = 0
        reward_B[reset], terminated_B[reset], truncated_B[reset] = 0.0, False, False
        self.prev_done_B = terminated_B | truncated_B
        return self._obs(), reward_B, terminated_B, truncated_B, {}


class CartPoleVecEnv(_NumpyVecEnv):
    """Cart-pole balancing (Barto, Sutton & Anderson 1983) with gymnasium CartPole-v1's constants.

    Euler steps of τ = 0.02 s of the frictionless equations (Florian 2007's correction of the
    1983 paper's sign), force ±10 N, reward 1 per step, termination at |x| > 2.4 or
    |θ| > 12°, truncation after 500 steps, start state uniform in ±0.05.
    """

    obs_dim, num_actions = 4, 2
    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    theta_threshold, x_threshold = 12 * 2 * math.pi / 360, 2.4

    def __init__(self, num_envs: int, *, max_episode_steps: int = 500):
        super().__init__(num_envs, max_episode_steps=max_episode_steps)
        self.state_4B = np.zeros((4, num_envs))

    def _reset_rows(self, rows):
        self.state_4B[:, rows] = self.rng.uniform(-0.05, 0.05, size=(4, int(rows.sum())))

    def _obs(self):
        return self.state_4B.T.astype(np.float32)

    def _advance(self, action_B):
        x, x_dot, theta, theta_dot = self.state_4B
        total_mass, pml = self.masspole + self.masscart, self.masspole * self.length
        force = np.where(action_B == 1, self.force_mag, -self.force_mag)
        cos, sin = np.cos(theta), np.sin(theta)
        temp = (force + pml * theta_dot ** 2 * sin) / total_mass
        theta_acc = (self.gravity * sin - cos * temp) / (self.length * (4.0 / 3.0 - self.masspole * cos ** 2 / total_mass))
        x_acc = temp - pml * theta_acc * cos / total_mass
        self.state_4B = np.stack([x + self.tau * x_dot, x_dot + self.tau * x_acc,
                                  theta + self.tau * theta_dot, theta_dot + self.tau * theta_acc])
        x, theta = self.state_4B[0], self.state_4B[2]
        terminated = (np.abs(x) > self.x_threshold) | (np.abs(theta) > self.theta_threshold)
        return np.ones(self.num_envs, dtype=np.float32), terminated


class ReachVecEnv(_NumpyVecEnv):
    """1-D reach: walk (left, stay, right) from a random cell in [−2, 2] to a goal at ±3.

    Observation ``(position / 3, goal / 3)``; reward −0.05 per step and +1 on reaching the goal
    (terminates); truncated after 20 steps. A uniformly random policy averages about −0.07 (half
    its episodes reach the goal), the optimal one about +0.85.
    """

    obs_dim, num_actions = 2, 3

    def __init__(self, num_envs: int, *, max_episode_steps: int = 20):
        super().__init__(num_envs, max_episode_steps=max_episode_steps)
        self.pos_B, self.goal_B = np.zeros(num_envs), np.zeros(num_envs)

    def _reset_rows(self, rows):
        n = int(rows.sum())
        self.pos_B[rows] = self.rng.integers(-2, 3, size=n)
        self.goal_B[rows] = self.rng.choice([-3.0, 3.0], size=n)

    def _obs(self):
        return np.stack([self.pos_B / 3, self.goal_B / 3], axis=1).astype(np.float32)

    def _advance(self, action_B):
        self.pos_B = self.pos_B + (action_B - 1)
        reached = self.pos_B == self.goal_B
        return np.where(reached, 1.0, 0.0) - 0.05, reached


class MultiTaskVecEnv:
    """Several vector envs side by side: observations zero-padded to the widest, ``task_ids`` per row.

    Each sub-env takes its own slice of the action vector; an action index beyond a task's
    action count is an error of the sub-env (`ActorCritic` masks such actions).
    """

    metadata = {"autoreset_mode": "next-step"}

    def __init__(self, envs: Sequence):
        if not envs:
            raise ValueError("MultiTaskVecEnv needs at least one vector env")
        self.envs = list(envs)
        self.sizes = [e.num_envs for e in self.envs]
        self.obs_dims = [int(e.single_observation_space.shape[0]) if hasattr(e, "single_observation_space")
                         else e.obs_dim for e in self.envs]
        self.action_counts = [int(e.single_action_space.n) if hasattr(e, "single_action_space")
                              else e.num_actions for e in self.envs]
        self.obs_dim, self.num_envs = max(self.obs_dims), sum(self.sizes)
        self.task_ids = np.repeat(np.arange(len(self.envs)), self.sizes)

    def _pad(self, parts):
        return np.concatenate([np.pad(np.asarray(p, np.float32), ((0, 0), (0, self.obs_dim - p.shape[1])))
                               for p in parts])

    def reset(self, *, seed: Optional[int] = None):
        obs = [e.reset(seed=None if seed is None else seed + 1000 * i)[0] for i, e in enumerate(self.envs)]
        return self._pad(obs), {}

    def step(self, action_B):
        outs, start = [], 0
        for e, n in zip(self.envs, self.sizes):
            outs.append(e.step(np.asarray(action_B[start:start + n])))
            start += n
        obs, rew, term, trunc = ([o[i] for o in outs] for i in range(4))
        return (self._pad(obs), np.concatenate(rew).astype(np.float64), np.concatenate(term).astype(bool),
                np.concatenate(trunc).astype(bool), {})


def make_gym_vec_env(env_id: str, num_envs: int):
    """gymnasium's ``make_vec`` (its own vectorised env where one exists, else ``"sync"``).

    Needs the optional extra: ``pip install 'moekit[rl]'``.
    """
    try:
        import gymnasium as gym
    except ImportError as e:
        raise ImportError("moekit.models.rl.make_gym_vec_env needs gymnasium; install the extra with "
                          "pip install 'moekit[rl]'") from e
    try:
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point")
    except (gym.error.Error, ValueError, TypeError):
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
