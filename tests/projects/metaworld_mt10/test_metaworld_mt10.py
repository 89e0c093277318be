"""projects/metaworld_mt10: the success-rate evaluation on a scripted vector env, the agents'
encoders and sizes, and the MT10 env builder (when metaworld is installed)."""
import numpy as np
import pytest
import torch

from moekit.models.rl import MultiTaskObsEncoder
from projects.metaworld_mt10.data import MT10_TASKS, OBS_DIM, descriptions
from projects.metaworld_mt10.run import METHODS, build_agent, main, success_rates


class _ScriptedVecEnv:
    """B envs with next-step autoreset; env b's episodes last 3 steps and succeed (``info["success"]``
    on their second step) when the action's first entry has the sign of ``goal[b]``."""

    metadata = {"autoreset_mode": "next-step"}

    def __init__(self, goal):
        self.goal, self.num_envs = np.asarray(goal, float), len(goal)
        self.t, self.prev_done, self.resets = np.zeros(self.num_envs, int), np.zeros(self.num_envs, bool), 0

    def reset(self, seed=None):
        self.t[:], self.prev_done[:] = 0, False
        self.resets += 1
        return np.zeros((self.num_envs, OBS_DIM), np.float32), {}

    def step(self, action):
        reset = self.prev_done.copy()
        self.t = np.where(reset, 0, self.t + 1)
        success = (self.t == 2) & (np.sign(action[:, 0]) == np.sign(self.goal)) & ~reset
        done = (self.t >= 3) & ~reset
        self.prev_done = done
        info = {"success": success.astype(float), "_success": ~reset}
        return np.zeros((self.num_envs, OBS_DIM), np.float32), np.zeros(self.num_envs), done, \
            np.zeros(self.num_envs, bool), info


class _SignPolicy:
    def __init__(self, sign_B):
        self.sign_B = torch.as_tensor(sign_B, dtype=torch.float32)

    def sample(self, obs, deterministic=False):
        assert deterministic
        return self.sign_B[:, None].expand(obs.shape[0], 4).clone(), None


def test_success_rates_count_each_episode_once_per_env():
    envs = _ScriptedVecEnv([1, -1, 1])
    rates = success_rates(_SignPolicy([1, 1, -1]), envs, episodes=4, seed=0)
    assert rates.tolist() == [1.0, 0.0, 0.0]
    # cut-short episodes (max_steps=1) never reach the successful second step, and reset the env
    envs = _ScriptedVecEnv([1, 1])
    assert success_rates(_SignPolicy([1, 1]), envs, episodes=2, seed=0, max_steps=1).tolist() == [0.0, 0.0]
    assert envs.resets > 1


def test_agents_use_the_methods_encoders_at_comparable_sizes():
    sizes = {}
    for m in METHODS:
        torch.manual_seed(0)
        policy, critic = build_agent(m)
        assert isinstance(policy.encoder, MultiTaskObsEncoder) and policy.encoder.kind == m
        assert all(isinstance(e, MultiTaskObsEncoder) for e in critic.encoders)
        obs = torch.cat([torch.randn(10, OBS_DIM - 10), torch.eye(10)], 1)
        action, logp = policy.sample(obs)
        assert action.shape == (10, 4) and action.abs().max() <= 1 and critic(obs, action).shape == (10, 2)
        sizes[m] = sum(p.numel() for p in policy.parameters()) + sum(p.numel() for p in critic.parameters())
    assert abs(sizes["shared"] - sizes["moore"]) / sizes["moore"] < 0.02
    assert sizes["care"] < 1.3 * sizes["moore"]
    assert len(descriptions()) == len(MT10_TASKS) == 10 and len(set(descriptions())) == 10


def test_mt10_envs_give_one_hot_observations():
    pytest.importorskip("metaworld")
    from projects.metaworld_mt10.data import make_mt10
    envs = make_mt10(0)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (10, OBS_DIM) and (obs[:, -10:].argmax(1) == np.arange(10)).all()
    _, _, _, _, info = envs.step(np.zeros((10, 4), np.float32))
    assert "success" in info
    envs.close()


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        main(["--quick", "--methods", "lstm"])
