"""Probabilistic mixture-of-experts policies (PMOE) and SAC for continuous control (METHODS.md RL2).

Ren, Li, Ding, Pan & Dong (2021), "Probabilistic Mixture-of-Experts for Efficient Deep
Reinforcement Learning": the policy is a Gaussian mixture — a gating head gives weights
``w_i(s)`` over K experts, each expert a diagonal Gaussian ``N(μ_i(s), σ_i(s))`` — so it can be
multi-modal. Sampling a component is not differentiable; PMOE trains the two parts separately:

- experts: every expert draws a reparameterised action ``a_i = tanh(μ_i + σ_i ε)``; the critic
  scores them, and the SAC actor loss ``α·log π(a_i*|s) − Q(s, a_i*)`` is back-propagated
  through the best one, ``i* = argmax_i Q(s, a_i)``, only;
- gate: the "frequency" approximation of which expert is optimal — cross-entropy between the
  gate's weights and the one-hot of ``i*`` (how often each expert wins, in expectation).

Our reading of the paper, stated where it is a choice: ``log π`` is the whole mixture's log
density (so the entropy term acts on the mixture), the winner is chosen on the first critic.
With K = 1 the gate is constant, the policy is SAC's tanh-Gaussian and the actor loss SAC's.

SAC (Haarnoja et al. 2018, the version with two critics and a learned temperature): target
``r + γ·(1 − terminated)·(min_j Q̄_j(s', a') − α·log π(a'|s'))``, Polyak-averaged target
critics, temperature tuned towards the target entropy −A.

Legend: B batch, O observation features, A action dims, K experts (mixture components), H hidden.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.rl.dqn import OffPolicyCollector, ReplayBuffer
from moekit.models.rl.ppo import RLTrainResult, check_next_step_autoreset
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_int, check_number

__all__ = ["MixtureGaussianPolicy", "TwinQ", "mixture_log_prob", "SACConfig", "sac_update", "train_sac"]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


def mixture_log_prob(u_BA: torch.Tensor, logits_BK: torch.Tensor, mu_BKA: torch.Tensor,
                     log_std_BKA: torch.Tensor) -> torch.Tensor:
    """``log Σ_i w_i N(u; μ_i, diag σ_i²)`` (pre-squash u), ``w = softmax(logits)`` → ``(B,)``."""
    z_BKA = (u_BA[:, None, :] - mu_BKA) / log_std_BKA.exp()
    comp_BK = (-0.5 * z_BKA.square() - log_std_BKA - 0.5 * math.log(2 * math.pi)).sum(-1)
    return torch.logsumexp(F.log_softmax(logits_BK, -1) + comp_BK, -1)


def _tanh_correction(u_BA: torch.Tensor) -> torch.Tensor:
    # log |d tanh(u)/du| = log(1 − tanh²u) = 2·(log 2 − u − softplus(−2u)), stable for large |u|.
    return (2 * (math.log(2) - u_BA - F.softplus(-2 * u_BA))).sum(-1)


def _build_encoder(encoder: Optional[Callable[[], nn.Module]], obs_dim: int) -> tuple[nn.Module, int]:
    """``(module, its output width)``: `encoder`'s fresh module (which must have ``out_dim``), or the identity."""
    if encoder is None:
        return nn.Identity(), obs_dim
    if isinstance(encoder, nn.Module) or not callable(encoder):
        raise TypeError(f"encoder must be a zero-argument callable returning a module, got {type(encoder).__name__}")
    module = encoder()
    out_dim = getattr(module, "out_dim", None) if isinstance(module, nn.Module) else None
    if not isinstance(out_dim, int) or out_dim < 1:
        raise TypeError(f"encoder() must return an nn.Module with a positive int out_dim, got {module!r}")
    return module, out_dim


class MixtureGaussianPolicy(nn.Module):
    """``obs_BO → (logits_BK, mu_BKA, log_std_BKA)``: a shared MLP torso, a gate and K Gaussian heads.

    Actions are ``tanh(u)`` scaled to ``[low, high]``; `sample` draws from the mixture and gives
    the squashed mixture's log density; `sample_each` draws one reparameterised action per expert.
    ``encoder``: a zero-argument callable building a module ``obs_BO → (B, out_dim)`` put before
    the torso (e.g. a `moekit.models.rl.MultiTaskObsEncoder` for multi-task SAC); default none.
    """

    def __init__(self, *, obs_dim: int, action_dim: int, num_experts: int = 4, hidden: int = 64,
                 action_low: float | np.ndarray = -1.0, action_high: float | np.ndarray = 1.0,
                 encoder: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        check_int("obs_dim", obs_dim, min=1)
        self.action_dim = check_int("action_dim", action_dim, min=1)
        self.num_experts = check_int("num_experts", num_experts, min=1)
        check_int("hidden", hidden, min=1)
        K, A = num_experts, action_dim
        self.encoder, d_in = _build_encoder(encoder, obs_dim)
        self.torso = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.gate = nn.Linear(hidden, K)
        self.heads = nn.Linear(hidden, 2 * K * A)
        low = torch.as_tensor(action_low, dtype=torch.float32).expand(A)
        high = torch.as_tensor(action_high, dtype=torch.float32).expand(A)
        self.register_buffer("scale_A", (high - low) / 2, persistent=False)
        self.register_buffer("offset_A", (high + low) / 2, persistent=False)

    def forward(self, obs_BO: torch.Tensor):
        h = self.torso(self.encoder(obs_BO))
        B, K, A = obs_BO.shape[0], self.num_experts, self.action_dim
        mu_BKA, log_std_BKA = self.heads(h).reshape(B, K, 2, A).unbind(2)
        return self.gate(h), mu_BKA, log_std_BKA.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def _squash(self, u_BA: torch.Tensor) -> torch.Tensor:
        return torch.tanh(u_BA) * self.scale_A + self.offset_A

    def log_prob_pre_squash(self, u_BA: torch.Tensor, params) -> torch.Tensor:
        """log density of the action ``squash(u)`` (``(B,)``): mixture density minus the tanh and scale Jacobians."""
        return mixture_log_prob(u_BA, *params) - _tanh_correction(u_BA) - self.scale_A.log().sum()

    def sample(self, obs_BO: torch.Tensor, *, deterministic: bool = False):
        """``(action_BA, log_prob_B)``: a component by its weight, then its Gaussian (mean of the
        heaviest component when `deterministic`). No gradient through the component choice."""
        logits, mu, log_std = params = self(obs_BO)
        k_B = logits.argmax(-1) if deterministic else torch.distributions.Categorical(logits=logits).sample()
        idx = k_B[:, None, None].expand(-1, 1, self.action_dim)
        mu_k, std_k = mu.gather(1, idx).squeeze(1), log_std.gather(1, idx).squeeze(1).exp()
        u = mu_k if deterministic else mu_k + std_k * torch.randn_like(mu_k)
        return self._squash(u), self.log_prob_pre_squash(u, params)

    def sample_each(self, obs_BO: torch.Tensor):
        """``(actions_BKA, log_prob_BK, logits_BK)``: one reparameterised action per expert, each
        scored by the whole mixture's log density."""
        logits, mu, log_std = params = self(obs_BO)
        u_BKA = mu + log_std.exp() * torch.randn_like(mu)
        B, K, A = u_BKA.shape
        u_flat = u_BKA.reshape(B * K, A)
        rep = tuple(p.repeat_interleave(K, 0) for p in params)
        logp_BK = self.log_prob_pre_squash(u_flat, rep).reshape(B, K)
        return self._squash(u_BKA), logp_BK, logits


class TwinQ(nn.Module):
    """Two critics ``Q_j(s, a)`` (SAC's clipped double-Q) → ``(B, 2)``. ``encoder`` (as for
    `MixtureGaussianPolicy`) is called once per critic: each has its own observation encoder."""

    def __init__(self, *, obs_dim: int, action_dim: int, hidden: int = 64,
                 encoder: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        built = [_build_encoder(encoder, obs_dim) for _ in range(2)]
        self.encoders = nn.ModuleList(m for m, _ in built)
        self.q = nn.ModuleList(_mlp(d_in + action_dim, hidden, 1) for _, d_in in built)

    def forward(self, obs_BO: torch.Tensor, act_BA: torch.Tensor) -> torch.Tensor:
        return torch.cat([q(torch.cat([enc(obs_BO), act_BA], -1)) for enc, q in zip(self.encoders, self.q)], -1)


@dataclass(frozen=True)
class SACConfig:
    """SAC hyper-parameters (Haarnoja et al. 2018's, with smaller networks and batch for a CPU)."""

    lr: float = 1e-3
    gamma: float = 0.99
    tau: float = 0.005
    batch_size: int = 128
    buffer_size: int = 100_000
    learning_starts: int = 1_000
    train_every: int = 1
    init_alpha: float = 0.2
    pmoe: bool = True           # PMOE's winner-expert actor loss and frequency gate loss (else SAC's on a sample)

    def __post_init__(self):
        check_number("lr", self.lr, min=0, min_open=True)
        check_number("gamma", self.gamma, min=0, max=1)
        check_number("tau", self.tau, min=0, max=1, min_open=True)
        check_number("init_alpha", self.init_alpha, min=0, min_open=True)
        for name in ("batch_size", "buffer_size", "train_every"):
            check_int(name, getattr(self, name), min=1)
        check_int("learning_starts", self.learning_starts, min=0)


class _SACState(nn.Module):
    """Everything SAC trains, in one module so one `UpdateStep` per part can own its optimizer."""

    def __init__(self, policy: MixtureGaussianPolicy, critic: TwinQ, init_alpha: float):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.critic_target = copy.deepcopy(critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init_alpha)))


def sac_update(state: _SACState, batch: dict, *, updates: dict, config: SACConfig) -> dict:
    """One SAC / PMOE update: critics, then the actor (and gate), then the temperature, then Polyak."""
    c, pol = config, state.policy
    obs, act, rew = batch["obs"].float(), batch["actions"].float(), batch["rewards"]
    next_obs, term = batch["next_obs"].float(), batch["terminated"]
    alpha = state.log_alpha.exp().detach()
    with torch.no_grad():
        a2, logp2 = pol.sample(next_obs)
        q2 = state.critic_target(next_obs, a2).min(-1).values - alpha * logp2
        y = rew + c.gamma * (~term).float() * q2
    critic_loss = 0.5 * (state.critic(obs, act) - y[:, None]).square().sum(-1).mean()
    updates["critic"](critic_loss)

    if c.pmoe:
        a_BKA, logp_BK, logits_BK = pol.sample_each(obs)
        B, K, A = a_BKA.shape
        q_BK = state.critic(obs.repeat_interleave(K, 0), a_BKA.reshape(B * K, A))[:, 0].reshape(B, K)
        best_B = q_BK.detach().argmax(-1)
        pick = lambda t: t.gather(1, best_B[:, None]).squeeze(1)  # noqa: E731
        actor_loss = (alpha * pick(logp_BK) - pick(q_BK)).mean()
        gate_loss = F.cross_entropy(logits_BK, best_B)          # frequency approximation of P(expert i optimal)
        logp = pick(logp_BK)
    else:
        logits, mu, log_std = params = pol(obs)
        # K = 1 is SAC's reparameterised tanh-Gaussian; for K > 1 a fixed component per row (no gate gradient).
        k_B = torch.distributions.Categorical(logits=logits.detach()).sample()
        idx = k_B[:, None, None].expand(-1, 1, pol.action_dim)
        u = mu.gather(1, idx).squeeze(1) + log_std.gather(1, idx).squeeze(1).exp() * torch.randn_like(mu[:, 0])
        logp = pol.log_prob_pre_squash(u, params)
        actor_loss = (alpha * logp - state.critic(obs, pol._squash(u)).min(-1).values).mean()
        gate_loss = torch.zeros(())
    state.critic.requires_grad_(False)
    updates["actor"](actor_loss + gate_loss)
    state.critic.requires_grad_(True)
    alpha_loss = -(state.log_alpha * (logp.detach() - pol.action_dim)).mean()      # target entropy −A
    updates["alpha"](alpha_loss)
    with torch.no_grad():
        for p, pt in zip(state.critic.parameters(), state.critic_target.parameters()):
            pt.lerp_(p, c.tau)
    return dict(critic_loss=float(critic_loss.detach()), actor_loss=float(actor_loss.detach()),
                gate_loss=float(gate_loss.detach()),
                alpha=float(alpha))


def train_sac(policy: MixtureGaussianPolicy, critic: TwinQ, envs, *, total_steps: int,
              config: SACConfig = SACConfig(), seed: int = 0) -> RLTrainResult:
    """SAC (or PMOE, ``config.pmoe``) on a continuous-action gymnasium vector env (next-step autoreset).

    Three Adam optimizers (`moekit.optim.build_optimizer`): critics, actor, temperature, each
    stepped by its own `moekit.optim.UpdateStep`. Before ``learning_starts`` actions are uniform.
    Returns episodes ``(env step, 0, return)``; ``updates`` holds one dict of losses per 100 updates.
    """
    total_steps = check_int("total_steps", total_steps, min=1)
    c = config
    check_next_step_autoreset(envs)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    state = _SACState(policy, critic, c.init_alpha)
    updates = {name: UpdateStep(mod, build_optimizer(params, name="adam", lr=c.lr), lr=None, bias_update=False)
               for name, mod, params in (("critic", state.critic, state.critic.parameters()),
                                         ("actor", state.policy, state.policy.parameters()),
                                         ("alpha", state, [state.log_alpha]))}
    obs, _ = envs.reset(seed=seed)
    obs = np.asarray(obs, np.float32)
    B, A = obs.shape[0], policy.action_dim
    low, high = (policy.offset_A - policy.scale_A).numpy(), (policy.offset_A + policy.scale_A).numpy()
    buffer = ReplayBuffer(c.buffer_size, obs.shape[1:], np.float32, action_shape=(A,), action_dtype=np.float32)
    collect = OffPolicyCollector(buffer, B)
    logs, n_updates, t0 = [], 0, time.perf_counter()
    while collect.env_steps < total_steps:
        if collect.env_steps < c.learning_starts:
            action = rng.uniform(low, high, size=(B, A)).astype(np.float32)
        else:
            with torch.no_grad():
                action = policy.sample(torch.from_numpy(obs))[0].numpy()
        next_obs, reward, terminated, truncated, _ = envs.step(action)
        next_obs = np.asarray(next_obs, np.float32)
        n_valid = collect.record(obs, action, reward, next_obs, terminated, truncated)
        obs = next_obs
        for _ in range(collect.updates_due(n_valid, learning_starts=c.learning_starts, train_every=c.train_every)):
            info = sac_update(state, buffer.sample(c.batch_size, rng), updates=updates, config=c)
            n_updates += 1
            if n_updates % 100 == 0:
                logs.append(dict(step=collect.env_steps, **info))
    return RLTrainResult(episodes=collect.episodes, updates=logs, env_steps=collect.env_steps,
                         wall_s=time.perf_counter() - t0)

