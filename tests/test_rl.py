"""PPO with MoE torsos (moekit.models.rl): GAE and the clipped loss against hand-computed and
brute-force references, network contracts, the numpy environments, and a short training run.
None of it needs gymnasium; one test checks our CartPole against gymnasium's when installed."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from moekit.layers import MoEConfig
from moekit.layers.moe import MoE, aux_loss
from moekit.models.rl import (
    ActorCriticConfig,
    CartPoleVecEnv,
    MultiTaskVecEnv,
    PPOConfig,
    ReachVecEnv,
    RolloutCollector,
    actor_critic_dense_twin,
    clipped_policy_loss,
    gae_advantages,
    late_return,
    make_gym_vec_env,
    return_curve,
    train_ppo,
)

SMALL = dict(d_model=16, num_layers=2, d_hidden=8, moe=MoEConfig(num_experts=4, top_k=2), num_tokens=4)


def _gae(rewards, values, last, term, trunc, gamma, lam):
    t = lambda x, dt=torch.float64: torch.tensor(x, dtype=dt)  # noqa: E731
    return gae_advantages(rewards_TB=t(rewards), values_TB=t(values), last_value_B=t(last),
                          terminated_TB=t(term, torch.bool), truncated_TB=t(trunc, torch.bool), gamma=gamma, lam=lam)


def test_gae_hand_computed():
    # Three columns over T = 3: no episode end; terminated at t = 1; truncated at t = 1.
    # γ = 0.9, λ = 0.8; δ_0 = 1 + 0.9·1 − 0.5 = 1.4, δ_1 = 2 + 0.9·1.5 − 1 = 2.35 (bootstrapped)
    # or 1.0 (terminated), δ_2 = 3 + 0.9·2 − 1.5 = 3.3; A_t = δ_t + 0.72·(1 − done_t)·A_{t+1}.
    r = [[1, 1, 1], [2, 2, 2], [3, 3, 3]]
    v = [[0.5] * 3, [1.0] * 3, [1.5] * 3]
    F, T = False, True
    adv, ret = _gae(r, v, [2.0] * 3, [[F, F, F], [F, T, F], [F, F, F]], [[F, F, F], [F, F, T], [F, F, F]], 0.9, 0.8)
    expected = torch.tensor([[1.4 + 0.72 * (2.35 + 0.72 * 3.3), 1.4 + 0.72 * 1.0, 1.4 + 0.72 * 2.35],
                             [2.35 + 0.72 * 3.3, 1.0, 2.35],
                             [3.3, 3.3, 3.3]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + torch.tensor(v, dtype=torch.float64))


def test_gae_lambda_one_is_the_discounted_sum():
    # λ = 1: the return is the discounted reward sum to the episode's end (or the rollout's),
    # plus γ^k times the value after it unless the episode terminated.
    g = torch.Generator().manual_seed(0)
    T, B, gamma = 13, 5, 0.95
    r = torch.randn(T, B, generator=g, dtype=torch.float64)
    v = torch.randn(T, B, generator=g, dtype=torch.float64)
    last = torch.randn(B, generator=g, dtype=torch.float64)
    term = torch.rand(T, B, generator=g) < 0.15
    trunc = (torch.rand(T, B, generator=g) < 0.15) & ~term
    _, ret = gae_advantages(rewards_TB=r, values_TB=v, last_value_B=last, terminated_TB=term, truncated_TB=trunc,
                            gamma=gamma, lam=1.0)
    next_v = torch.cat([v[1:], last[None]])
    for b in range(B):
        for t in range(T):
            total, k = 0.0, t
            while True:
                total += gamma ** (k - t) * float(r[k, b])
                if term[k, b]:
                    break
                if trunc[k, b] or k == T - 1:
                    total += gamma ** (k - t + 1) * float(next_v[k, b])
                    break
                k += 1
            assert math.isclose(float(ret[t, b]), total, rel_tol=1e-10, abs_tol=1e-10)


def test_clipped_policy_loss_matches_piecewise_formula():
    # Schulman et al. 2017, Fig. 1: for A > 0 the ratio is capped at 1 + ε, for A < 0 floored at 1 − ε.
    g = torch.Generator().manual_seed(1)
    new, old, adv = (torch.randn(97, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
    eps = 0.2
    terms = []
    for n in range(97):
        ratio = math.exp(float(new[n] - old[n]))
        a = float(adv[n])
        terms.append(min(ratio, 1 + eps) * a if a >= 0 else max(ratio, 1 - eps) * a)
    got = clipped_policy_loss(logp_new_N=new, logp_old_N=old, adv_N=adv, clip_eps=eps)
    assert math.isclose(float(got), -sum(terms) / 97, rel_tol=1e-12)
    with pytest.raises(ValueError, match="clip_eps"):
        clipped_policy_loss(logp_new_N=new, logp_old_N=old, adv_N=adv, clip_eps=1.5)


@pytest.mark.parametrize("torso", ["dense", "moe", "soft_moe"])
def test_network_shapes_and_aux_loss(torso):
    agent = ActorCriticConfig(torso=torso, **SMALL).build(obs_dim=5, num_actions=3)
    logits, value = agent(torch.randn(7, 5))
    assert logits.shape == (7, 3) and value.shape == (7,)
    aux = aux_loss(agent)
    if torso == "moe":
        assert aux.requires_grad and float(aux.detach()) > 0      # Switch balancing loss ≥ coef · 1
        aux.backward()
        assert all(m.router.weight.grad is not None for m in agent.modules() if isinstance(m, MoE))
    else:
        assert float(aux) == 0.0
    one_logits, _ = agent(torch.randn(1, 5))             # a single state
    assert one_logits.shape == (1, 3)


def test_soft_moe_samples_do_not_interact():
    # Tokens come from one sample only: a state's outputs do not depend on the rest of the batch.
    agent = ActorCriticConfig(torso="soft_moe", **SMALL).build(obs_dim=4, num_actions=2)
    x = torch.randn(6, 4)
    full_logits, full_v = agent(x)
    one_logits, one_v = agent(x[2:3])
    torch.testing.assert_close(full_logits[2:3], one_logits)
    torch.testing.assert_close(full_v[2:3], one_v)


def test_dense_twin_has_the_active_parameters():
    def bank(agent):
        return sum(p.numel() for blk in agent.blocks for p in blk.ffn.experts.parameters()) if \
            hasattr(agent.blocks[0].ffn,
                    "experts") else sum(p.numel() for blk in agent.blocks for p in blk.ffn.parameters())

    total = lambda a: sum(p.numel() for p in a.parameters())  # noqa: E731
    moe_cfg = ActorCriticConfig(torso="moe", **SMALL)
    moe = moe_cfg.build(obs_dim=4, num_actions=2)
    twin = actor_critic_dense_twin(moe_cfg).build(obs_dim=4, num_actions=2)
    E, K, L, D = moe_cfg.moe.num_experts, moe_cfg.moe.top_k, moe_cfg.num_layers, moe_cfg.d_model
    assert bank(twin) == bank(moe) * K // E
    assert total(twin) == total(moe) - bank(moe) * (E - K) // E - L * E * D      # minus the routers
    soft_cfg = ActorCriticConfig(torso="soft_moe", **SMALL)                     # P = 1: same params
    soft = soft_cfg.build(obs_dim=4, num_actions=2)
    soft_twin = actor_critic_dense_twin(soft_cfg)
    assert soft_twin.d_hidden == soft_cfg.moe.num_experts * soft_cfg.d_hidden // soft_cfg.num_tokens
    assert bank(soft_twin.build(obs_dim=4, num_actions=2)) == bank(soft)
    assert actor_critic_dense_twin(soft_twin) == soft_twin


def test_multitask_masks_missing_actions_and_routes_by_task():
    agent = ActorCriticConfig(torso="moe", **SMALL).build(obs_dim=4, num_actions=[2, 3], num_tasks=2)
    task = torch.tensor([0, 1, 0, 1])
    logits, value = agent(torch.randn(4, 4), task)
    probs = torch.softmax(logits, -1)
    assert torch.all(probs[task == 0, 2] == 0) and torch.all(probs[task == 1] > 0)
    with pytest.raises(ValueError, match="task ids"):
        agent(torch.randn(4, 4))


def test_cartpole_next_step_autoreset_and_episode_returns():
    env = CartPoleVecEnv(3, max_episode_steps=30)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, 4) and obs.dtype == np.float32 and np.all(np.abs(obs) <= 0.05)
    agent = ActorCriticConfig(torso="dense", **SMALL).build(obs_dim=4, num_actions=2)
    col = RolloutCollector(env, seed=0)
    ro = col.collect(agent, 100)
    done = ro.terminated_TB | ro.truncated_TB
    # The row after every episode end is a reset row: invalid, reward 0, not done.
    assert torch.equal(ro.valid_TB[1:], ~done[:-1]) and ro.valid_TB[0].all()
    assert torch.all(ro.rewards_TB[~ro.valid_TB] == 0) and not done[~ro.valid_TB].any()
    assert ro.truncated_TB.any()                        # some episodes reach the 30-step limit
    # Reward is 1 per step, so each return equals its length ≤ 30, and one episode per done row.
    assert len(col.episodes) == int(done.sum()) and all(1 <= ret <= 30 for _, _, ret in col.episodes)
    assert col.env_steps == int(ro.valid_TB.sum())


def test_cartpole_matches_gymnasium_step_for_step():
    gym = pytest.importorskip("gymnasium")
    genv = gym.make("CartPole-v1").unwrapped
    ours = CartPoleVecEnv(1)
    rng = np.random.default_rng(0)
    for episode in range(5):
        obs, _ = genv.reset(seed=episode)
        ours.reset()                                      # clears the pending next-step reset
        ours.state_4B[:, 0] = genv.state
        for _ in range(500):
            a = int(rng.integers(2))
            g_obs, g_r, g_term, _, _ = genv.step(a)
            o_obs, o_r, o_term, _, _ = ours.step(np.array([a]))
            np.testing.assert_array_equal(o_obs[0], g_obs)
            assert o_r[0] == g_r and bool(o_term[0]) == g_term
            if g_term:
                break
        assert g_term                                     # random actions end every episode


@pytest.mark.parametrize("mode", ["vector_entry_point", "sync"])
def test_rollouts_on_gymnasium_vector_envs(mode):
    # gymnasium's own vectorised CartPole and its SyncVectorEnv wrapper give the same rollout
    # contract as the numpy fast path: next-step reset rows invalid, one episode per done row.
    pytest.importorskip("gymnasium")
    envs = make_gym_vec_env("CartPole-v1", 3, vectorization_mode=mode, max_episode_steps=15)
    agent = ActorCriticConfig(torso="soft_moe", **SMALL).build(obs_dim=4, num_actions=2)
    col = RolloutCollector(envs, seed=0)
    ro = col.collect(agent, 60)
    done = ro.terminated_TB | ro.truncated_TB
    assert torch.equal(ro.valid_TB[1:], ~done[:-1]) and ro.truncated_TB.any()
    assert len(col.episodes) == int(done.sum()) and all(1 <= r <= 15 for _, _, r in col.episodes)
    with pytest.raises(ValueError, match="vectorization_mode must be one of"):
        make_gym_vec_env("CartPole-v1", 2, vectorization_mode="threads")


def test_return_curve_and_late_return_bin_episodes_by_their_last_step():
    episodes = [(10, 0, 1.0), (50, 1, 3.0), (51, 0, 5.0), (60, 0, 7.0), (95, 1, 2.0)]  # (env step, task, return)
    out = return_curve(episodes, steps=100, bins=4)           # bins (0, 25], (25, 50], (50, 75], (75, 100]
    assert out == [1.0, 3.0, 6.0, 2.0]
    assert math.isnan(return_curve(episodes, steps=100, bins=4, task=0)[3])
    assert late_return(episodes, 100, 0.5) == pytest.approx((5.0 + 7.0 + 2.0) / 3)
    assert math.isnan(late_return(episodes, 100, 0.01))
    # per task (moved from projects/moore_minigrid's task_returns): window (50, 100] of task 0, (90, 100] of task 1
    assert late_return(episodes, 100, 0.5, task=0) == 6.0
    assert late_return(episodes, 100, 0.1, task=1) == 2.0
    assert math.isnan(late_return(episodes, 100, 0.5, task=2))


def _reach_return(agent, seed):
    """Mean return of the episodes that end within 60 steps of 64 fresh Reach envs (≥ 2 each)."""
    col = RolloutCollector(ReachVecEnv(64), seed=seed)
    col.collect(agent, 60)
    return float(np.mean([r for _, _, r in col.episodes]))


def test_short_ppo_run_on_reach_improves_return():
    torch.manual_seed(0)
    agent = ActorCriticConfig(torso="moe", **SMALL).build(obs_dim=2, num_actions=3)
    before = _reach_return(agent, seed=100)
    res = train_ppo(agent, ReachVecEnv(16), total_steps=3000, config=PPOConfig(num_steps=16, lr=3e-3), seed=0)
    after = _reach_return(agent, seed=101)
    assert before < 0.3 and after > 0.7, (before, after)    # random ≈ −0.07, optimal ≈ +0.85
    assert all(np.isfinite(u["aux_loss"]) and u["aux_loss"] > 0 for u in res.updates)
    assert res.usage.shape == (1, 2, 4) and torch.allclose(res.usage.sum(-1), torch.ones(1, 2))


def test_multitask_env_and_training_runs():
    env = MultiTaskVecEnv([CartPoleVecEnv(3), ReachVecEnv(2)])
    obs, _ = env.reset(seed=0)
    assert obs.shape == (5, 4) and np.all(obs[3:, 2:] == 0)        # Reach padded from 2 to 4 features
    assert env.task_ids.tolist() == [0, 0, 0, 1, 1] and env.action_counts == [2, 3]
    agent = ActorCriticConfig(torso="moe", **SMALL).build(obs_dim=4, num_actions=env.action_counts, num_tasks=2)
    res = train_ppo(agent, env, total_steps=300, config=PPOConfig(num_steps=16), seed=0)
    assert {t for _, t, _ in res.episodes} == {0, 1}
    assert res.usage.shape == (2, 2, 4)


def test_ppo_update_steps_through_update_step_with_clipping():
    """Each minibatch is one moekit.optim.UpdateStep call: epochs × minibatches steps, the global
    gradient norm clipped to max_grad_norm, and a raw optimizer refused."""
    from moekit.models.rl import ppo_update
    from moekit.optim import UpdateStep, build_optimizer
    torch.manual_seed(0)
    agent = ActorCriticConfig(torso="moe", **SMALL).build(obs_dim=4, num_actions=2)
    rollout = RolloutCollector(CartPoleVecEnv(4), seed=0).collect(agent, 16)
    opt = build_optimizer(agent, name="adam", lr=1e-3, eps=1e-5)
    update = UpdateStep(agent, opt, lr=None, grad_clip=1e-3)
    norms = []
    real_step = opt.step

    def step_after_clip(*a, **k):
        norms.append(float(torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in agent.parameters() if p.grad is not None]))))
        return real_step(*a, **k)

    opt.step = step_after_clip
    cfg = PPOConfig(epochs=2, minibatches=3)
    ppo_update(agent, update, rollout, config=cfg, generator=torch.Generator().manual_seed(0))
    assert update.step == len(norms) == 2 * 3
    assert all(n <= 1e-3 * (1 + 1e-5) for n in norms)
    assert opt.param_groups[0]["lr"] == 1e-3                     # lr=None: the caller's lr is left alone
    with pytest.raises(TypeError, match="UpdateStep"):
        ppo_update(agent, opt, rollout, config=cfg)


def test_errors():
    with pytest.raises(ValueError, match="torso must be one of"):
        ActorCriticConfig(torso="lstm")
    with pytest.raises(ValueError, match="multiple of num_tokens"):
        ActorCriticConfig(torso="soft_moe", d_model=10, num_tokens=4)
    with pytest.raises(ValueError, match="top_k must be <= num_experts=4, got top_k=5"):
        ActorCriticConfig(torso="moe", moe=MoEConfig(num_experts=4, top_k=5))
    agent = ActorCriticConfig(torso="dense", **SMALL).build(obs_dim=4, num_actions=2)
    with pytest.raises(ValueError, match=r"obs must have shape \(B, 4\)"):
        agent(torch.randn(3, 5))
    env = CartPoleVecEnv(2)
    env.metadata = {"autoreset_mode": "same-step"}
    with pytest.raises(ValueError, match="next-step autoreset"):
        RolloutCollector(env)
    with pytest.raises(ValueError, match="actions must be ints"):
        ReachVecEnv(2).step(np.array([0, 3]))


def test_missing_gymnasium_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)         # makes `import gymnasium` raise ImportError
    with pytest.raises(ImportError, match=r"moekit\[rl\]"):
        make_gym_vec_env("CartPole-v1", 2)


def test_importing_models_does_not_import_gymnasium():
    code = "import sys, moekit.models, moekit.models.rl; print('gymnasium' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_summarize_runs_against_a_hand_computed_summary(tmp_path):
    import math
    import statistics

    from moekit.models.rl import plot_return_curves, summarize_runs
    # Two seeds over 100 steps, 2 bins: seed 0 has episodes in both halves, seed 1 only in the second.
    runs = {"a": [([(10, 0, 1.0), (60, 0, 3.0), (95, 0, 5.0)], 2.0), ([(70, 0, 7.0)], 4.0)]}
    s = summarize_runs(runs, 100, late_frac=0.1, bins=2)["a"]
    assert s["curves"].shape == (2, 2) and math.isnan(s["curves"][1, 0])
    assert s["curve"] == [1.0, statistics.mean([4.0, 7.0])]                 # NaN bins left out of the mean
    assert math.isnan(s["final"])                                            # seed 1 has no late episode
    assert s["auc"] == statistics.mean([3.0, 7.0]) and s["auc_std"] == statistics.stdev([3.0, 7.0])
    assert (s["wall"], s["wall_std"]) == (3.0, statistics.stdev([2.0, 4.0]))
    one = summarize_runs({"b": [([(95, 0, 2.0)], 1.0)]}, 100)["b"]
    assert (one["final"], one["final_std"], one["wall_std"]) == (2.0, 0.0, 0.0)
    by_task = summarize_runs(runs, 100, late_frac=0.5, bins=2, task=0)["a"]   # every episode is task 0
    assert by_task["curve"] == summarize_runs(runs, 100, late_frac=0.5, bins=2)["a"]["curve"]
    mixed = {"m": [([(10, 0, 1.0), (20, 1, 9.0), (60, 1, 3.0), (95, 0, 5.0)], 2.0)]}
    t1 = summarize_runs(mixed, 100, late_frac=0.5, bins=2, task=1)["m"]
    assert t1["curve"] == [9.0, 3.0] and t1["final"] == 3.0 and t1["auc"] == 6.0 and t1["wall"] == 2.0
    assert math.isnan(summarize_runs(mixed, 100, task=2)["m"]["auc"])
    with pytest.raises(ValueError, match="at least one"):
        summarize_runs({"c": []}, 100)
    pytest.importorskip("matplotlib")
    plot_return_curves({"a": s}, 100, str(tmp_path / "c.png"), "t", dashed=("a",))
    assert (tmp_path / "c.png").stat().st_size > 0
