"""DQN with dense / Soft MoE / top-k MoE penultimate layers (moekit.models.rl.dqn, METHODS.md RL1):
the PerConv tokeniser, head shapes, the TD targets against a hand computation, the replay
buffer, and a short training run on a tiny gridworld with gymnasium's API."""
import copy

import numpy as np
import pytest
import torch

from moekit.layers.moe import MoE, aux_loss
from moekit.layers.soft_moe import SoftMoE
from moekit.models.rl import (
    DQNConfig,
    QNetworkConfig,
    ReplayBuffer,
    dqn_targets,
    linear_epsilon,
    make_gym_vec_env,
    perconv_tokens,
    train_dqn,
)

SMALL = dict(channels=6, d_hidden=16)


def test_perconv_tokens_is_a_lossless_reshape():
    # METHODS RL1: [B, H, W, C] → [B, H·W, C]; token h·W + w is position (h, w)'s channel vector.
    x = torch.randn(3, 5, 7, 4)
    tok = perconv_tokens(x)
    assert tok.shape == (3, 35, 4)
    for h, w in [(0, 0), (2, 3), (4, 6)]:
        torch.testing.assert_close(tok[:, h * 7 + w], x[:, h, w])
    torch.testing.assert_close(tok.reshape(3, 5, 7, 4), x)          # lossless
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        perconv_tokens(torch.randn(3, 35, 4))


@pytest.mark.parametrize("head,extra", [("dense", {"width_mult": 2}), ("soft_moe", {"num_experts": 4}),
                                        ("moe", {"num_experts": 4, "top_k": 1})])
def test_q_network_output_shape_and_heads(head, extra):
    # METHODS RL1: the head's output is [B, num_actions].
    q = QNetworkConfig(head=head, **SMALL, **extra).build(obs_shape=(10, 10, 4), num_actions=5)
    obs = torch.rand(7, 10, 10, 4) > 0.5                             # MinAtar's bool observations
    out = q(obs)
    assert out.shape == (7, 5) and out.dtype == torch.float32
    assert q(obs[:1]).shape == (1, 5)
    kind = {"dense": torch.nn.Linear, "soft_moe": SoftMoE, "moe": MoE}[head]
    assert isinstance(q.penultimate, kind)
    if head == "soft_moe":                                           # total slots = tokens = 8·8
        assert q.penultimate.num_slots == 64 and q.penultimate.num_experts == 4
    if head == "moe":
        assert float(aux_loss(q).detach()) > 0


def test_soft_moe_head_is_per_state():
    # Soft MoE mixes tokens of one state only: each Q-row depends on that state alone.
    q = QNetworkConfig(head="soft_moe", num_experts=2, **SMALL).build(obs_shape=(6, 6, 3), num_actions=3)
    x = torch.rand(5, 6, 6, 3)
    torch.testing.assert_close(q(x)[2:3], q(x[2:3]))


def test_dense_head_widths_and_soft_moe_parameters_grow_with_experts():
    n = lambda cfg: sum(p.numel() for p in cfg.build(obs_shape=(10, 10, 4), num_actions=3).parameters())  # noqa: E731
    C, F, M = 16, 128, 64
    d1, d2 = n(QNetworkConfig(head="dense")), n(QNetworkConfig(head="dense", width_mult=2))
    assert d2 - d1 == (M * C + 1) * F + F * 3                     # one more 128-unit block and its Q weights
    s1, s2 = n(QNetworkConfig(head="soft_moe", num_experts=1)), n(QNetworkConfig(head="soft_moe", num_experts=2))
    expert = 2 * C * F                                           # an MLP expert C → F → C (no biases)
    assert s2 - s1 == expert                                     # total slots fixed: Φ keeps its M columns


def test_dqn_targets_hand_computed_and_double():
    r = torch.tensor([1.0, 0.5, -1.0])
    term = torch.tensor([False, True, False])
    q_t = torch.tensor([[1.0, 3.0], [5.0, 2.0], [0.0, -2.0]])
    y = dqn_targets(rewards_B=r, terminated_B=term, next_q_target_BA=q_t, gamma=0.9)
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.9 * 3.0, 0.5, -1.0 + 0.0]))
    # Double DQN: the online net picks the action, the target net values it.
    q_o = torch.tensor([[2.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    y2 = dqn_targets(rewards_B=r, terminated_B=term, next_q_target_BA=q_t, gamma=0.9, next_q_online_BA=q_o)
    torch.testing.assert_close(y2, torch.tensor([1.0 + 0.9 * 1.0, 0.5, -1.0 + 0.9 * -2.0]))


def test_replay_buffer_ring_and_sampling():
    buf = ReplayBuffer(5, (2,), np.float32)
    for i in range(7):                                           # 7 > capacity: the first two are overwritten
        buf.add(np.full((1, 2), i), np.array([i]), np.array([float(i)]), np.full((1, 2), i + 1), np.array([i == 3]))
    assert len(buf) == 5 and sorted(buf.actions.tolist()) == [2, 3, 4, 5, 6]
    b = buf.sample(64, np.random.default_rng(0))
    assert set(b["actions"].tolist()) <= {2, 3, 4, 5, 6}
    assert torch.all(b["obs"][:, 0] == b["actions"].float()) and torch.all(b["next_obs"][:, 0] == b["obs"][:, 0] + 1)
    assert torch.equal(b["terminated"], b["actions"] == 3)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(3, (2,)).sample(4, np.random.default_rng(0))


def test_linear_epsilon():
    assert linear_epsilon(0, start=1.0, end=0.1, decay_steps=100) == 1.0
    assert linear_epsilon(50, start=1.0, end=0.1, decay_steps=100) == pytest.approx(0.55)
    assert linear_epsilon(10_000, start=1.0, end=0.1, decay_steps=100) == 0.1


def test_errors():
    with pytest.raises(ValueError, match="head must be one of"):
        QNetworkConfig(head="lstm")
    with pytest.raises(ValueError, match="width_mult widens the dense head only"):
        QNetworkConfig(head="soft_moe", width_mult=2)
    with pytest.raises(ValueError, match="top_k must be <= num_experts=2"):
        QNetworkConfig(head="moe", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="kernel=3 does not fit"):
        QNetworkConfig(head="dense").build(obs_shape=(2, 2, 1), num_actions=2)
    q = QNetworkConfig(head="dense", **SMALL).build(obs_shape=(5, 5, 2), num_actions=2)
    with pytest.raises(ValueError, match=r"obs must have shape \(B, 5, 5, 2\)"):
        q(torch.zeros(3, 5, 5, 3))
    with pytest.raises(ValueError, match="gamma"):
        DQNConfig(gamma=1.5)


class _GridVecEnv:
    """A 1 × 5 corridor as a (1, 5, 2) image (agent and goal channels), gymnasium's vector API with
    next-step autoreset: start in the middle, step left/right, +1 at the right end, 0 at the left
    (both terminate), truncated after 10 steps. Optimal return 1, a random policy's about 0.5."""

    metadata = {"autoreset_mode": "next-step"}

    def __init__(self, n):
        self.num_envs, self.pos, self.t = n, np.full(n, 2), np.zeros(n, int)
        self.prev_done = np.zeros(n, bool)

    def _obs(self):
        o = np.zeros((self.num_envs, 1, 5, 2), bool)
        o[np.arange(self.num_envs), 0, self.pos, 0] = True
        o[:, 0, 4, 1] = True
        return o

    def reset(self, seed=None):
        self.pos[:], self.t[:], self.prev_done[:] = 2, 0, False
        return self._obs(), {}

    def step(self, a):
        reset = self.prev_done.copy()
        self.pos = np.clip(self.pos + np.where(a == 1, 1, -1), 0, 4)
        self.t += 1
        term = (self.pos == 0) | (self.pos == 4)
        rew = (self.pos == 4).astype(float)
        trunc = (self.t >= 10) & ~term
        self.pos[reset], self.t[reset] = 2, 0
        rew[reset], term[reset], trunc[reset] = 0.0, False, False
        self.prev_done = term | trunc
        return self._obs(), rew, term, trunc, {}


def test_short_dqn_run_learns_the_corridor():
    torch.manual_seed(0)
    cfg = QNetworkConfig(head="soft_moe", num_experts=2, channels=4, kernel=1, d_hidden=8)
    q = cfg.build(obs_shape=(1, 5, 2), num_actions=2)
    before = copy.deepcopy(q.state_dict())
    res = train_dqn(q, _GridVecEnv(4), total_steps=700, seed=0,
                    config=DQNConfig(lr=1e-2, learning_starts=100, train_every=2, target_update=20,
                                     eps_decay_steps=300, eps_end=0.05, batch_size=32, gamma=0.9))
    assert res.env_steps >= 700 and res.updates and all(np.isfinite(u["loss"]) for u in res.updates)
    assert any(not torch.equal(before[k], v) for k, v in q.state_dict().items())
    late = [r for s, _, r in res.episodes if s > 500]
    assert np.mean(late) > 0.85, np.mean(late)                   # random ≈ 0.5, ε-greedy optimum ≈ 0.97
    # Greedy actions from the start state: right.
    obs, _ = _GridVecEnv(1).reset()
    assert int(q(torch.from_numpy(obs)).argmax()) == 1


def test_train_dqn_refuses_same_step_autoreset():
    env = _GridVecEnv(2)
    env.metadata = {"autoreset_mode": "same-step"}
    q = QNetworkConfig(head="dense", **SMALL, kernel=1).build(obs_shape=(1, 5, 2), num_actions=2)
    with pytest.raises(ValueError, match="next-step autoreset"):
        train_dqn(q, env, total_steps=10)


def test_minatar_through_gymnasium_vector_api():
    pytest.importorskip("gymnasium")
    pytest.importorskip("minatar")
    envs = make_gym_vec_env("MinAtar/Breakout-v1", 2, vectorization_mode="sync")
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 10, 10, 4) and obs.dtype == bool and int(envs.single_action_space.n) == 3
    q = QNetworkConfig(head="soft_moe", num_experts=2, **SMALL).build(obs_shape=obs.shape[1:], num_actions=3)
    res = train_dqn(q, envs, total_steps=200, config=DQNConfig(learning_starts=100, batch_size=8), seed=0)
    assert res.env_steps >= 200 and len(res.episodes) > 0
    assert all(np.isfinite(r) and r >= 0 for _, _, r in res.episodes)      # Breakout: +1 per brick


def test_off_policy_collector_skips_reset_steps_and_counts_updates():
    from moekit.models.rl import OffPolicyCollector
    buf = ReplayBuffer(10, (1,), np.float32)
    col = OffPolicyCollector(buf, 2)
    o = lambda v: np.array([[v], [v + 0.5]], np.float32)          # noqa: E731
    # Step 1: env 1 terminates. Step 2: env 1 resets (invalid), env 0 is truncated.
    # Step 3: env 0 resets (invalid). Rewards of invalid steps are never counted.
    n1 = col.record(o(0), np.array([0, 1]), [1.0, 2.0], o(1), [False, True], [False, False])
    n2 = col.record(o(1), np.array([1, 0]), [3.0, 99.0], o(2), [False, False], [True, False])
    n3 = col.record(o(2), np.array([0, 0]), [99.0, 4.0], o(3), [False, False], [False, False])
    assert (n1, n2, n3) == (2, 1, 1) and col.env_steps == 4 and len(buf) == 4
    assert col.episodes == [(2, 0, 2.0), (3, 0, 4.0)]               # (valid env step, task, return)
    assert buf.rewards[:4].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert buf.terminated[:4].tolist() == [False, True, False, False]
    col2 = OffPolicyCollector(ReplayBuffer(4, (1,)), 1)
    col2.env_steps = 5
    assert col2.updates_due(5, learning_starts=10, train_every=2) == 0     # before learning_starts
    col2.env_steps = 10
    assert [col2.updates_due(n, learning_starts=10, train_every=2) for n in (1, 1, 3, 0)] == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="num_envs"):
        OffPolicyCollector(buf, 0)
