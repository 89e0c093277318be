"""DQN whose penultimate layer is dense, Soft MoE or top-k MoE (METHODS.md RL1).

Obando-Ceron, Sokar, Willi, Lyle, Farebrother, Foerster, Dziugaite, Precup & Castro (ICML 2024),
"Mixtures of Experts Unlock Parameter Scaling for Deep RL": in DQN / Rainbow the dense layer
between the convolutional encoder and the Q-value layer is replaced by a Soft MoE (or a top-1
MoE) over tokens cut from the encoder's output; "PerConv" tokenisation makes each spatial
position's channel vector one token, ``[B, H, W, C] → [B, H·W, C]``. The experts' outputs are
flattened into the final linear layer. Sokar et al. (2024, "Don't flatten, tokenize!") find
that much of the gain comes from the tokenisation itself — a one-expert Soft MoE (``soft_moe``
with ``num_experts=1``) is that ablation.

Legend: B batch (or parallel environments), H, W, C the encoder output's grid and channels,
M = H·W tokens, A actions, E experts, P slots per expert, F expert hidden dim.

DQN (Mnih et al. 2015): ε-greedy acting, a uniform replay buffer, a target network copied
every ``target_update`` updates, the Huber loss on ``r + γ·(1 − terminated)·max_a' Q̄(s', a')``
(``double=True``: van Hasselt et al. 2016's Double DQN target). Environments follow gymnasium's
vector API with next-step autoreset (as in `moekit.models.rl.ppo`): the step after an episode end
resets that environment, and its transition is not stored; a truncated episode's last transition
bootstraps from the final observation.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.moe import MoE, aux_loss
from moekit.layers.soft_moe import SoftMoE
from moekit.models.rl.ppo import RLTrainResult, check_next_step_autoreset
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_bool, check_choice, check_int, check_number

__all__ = ["Q_HEADS", "QNetworkConfig", "QNetwork", "perconv_tokens", "ReplayBuffer", "OffPolicyCollector",
           "dqn_targets", "DQNConfig", "linear_epsilon", "train_dqn"]

Q_HEADS = ("dense", "soft_moe", "moe")


def perconv_tokens(feat_BHWC: torch.Tensor) -> torch.Tensor:
    """PerConv tokenisation: ``(B, H, W, C) → (B, H·W, C)``, one token per spatial position (row-major)."""
    if feat_BHWC.dim() != 4:
        raise ValueError(f"features must have shape (B, H, W, C), got {tuple(feat_BHWC.shape)}")
    B, H, W, C = feat_BHWC.shape
    return feat_BHWC.reshape(B, H * W, C)


@dataclass(frozen=True)
class QNetworkConfig:
    """Q-network: a conv encoder, then the penultimate layer of kind `head`, then a linear Q layer.

    channels, kernel: the encoder (one ``kernel × kernel`` convolution, stride 1, no padding, ReLU;
        MinAtar's DQN encoder of Young & Tian 2019 with 16 channels).
    head: ``"dense"`` — flatten, ``Linear(H·W·C → d_hidden·width_mult)``, ReLU (the baseline,
        widened by `width_mult`); ``"soft_moe"`` — `moekit.layers.SoftMoE` on the PerConv tokens,
        ``num_experts`` MLP experts ``C → d_hidden → C``, ``slots_per_expert`` slots each
        (default M / E, so the total number of slots — and the expert FLOPs — stay M whatever E);
        ``"moe"`` — `moekit.MoE` with a top-``top_k`` router on the same tokens and experts.
        The token outputs are flattened into the Q layer.
    normalize: Soft MoE's L2 normalisation of tokens and slot parameters, which Puigcerver et
        al. introduce for large D. Off by default: MinAtar tokens have C = 16 features, and with
        it the logits are confined to [−scale, scale] (scale starts at 1), so every slot starts
        as a near-uniform average of the M tokens.
    """

    head: str = "soft_moe"
    channels: int = 16
    kernel: int = 3
    d_hidden: int = 128
    width_mult: int = 1
    num_experts: int = 4
    slots_per_expert: Optional[int] = None
    top_k: int = 1
    aux_loss_coef: float = 0.01
    normalize: bool = False

    def __post_init__(self):
        check_choice("head", self.head, Q_HEADS)
        for name in ("channels", "kernel", "d_hidden", "width_mult", "num_experts", "top_k"):
            check_int(name, getattr(self, name), min=1)
        check_int("slots_per_expert", self.slots_per_expert, min=1, allow_none=True)
        check_number("aux_loss_coef", self.aux_loss_coef, min=0)
        check_bool("normalize", self.normalize)
        if self.head != "dense" and self.width_mult != 1:
            raise ValueError(f"width_mult widens the dense head only; got width_mult={self.width_mult} "
                             f"with head={self.head!r} (scale num_experts instead)")
        if self.head == "moe" and self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts={self.num_experts}, got top_k={self.top_k}")

    def build(self, *, obs_shape: Sequence[int], num_actions: int) -> "QNetwork":
        return QNetwork(self, obs_shape=obs_shape, num_actions=num_actions)


class QNetwork(nn.Module):
    """``obs_BHWC → q_BA`` (observations channels-last, any dtype; MinAtar's are bool)."""

    def __init__(self, config: QNetworkConfig, *, obs_shape: Sequence[int], num_actions: int):
        super().__init__()
        if len(obs_shape) != 3 or min(obs_shape) < 1:
            raise ValueError(f"obs_shape must be (H, W, C) of positive ints, got {tuple(obs_shape)!r}")
        check_int("num_actions", num_actions, min=1)
        c = self.config = config
        H0, W0, C0 = (int(s) for s in obs_shape)
        H, W = H0 - c.kernel + 1, W0 - c.kernel + 1
        if H < 1 or W < 1:
            raise ValueError(f"kernel={c.kernel} does not fit observations of shape {tuple(obs_shape)}")
        self.obs_shape, self.num_actions, self.grid = (H0, W0, C0), num_actions, (H, W)
        M, C = H * W, c.channels
        self.conv = nn.Conv2d(C0, C, c.kernel)
        if c.head == "dense":
            self.penultimate = nn.Linear(M * C, c.d_hidden * c.width_mult)
            q_in = c.d_hidden * c.width_mult
        elif c.head == "soft_moe":
            P = c.slots_per_expert if c.slots_per_expert is not None else max(1, M // c.num_experts)
            self.penultimate = SoftMoE(d_model=C, num_experts=c.num_experts, slots_per_expert=P,
                                       d_hidden=c.d_hidden, expert="mlp", activation="relu", normalize=c.normalize)
            q_in = M * C
        else:
            self.penultimate = MoE(d_model=C, num_experts=c.num_experts, top_k=c.top_k, d_hidden=c.d_hidden,
                                   expert="mlp", activation="relu", aux_loss_coef=c.aux_loss_coef)
            q_in = M * C
        self.q_layer = nn.Linear(q_in, num_actions)

    def forward(self, obs_BHWC: torch.Tensor) -> torch.Tensor:
        if obs_BHWC.dim() != 4 or tuple(obs_BHWC.shape[1:]) != self.obs_shape:
            raise ValueError(f"obs must have shape (B, {', '.join(map(str, self.obs_shape))}), "
                             f"got {tuple(obs_BHWC.shape)}")
        B = obs_BHWC.shape[0]
        x = obs_BHWC.float().permute(0, 3, 1, 2)                                  # (B, C0, H0, W0)
        feat_BHWC = F.relu(self.conv(x)).permute(0, 2, 3, 1)                      # (B, H, W, C)
        if self.config.head == "dense":
            h_BX = F.relu(self.penultimate(feat_BHWC.reshape(B, -1)))
        else:
            tok_BMC = perconv_tokens(feat_BHWC)
            if self.config.head == "soft_moe":
                out_BMC = self.penultimate(tok_BMC)
            else:
                out_BMC = self.penultimate(tok_BMC.reshape(-1, tok_BMC.shape[-1])).reshape(tok_BMC.shape)
            h_BX = out_BMC.reshape(B, -1)
        return self.q_layer(h_BX)


# ---------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Uniform replay of ``(obs, action, reward, next_obs, terminated)`` in a numpy ring buffer
    (discrete actions by default; ``action_shape=(A,), action_dtype=np.float32`` for continuous)."""

    def __init__(self, capacity: int, obs_shape: Sequence[int], obs_dtype=np.float32, *,
                 action_shape: Sequence[int] = (), action_dtype=np.int64):
        self.capacity = check_int("capacity", capacity, min=1)
        shape = (self.capacity, *obs_shape)
        self.obs, self.next_obs = np.zeros(shape, obs_dtype), np.zeros(shape, obs_dtype)
        self.actions = np.zeros((self.capacity, *action_shape), action_dtype)
        self.rewards = np.zeros(self.capacity, np.float32)
        self.terminated = np.zeros(self.capacity, bool)
        self.pos, self.size = 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs, actions, rewards, next_obs, terminated) -> None:
        """Add a batch of n transitions (the oldest are overwritten once full)."""
        n = len(actions)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx], self.actions[idx], self.rewards[idx] = obs, actions, rewards
        self.next_obs[idx], self.terminated[idx] = next_obs, terminated
        self.pos, self.size = int((self.pos + n) % self.capacity), min(self.capacity, self.size + n)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict:
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = rng.integers(0, self.size, size=batch_size)
        return dict(obs=torch.from_numpy(self.obs[idx]), actions=torch.from_numpy(self.actions[idx]),
                    rewards=torch.from_numpy(self.rewards[idx]), next_obs=torch.from_numpy(self.next_obs[idx]),
                    terminated=torch.from_numpy(self.terminated[idx]))


class OffPolicyCollector:
    """The bookkeeping of off-policy collection on a vector env with next-step autoreset, shared
    by `train_dqn` and `moekit.models.rl.pmoe.train_sac`: `record` stores a step's valid
    transitions in `buffer` (not the reset step after an episode end), counts valid env steps
    and keeps finished episodes as ``(env step, 0, return)``; `updates_due` says how many
    updates to run now — one per ``train_every`` valid steps once ``learning_starts`` is reached."""

    def __init__(self, buffer: ReplayBuffer, num_envs: int):
        self.buffer = buffer
        self.prev_done_B = np.zeros(check_int("num_envs", num_envs, min=1), bool)
        self.ep_return_B = np.zeros(num_envs)
        self.episodes: list = []
        self.env_steps = 0
        self._pending = 0

    def record(self, obs, action_B, reward, next_obs, terminated, truncated) -> int:
        """Book one vector step (arrays over the B envs); returns its number of valid transitions."""
        valid_B = ~self.prev_done_B
        reward_B = np.asarray(reward, dtype=np.float64)
        term_B = np.asarray(terminated, bool)
        done_B = term_B | np.asarray(truncated, bool)
        if valid_B.any():
            self.buffer.add(obs[valid_B], action_B[valid_B], reward_B[valid_B], next_obs[valid_B], term_B[valid_B])
        n_valid = int(valid_B.sum())
        self.env_steps += n_valid
        self.ep_return_B += np.where(valid_B, reward_B, 0.0)
        for b in np.flatnonzero(done_B & valid_B):
            self.episodes.append((self.env_steps, 0, float(self.ep_return_B[b])))
        self.ep_return_B[~valid_B | done_B] = 0.0
        self.prev_done_B = done_B
        return n_valid

    def updates_due(self, n_valid: int, *, learning_starts: int, train_every: int) -> int:
        if self.env_steps < learning_starts:
            return 0
        self._pending += n_valid
        due = self._pending // train_every
        self._pending -= due * train_every
        return due


def dqn_targets(*, rewards_B: torch.Tensor, terminated_B: torch.Tensor, next_q_target_BA: torch.Tensor,
                gamma: float, next_q_online_BA: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``r + γ·(1 − terminated)·Q̄(s', a*)`` with ``a* = argmax Q̄(s', ·)`` (DQN) or
    ``argmax Q(s', ·)`` of the online network when `next_q_online_BA` is given (Double DQN)."""
    chooser = next_q_target_BA if next_q_online_BA is None else next_q_online_BA
    a_star_B = chooser.argmax(-1, keepdim=True)
    next_v_B = next_q_target_BA.gather(-1, a_star_B).squeeze(-1)
    return rewards_B + gamma * (~terminated_B).to(next_v_B.dtype) * next_v_B


def linear_epsilon(step: int, *, start: float, end: float, decay_steps: int) -> float:
    """ε of env step `step`: linear from `start` to `end` over `decay_steps`, then `end`."""
    return end + (start - end) * max(0.0, 1.0 - step / max(1, decay_steps))


@dataclass(frozen=True)
class DQNConfig:
    """DQN hyper-parameters, sized for MinAtar runs of ~10⁵ steps on a CPU (MinAtar's own DQN uses
    a 10⁵-transition buffer, batch 32, target copies every 1,000 updates, ε 1 → 0.1 over 10⁵ steps
    and 5·10⁶ frames; this keeps the buffer and batch and shortens the rest)."""

    lr: float = 3e-4
    adam_eps: float = 1.5e-4
    gamma: float = 0.99
    batch_size: int = 32
    buffer_size: int = 100_000
    learning_starts: int = 2_000
    train_every: int = 4            # env steps per update (replay ratio 1/4, DQN's)
    target_update: int = 500        # updates between target copies
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_steps: int = 20_000
    max_grad_norm: float = 10.0
    double: bool = False

    def __post_init__(self):
        for name in ("batch_size", "buffer_size", "train_every", "target_update", "eps_decay_steps"):
            check_int(name, getattr(self, name), min=1)
        check_int("learning_starts", self.learning_starts, min=0)
        check_number("lr", self.lr, min=0, min_open=True)
        check_number("gamma", self.gamma, min=0, max=1)
        for name in ("eps_start", "eps_end"):
            check_number(name, getattr(self, name), min=0, max=1)
        check_number("max_grad_norm", self.max_grad_norm, min=0)
        check_bool("double", self.double)


def train_dqn(qnet: QNetwork, envs, *, total_steps: int, config: DQNConfig = DQNConfig(),
              seed: int = 0) -> RLTrainResult:
    """Train `qnet` with DQN on a gymnasium vector env for about `total_steps` (valid) env steps.

    Adam from `moekit.optim.build_optimizer`, each update a `moekit.optim.UpdateStep` (global
    clipping to ``max_grad_norm``, the non-finite check) on the Huber TD loss plus the MoE
    layers' balancing loss. Returns episodes ``(env step, 0, return)`` of the online (ε-greedy)
    agent; ``updates`` holds one ``{"step", "loss", "q_mean"}`` dict per 100 updates.
    """
    total_steps = check_int("total_steps", total_steps, min=1)
    c = config
    check_next_step_autoreset(envs)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    target = copy.deepcopy(qnet).requires_grad_(False)
    opt = build_optimizer(qnet, name="adam", lr=c.lr, eps=c.adam_eps)
    update = UpdateStep(qnet, opt, lr=None, grad_clip=c.max_grad_norm)
    obs, _ = envs.reset(seed=seed)
    obs = np.asarray(obs)
    B = obs.shape[0]
    collect = OffPolicyCollector(ReplayBuffer(c.buffer_size, obs.shape[1:], obs.dtype), B)
    logs, t0 = [], time.perf_counter()
    loss_sum, q_sum, n_sum = 0.0, 0.0, 0
    qnet.train()
    while collect.env_steps < total_steps:
        eps = linear_epsilon(collect.env_steps, start=c.eps_start, end=c.eps_end, decay_steps=c.eps_decay_steps)
        with torch.no_grad():
            greedy_B = qnet(torch.from_numpy(obs)).argmax(-1).numpy()
        explore_B = rng.random(B) < eps
        action_B = np.where(explore_B, rng.integers(0, qnet.num_actions, size=B), greedy_B)
        next_obs, reward, terminated, truncated, _ = envs.step(action_B)
        next_obs = np.asarray(next_obs)
        n_valid = collect.record(obs, action_B, reward, next_obs, terminated, truncated)
        obs = next_obs
        for _ in range(collect.updates_due(n_valid, learning_starts=c.learning_starts, train_every=c.train_every)):
            batch = collect.buffer.sample(c.batch_size, rng)
            with torch.no_grad():
                next_q_target = target(batch["next_obs"])
                next_q_online = qnet(batch["next_obs"]) if c.double else None
                y_B = dqn_targets(rewards_B=batch["rewards"], terminated_B=batch["terminated"],
                                  next_q_target_BA=next_q_target, gamma=c.gamma, next_q_online_BA=next_q_online)
            q_B = qnet(batch["obs"]).gather(-1, batch["actions"][:, None]).squeeze(-1)
            td_loss = F.smooth_l1_loss(q_B, y_B)
            info = update(td_loss + aux_loss(qnet))
            loss_sum, q_sum, n_sum = loss_sum + info["loss"], q_sum + float(q_B.detach().mean()), n_sum + 1
            if update.step % c.target_update == 0:
                target.load_state_dict(qnet.state_dict())
            if update.step % 100 == 0:
                logs.append(dict(step=collect.env_steps, loss=loss_sum / n_sum, q_mean=q_sum / n_sum))
                loss_sum, q_sum, n_sum = 0.0, 0.0, 0
    return RLTrainResult(episodes=collect.episodes, updates=logs, env_steps=collect.env_steps,
                         wall_s=time.perf_counter() - t0)
