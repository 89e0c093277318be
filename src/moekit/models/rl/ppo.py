"""PPO: GAE, the clipped surrogate loss, rollout collection, the update and the training loop.

Legend: T rollout steps, B parallel environments, N samples, O observation features, A actions,
L tasks, D torso width, F expert hidden dim, E experts, K experts per sample, M tokens per sample.
See `moekit.models.rl` for the method and the references.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from moekit.layers.moe import MoE, aux_loss, moe_layers
from moekit.models.rl.network import ActorCritic
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_int

__all__ = ["gae_advantages", "clipped_policy_loss", "check_next_step_autoreset", "Rollout", "RolloutCollector",
           "PPOConfig", "ppo_update",
           "RLTrainResult", "train_ppo", "expert_usage"]


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
        shapes = [tuple(t.shape) for t in (rewards_TB, values_TB, terminated_TB, truncated_TB, last_value_B)]
        raise ValueError(f"need rewards, values, terminated, truncated all (T, B) and last_value (B,); got {shapes}")
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
def check_next_step_autoreset(envs) -> None:
    """Refuse a vector env whose ``metadata["autoreset_mode"]`` is not next-step (gymnasium's default),
    the semantics every moekit RL loop assumes (an env without the key is taken as next-step)."""
    mode = getattr(envs, "metadata", {}).get("autoreset_mode")
    if mode is not None and str(getattr(mode, "value", mode)).lower().replace("_", "").replace("-", "") != "nextstep":
        raise ValueError(f"the RL loops need a vector env with next-step autoreset (gymnasium's default), "
                         f"got autoreset_mode={mode!r}")


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
        check_next_step_autoreset(envs)
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


def ppo_update(agent: ActorCritic, update: UpdateStep, rollout: Rollout, *, config: PPOConfig,
               generator: Optional[torch.Generator] = None) -> dict:
    """One PPO update on a rollout: GAE, then ``epochs × minibatches`` steps on the valid rows.

    Loss: clipped policy loss + ``vf_coef``·½(V − R)² − ``ent_coef``·entropy + the MoE layers'
    auxiliary (balancing) losses, each already scaled by its layer's ``aux_loss_coef``. Each
    minibatch step is one call of `update` (a `moekit.optim.UpdateStep` over `agent`: clipping
    to its ``grad_clip``, the non-finite check, the optimizer step and the bias update).
    Returns the mean of each term over the minibatches, and ``approx_kl`` / ``clip_fraction``.
    """
    if not isinstance(update, UpdateStep):
        raise TypeError(f"update must be a moekit.optim.UpdateStep, got {type(update).__name__}")
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
            update(pl + c.vf_coef * vl - c.ent_coef * ent + aux)
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
    """``episodes``: (env step, task, return) of every finished episode; ``updates``: the training
    loop's logged dicts (`ppo_update`'s for `train_ppo`, periodic loss summaries for `train_dqn`)."""

    episodes: list
    updates: list = field(default_factory=list)
    env_steps: int = 0
    wall_s: float = 0.0
    usage: Optional[torch.Tensor] = None


def train_ppo(agent: ActorCritic, envs, *, total_steps: int, config: PPOConfig = PPOConfig(),
              seed: int = 0) -> RLTrainResult:
    """Train `agent` with PPO on `envs` for about `total_steps` (valid) environment steps.

    Adam (ε = 1e-5, `moekit.optim.build_optimizer`), every minibatch step a
    `moekit.optim.UpdateStep` clipping to ``config.max_grad_norm``. The learning rate is set once
    per rollout, annealed linearly to 0 over the environment steps when ``config.anneal_lr``
    (so the update step leaves it alone, ``lr=None``). ``usage`` is `expert_usage` on the last
    rollout's valid observations.
    """
    total_steps = check_int("total_steps", total_steps, min=1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = build_optimizer(agent, name="adam", lr=config.lr, eps=1e-5)
    update = UpdateStep(agent, opt, lr=None, grad_clip=config.max_grad_norm)
    collector = RolloutCollector(envs, seed=seed)
    t0 = time.perf_counter()
    updates, rollout = [], None
    while collector.env_steps < total_steps:
        if config.anneal_lr:
            for g in opt.param_groups:
                g["lr"] = config.lr * max(0.0, 1.0 - collector.env_steps / total_steps)
        rollout = collector.collect(agent, config.num_steps)
        updates.append(ppo_update(agent, update, rollout, config=config, generator=gen))
    keep = rollout.valid_TB.reshape(-1)
    usage = expert_usage(agent, rollout.obs_TBO.reshape(-1, rollout.obs_TBO.shape[-1])[keep],
                         rollout.task_TB.reshape(-1)[keep])
    return RLTrainResult(episodes=collector.episodes, updates=updates, env_steps=collector.env_steps,
                         wall_s=time.perf_counter() - t0, usage=usage)
