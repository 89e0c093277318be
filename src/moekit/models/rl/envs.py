"""Vector environments with gymnasium's API and next-step autoreset.

moekit's RL loops run on gymnasium's vector API (`make_gym_vec_env`: ``gymnasium.make_vec``,
`gymnasium.vector.SyncVectorEnv`, MinAtar included; extra ``rl``). Beside it, pure-numpy vector
envs with the same API: `CartPoleVecEnv`, a fast path for CartPole-v1 that needs no gymnasium
and steps all environments in one array operation (a test checks it step for step against
gymnasium's CartPole-v1), and `ReachVecEnv`, a toy task for tests; `MultiTaskVecEnv` puts
several vector envs side by side.

Legend: B parallel environments, O observation features, A actions, L tasks.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np

from moekit.validate import check_choice, check_int

__all__ = ["CartPoleVecEnv", "ReachVecEnv", "MultiTaskVecEnv", "make_gym_vec_env"]


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
        arm = self.length * (4.0 / 3.0 - self.masspole * cos ** 2 / total_mass)
        theta_acc = (self.gravity * sin - cos * temp) / arm
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


def make_gym_vec_env(env_id: str, num_envs: int, *, vectorization_mode: Optional[str] = None, **kwargs):
    """A gymnasium vector env: ``gymnasium.make_vec(env_id, num_envs, ...)`` (next-step autoreset).

    ``vectorization_mode=None`` takes the env's own vectorised implementation where it has one
    (CartPole-v1 does) and `gymnasium.vector.SyncVectorEnv` otherwise; ``"sync"`` / ``"async"``
    force gymnasium's wrappers. ``"MinAtar/<Game>-v0|v1"`` ids (Young & Tian 2019; v1 = the
    game's minimal action set) are registered on first use from the ``minatar`` package, and
    ``"MiniGrid-..."`` ids (Chevalier-Boisvert et al. 2023) from the ``minigrid`` package.
    `kwargs` go to the env's constructor. Needs the optional extra: ``pip install 'moekit[rl]'``.
    """
    check_int("num_envs", num_envs, min=1)
    check_choice("vectorization_mode", vectorization_mode, ("sync", "async", "vector_entry_point"), allow_none=True)
    try:
        import gymnasium as gym
    except ImportError as e:
        raise ImportError("moekit.models.rl.make_gym_vec_env needs gymnasium; install the extra with "
                          "pip install 'moekit[rl]'") from e
    if env_id.startswith("MinAtar/") and env_id not in gym.registry:
        _register_minatar(gym)
    if env_id.startswith(("MiniGrid-", "BabyAI-")) and env_id not in gym.registry:
        try:
            import minigrid  # noqa: F401  (registers its environments with gymnasium on import)
        except ImportError as e:
            raise ImportError("MiniGrid environments need the minigrid package; install the extra with "
                              "pip install 'moekit[rl]'") from e
    if vectorization_mode is not None:
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=vectorization_mode, **kwargs)
    try:
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)
    except (gym.error.Error, ValueError, TypeError):
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync", **kwargs)


def _register_minatar(gym) -> None:
    # minatar's modules log a warning at import when seaborn (only needed to render) is absent.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import minatar.gym
    except ImportError as e:
        raise ImportError("MinAtar environments need the minatar package; install the extra with "
                          "pip install 'moekit[rl]'") from e
    finally:
        logger.setLevel(level)
    minatar.gym.register_envs()
