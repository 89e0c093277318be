"""PMOE mixture policies and SAC (moekit.models.rl.pmoe, METHODS.md RL2): the mixture density against
torch.distributions, K = 1 against SAC's tanh-Gaussian, and short PMOE / SAC runs on a bandit."""
import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from moekit.models.rl import (
    MixtureGaussianPolicy,
    MultiTaskObsEncoder,
    SACConfig,
    TwinQ,
    mixture_log_prob,
    train_sac,
)


def test_mixture_weights_sum_to_one_and_log_prob_is_log_sum_of_weighted_gaussians():
    # METHODS RL2: log π(a) = log Σ_i w_i N(a; μ_i, σ_i), with Σ_i w_i = 1.
    torch.manual_seed(0)
    B, K, A = 6, 3, 2
    logits, mu, log_std = torch.randn(B, K), torch.randn(B, K, A), 0.3 * torch.randn(B, K, A)
    u = torch.randn(B, A)
    w = torch.softmax(logits, -1)
    torch.testing.assert_close(w.sum(-1), torch.ones(B))
    brute = torch.stack([torch.log(sum(w[b, i] * torch.exp(D.Normal(mu[b, i], log_std[b, i].exp()).log_prob(u[b]).sum())
                                       for i in range(K))) for b in range(B)])
    torch.testing.assert_close(mixture_log_prob(u, logits, mu, log_std), brute)
    ref = D.MixtureSameFamily(D.Categorical(logits=logits), D.Independent(D.Normal(mu, log_std.exp()), 1))
    torch.testing.assert_close(mixture_log_prob(u, logits, mu, log_std), ref.log_prob(u))


def test_squashed_log_prob_matches_the_transformed_mixture():
    torch.manual_seed(1)
    pol = MixtureGaussianPolicy(obs_dim=3, action_dim=2, num_experts=4, hidden=16, action_low=-2.0, action_high=2.0)
    obs = torch.randn(5, 3)
    logits, mu, log_std = params = pol(obs)
    base = D.MixtureSameFamily(D.Categorical(logits=logits), D.Independent(D.Normal(mu, log_std.exp()), 1))
    ref = D.TransformedDistribution(base, [D.TanhTransform(), D.AffineTransform(0.0, 2.0)])
    u = 0.8 * torch.randn(5, 2)
    a = 2.0 * torch.tanh(u)
    torch.testing.assert_close(pol.log_prob_pre_squash(u, params), ref.log_prob(a), rtol=1e-4, atol=1e-4)
    act, logp = pol.sample(obs)
    assert act.shape == (5, 2) and logp.shape == (5,) and bool((act.abs() <= 2).all())
    acts, logp_k, lg = pol.sample_each(obs)
    assert acts.shape == (5, 4, 2) and logp_k.shape == (5, 4) and lg.shape == (5, 4)


def test_single_component_is_the_sac_gaussian_policy():
    # K = 1: the gate is a constant and the density is SAC's tanh-squashed diagonal Gaussian.
    torch.manual_seed(2)
    pol = MixtureGaussianPolicy(obs_dim=4, action_dim=3, num_experts=1, hidden=8)
    obs = torch.randn(7, 4)
    logits, mu, log_std = params = pol(obs)
    u = torch.randn(7, 3)
    normal = D.Normal(mu[:, 0], log_std[:, 0].exp())
    sac = normal.log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u) ** 2).sum(-1)
    torch.testing.assert_close(pol.log_prob_pre_squash(u, params), sac, rtol=1e-5, atol=1e-5)
    torch.manual_seed(3)
    det, _ = pol.sample(obs, deterministic=True)
    torch.testing.assert_close(det, torch.tanh(mu[:, 0]))


class _BanditVecEnv:
    """One-step continuous bandit, gymnasium's vector API with next-step autoreset: reward
    ``−(a − 0.5)²`` then the episode terminates. Observation: a constant 1."""

    metadata = {"autoreset_mode": "next-step"}

    def __init__(self, n):
        self.num_envs, self.prev_done = n, np.zeros(n, bool)

    def reset(self, seed=None):
        self.prev_done[:] = False
        return np.ones((self.num_envs, 1), np.float32), {}

    def step(self, a):
        reset = self.prev_done.copy()
        r = -(np.asarray(a)[:, 0] - 0.5) ** 2
        term = np.ones(self.num_envs, bool)
        r[reset], term[reset] = 0.0, False
        self.prev_done = term
        return np.ones((self.num_envs, 1), np.float32), r, term, np.zeros(self.num_envs, bool), {}


@pytest.mark.parametrize("pmoe,K", [(True, 3), (False, 1)])
def test_short_run_finds_the_bandit_optimum(pmoe, K):
    torch.manual_seed(0)
    pol = MixtureGaussianPolicy(obs_dim=1, action_dim=1, num_experts=K, hidden=16)
    critic = TwinQ(obs_dim=1, action_dim=1, hidden=16)
    res = train_sac(pol, critic, _BanditVecEnv(4), total_steps=900, seed=0,
                    config=SACConfig(lr=3e-3, batch_size=32, learning_starts=100, train_every=2, pmoe=pmoe))
    assert res.updates and all(math.isfinite(u["critic_loss"]) for u in res.updates)
    if pmoe:
        assert any(u["gate_loss"] > 0 for u in res.updates)
    with torch.no_grad():
        a, _ = pol.sample(torch.ones(1, 1), deterministic=True)
    # Uniform actions in [−1, 1] average about −0.58. PMOE is slower here: an expert learns only
    # when its sample wins, and the mixture keeps sampling the others (seeds 0, 1: −0.43, −0.28).
    tol, floor = (0.25, -0.45) if pmoe else (0.15, -0.1)
    assert abs(float(a) - 0.5) < tol, float(a)
    late = [r for s, _, r in res.episodes if s > 700]
    assert np.mean(late) > floor, np.mean(late)


class _TaskBanditVecEnv(_BanditVecEnv):
    """Two tasks: env b is task b % 2, whose observation is its one-hot (after one constant state
    feature) and whose best action is +0.5 (task 0) or −0.5 (task 1)."""

    def __init__(self, n):
        super().__init__(n)
        self.task_B = np.arange(n) % 2
        self.obs = np.concatenate([np.ones((n, 1)), np.eye(2)[self.task_B]], 1).astype(np.float32)

    def reset(self, seed=None):
        super().reset(seed)
        return self.obs, {}

    def step(self, a):
        _, r, term, trunc, info = super().step(np.asarray(a) * np.where(self.task_B == 0, 1.0, -1.0)[:, None])
        return self.obs, r, term, trunc, info


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out_dim = torch.nn.Linear(3, 5), 5

    def forward(self, x):
        return self.lin(x)


def test_encoder_goes_before_the_torso_and_each_critic_gets_its_own():
    torch.manual_seed(0)
    pol = MixtureGaussianPolicy(obs_dim=3, action_dim=2, num_experts=2, hidden=8, encoder=_Scaled)
    obs = torch.randn(4, 3)
    logits, mu, log_std = pol(obs)
    h = pol.torso(pol.encoder.lin(obs))
    torch.testing.assert_close(logits, pol.gate(h))
    critic = TwinQ(obs_dim=3, action_dim=2, hidden=8, encoder=_Scaled)
    assert critic.encoders[0] is not critic.encoders[1]
    assert not torch.equal(critic.encoders[0].lin.weight, critic.encoders[1].lin.weight)
    act = torch.rand(4, 2)
    q = critic(obs, act)
    torch.testing.assert_close(q[:, 1:], critic.q[1](torch.cat([critic.encoders[1](obs), act], -1)))
    # without an encoder, the networks are built in the same order as before (same init per seed)
    torch.manual_seed(0)
    plain = TwinQ(obs_dim=3, action_dim=2, hidden=8)
    torch.manual_seed(0)
    ref = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                                  torch.nn.ReLU(), torch.nn.Linear(8, 1)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(plain.q.parameters(), ref.parameters()))
    with pytest.raises(TypeError, match="out_dim"):
        MixtureGaussianPolicy(obs_dim=3, action_dim=1, encoder=lambda: torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="encoder"):
        TwinQ(obs_dim=3, action_dim=1, encoder=torch.nn.Linear(3, 4))


def test_multitask_sac_learns_each_tasks_optimum_through_the_encoder():
    torch.manual_seed(0)

    def enc():
        return MultiTaskObsEncoder("moore", obs_dim=3, num_tasks=2, d_model=8, num_experts=2, d_hidden=8)

    pol = MixtureGaussianPolicy(obs_dim=3, action_dim=1, num_experts=1, hidden=16, encoder=enc)
    critic = TwinQ(obs_dim=3, action_dim=1, hidden=16, encoder=enc)
    envs = _TaskBanditVecEnv(4)
    train_sac(pol, critic, envs, total_steps=1200, seed=0,
              config=SACConfig(lr=3e-3, batch_size=32, learning_starts=100, train_every=2, pmoe=False))
    with torch.no_grad():
        a, _ = pol.sample(torch.from_numpy(envs.obs[:2]), deterministic=True)
    assert float(a[0]) > 0.2 and float(a[1]) < -0.2, a.flatten().tolist()


def test_errors():
    with pytest.raises(ValueError, match="num_experts"):
        MixtureGaussianPolicy(obs_dim=2, action_dim=1, num_experts=0)
    with pytest.raises(ValueError, match="tau"):
        SACConfig(tau=0.0)
