"""PPO on CartPole-v1 with a dense, a top-k MoE and a Soft MoE torso (METHODS.md RL1/RL5).

    pip install 'moekit[rl]'
    python -m projects.ppo_cartpole.run [--seeds 0 1 2] [--steps 50000] [--workers 2] [--quick]

One shared actor-critic torso per agent (`moekit.models.rl`): input projection to D = 64,
two pre-LN residual FFN blocks, policy and value heads. The FFN of each block is

- dense: a 64-unit ReLU MLP (the dense twin of both mixtures);
- MoE: `moekit.MoE`, 8 experts of 32 units, top-2 softmax router (renormalised), the
  Switch balancing loss (coefficient 0.01) added to the PPO loss — the same active
  parameters and FLOPs per sample as the dense MLP, 4× its expert parameters;
- Soft MoE: `moekit.layers.SoftMoE` over the D-vector cut into 4 tokens of 16, 8 experts of
  32 units, one slot each (Obando-Ceron et al. 2024 use Soft MoE in the value network) — the
  same parameters and FLOPs as the dense MLP.

PPO (Schulman et al. 2017) with GAE(0.99, 0.95), 8 environments × 32 steps per update,
4 epochs × 4 minibatches, lr 1e-3 annealed to 0, entropy 0.01 (`moekit.models.rl.train_ppo`:
Adam from `moekit.optim.build_optimizer`, each minibatch step a `moekit.optim.UpdateStep`). Each (method, seed) runs in
its own process with one thread; ``--workers`` processes run at once (2 for a 2-core machine).
Printed: mean episodic return per tenth of training (mean over seeds), the mean return of the
last 10 % of steps (± std over seeds), the mean over the whole run (area under the curve),
wall time, and for the MoE the share of samples per expert in each layer.
"""
from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from moekit.layers import MoEConfig
from moekit.models.rl import ActorCriticConfig, PPOConfig, actor_critic_dense_twin, make_gym_vec_env, train_ppo

MOE = ActorCriticConfig(torso="moe", d_model=64, num_layers=2, d_hidden=32, moe=MoEConfig(num_experts=8, top_k=2))
SOFT = ActorCriticConfig(torso="soft_moe", d_model=64, num_layers=2, d_hidden=32, moe=MoEConfig(num_experts=8),
                        num_tokens=4)
METHODS = {"dense": actor_critic_dense_twin(MOE), "moe": MOE, "soft_moe": SOFT}


def run_one(method: str, seed: int, steps: int, num_envs: int):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    envs = make_gym_vec_env("CartPole-v1", num_envs)
    agent = METHODS[method].build(obs_dim=4, num_actions=2)
    n_params = sum(p.numel() for p in agent.parameters())
    res = train_ppo(agent, envs, total_steps=steps, config=PPOConfig(), seed=seed)
    return method, seed, n_params, res.episodes, res.wall_s, res.usage


def curve(episodes, steps: int, bins: int = 10):
    """Mean return of the episodes that finished in each tenth of training (NaN if none)."""
    out = []
    for i in range(bins):
        r = [ret for s, _, ret in episodes if i * steps / bins < s <= (i + 1) * steps / bins]
        out.append(float(np.mean(r)) if r else float("nan"))
    return out


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=50_000, help="environment steps per run")
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="one seed, 3,000 steps per method (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 3000
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods must be among {list(METHODS)}, got {unknown}")
    t0 = time.perf_counter()
    jobs = [(m, s, args.steps, args.num_envs) for s in args.seeds for m in methods]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(run_one, *zip(*jobs)))
    else:
        results = [run_one(*job) for job in jobs]
    print(f"CartPole-v1, {args.steps} env steps × seeds {args.seeds}, {args.workers} worker processes\n")
    print("mean return per tenth of training (mean over seeds):")
    summary = {}
    for m in methods:
        runs = [r for r in results if r[0] == m]
        curves = np.array([curve(r[3], args.steps) for r in runs])
        final = [float(np.mean([ret for s, _, ret in r[3] if s > 0.9 * args.steps] or [np.nan])) for r in runs]
        auc = [float(np.mean([ret for _, _, ret in r[3]])) for r in runs]
        summary[m] = (runs[0][2], mean_std(final), mean_std(auc), mean_std([r[4] for r in runs]), runs)
        print(f"  {m:9s}" + " ".join(f"{v:6.1f}" for v in np.nanmean(curves, 0)))
    print(f"\n{'method':9s} {'params':>7s} {'final return (last 10%)':>25s} {'mean over run':>16s} {'wall s/run':>11s}")
    for m, (n, (f, fs), (a, as_), (w, ws), _) in summary.items():
        print(f"{m:9s} {n:7d} {f:15.1f} ± {f'{fs:.1f}':7s} {a:8.1f} ± {as_:5.1f} {w:8.1f}")
    for m, (*_, runs) in summary.items():
        usage = runs[0][5]
        if usage is not None and usage.numel():
            for j, u in enumerate(usage[0]):
                print(f"{m} layer {j} expert shares (seed 0, last rollout): " + " ".join(f"{x:.2f}" for x in u))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    return {m: dict(params=n, final=f, final_std=fs, auc=a, auc_std=as_, wall=w)
            for m, (n, (f, fs), (a, as_), (w, _), _) in summary.items()}


if __name__ == "__main__":
    main()
