"""MetaWorld MT10, short runs: multi-task SAC with MOORE, CARE or a shared network (METHODS.md RL3, RL4).

    pip install 'moekit[rl,metaworld]'
    python -m projects.metaworld_mt10.run [--seeds 0 1 2] [--steps 20000] [--methods shared,moore,care] [--quick]

One SAC agent (`moekit.models.rl.train_sac`, one Gaussian policy component, learned temperature)
serves the 10 tasks of MT10 (`data.py`: one environment per task, the task's one-hot at the end
of the observation). Actor and each of the two critics start with their own
`moekit.models.rl.MultiTaskObsEncoder` (state → D = 64, then):

- shared: the task embedding added, a dense MLP of hidden E·F = 256, tanh — the multi-task SAC
  baseline of both papers;
- moore: 4 experts of hidden 64, Gram–Schmidt, task weights, tanh (Hendawy et al. 2024);
- care: 4 encoders of hidden 64 mixed by attention from the embedded task description, joined
  with the context (Sodhani et al. 2021).

After training, each task's success rate is measured with the policy's mean action
(``--eval-episodes`` episodes per task, an episode a success if ``info["success"]`` is ever 1).
Printed per method: success rate per task and over MT10 (mean ± std over seeds), the mean
training return of the last 20 % of steps, wall time per run; ``--plot`` the training curves.
Each run is one process with one thread (``torch.set_num_threads(1)``).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moekit.analysis import mean_sd
from moekit.models.rl import (
    MixtureGaussianPolicy,
    MultiTaskObsEncoder,
    SACConfig,
    TwinQ,
    plot_return_curves,
    summarize_runs,
    train_sac,
)
from projects.metaworld_mt10.data import ACTION_DIM, MT10_TASKS, NUM_TASKS, OBS_DIM, descriptions, make_mt10

METHODS = ("shared", "moore", "care")
CONFIG = SACConfig(lr=1e-3, batch_size=128, buffer_size=100_000, learning_starts=2_000, train_every=10,
                   pmoe=False)
QUICK_CONFIG = SACConfig(batch_size=32, learning_starts=200, train_every=10, pmoe=False)


def build_agent(method: str, *, d_model: int = 64, num_experts: int = 4, d_hidden: int = 64, hidden: int = 64):
    """``(policy, critic)`` with `method`'s encoder in front of the actor and of each critic."""
    def encoder():
        return MultiTaskObsEncoder(method, obs_dim=OBS_DIM, num_tasks=NUM_TASKS, d_model=d_model,
                                   num_experts=num_experts, d_hidden=d_hidden, task_metadata=descriptions())

    policy = MixtureGaussianPolicy(obs_dim=OBS_DIM, action_dim=ACTION_DIM, num_experts=1, hidden=hidden,
                                   encoder=encoder)
    return policy, TwinQ(obs_dim=OBS_DIM, action_dim=ACTION_DIM, hidden=hidden, encoder=encoder)


@torch.no_grad()
def success_rates(policy: MixtureGaussianPolicy, envs, *, episodes: int, seed: int,
                  max_steps: int | None = None) -> np.ndarray:
    """Per sub-environment (task), the share of `episodes` episodes with ``info["success"]`` ever
    true, acting with the policy's mean action; `max_steps` cuts every episode short (smoke runs).
    `envs`: a gymnasium vector env with next-step autoreset (the step after an episode's end
    resets it and is not counted)."""
    obs, _ = envs.reset(seed=seed)
    B = envs.num_envs
    success = np.zeros((episodes, B), bool)
    done_eps, ep_len, prev_done = np.zeros(B, int), np.zeros(B, int), np.zeros(B, bool)
    while done_eps.min() < episodes:
        action = policy.sample(torch.as_tensor(np.asarray(obs, np.float32)), deterministic=True)[0].numpy()
        obs, _, terminated, truncated, info = envs.step(action)
        valid = ~prev_done & (done_eps < episodes)
        flag = np.asarray(info.get("success", np.zeros(B)), float) > 0
        flag &= np.asarray(info.get("_success", np.ones(B, bool)), bool)
        rows = np.flatnonzero(valid)
        success[done_eps[rows], rows] |= flag[rows]
        ep_len = np.where(valid, ep_len + 1, ep_len)
        done = np.asarray(terminated, bool) | np.asarray(truncated, bool)
        if max_steps is not None:
            done |= ep_len >= max_steps
        ended = done & valid
        done_eps += ended
        ep_len[ended] = 0
        # A cut-short episode needs a reset; the env's own end resets on the next step.
        prev_done = np.asarray(terminated, bool) | np.asarray(truncated, bool)
        if max_steps is not None and (ended & ~prev_done).any():
            obs, _ = envs.reset(seed=seed + int(done_eps.sum()))
            prev_done = np.zeros(B, bool)
    return success.mean(0)


def run_one(method: str, seed: int, steps: int, config: SACConfig, eval_episodes: int,
            eval_steps: int | None) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    envs = make_mt10(seed)
    policy, critic = build_agent(method)
    res = train_sac(policy, critic, envs, total_steps=steps, config=config, seed=seed)
    t_eval = time.perf_counter()
    success = success_rates(policy, envs, episodes=eval_episodes, seed=seed + 10_000, max_steps=eval_steps)
    envs.close()
    print(f"  done {method} seed {seed}: MT10 success {success.mean():.2f}, train {res.wall_s:.0f} s, "
          f"eval {time.perf_counter() - t_eval:.0f} s", flush=True)
    return dict(method=method, seed=seed, episodes=res.episodes, train_s=res.wall_s, success=success.tolist(),
                params=sum(p.numel() for p in policy.parameters()) + sum(p.numel() for p in critic.parameters()),
                wall=time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None,
                    help="environment steps per run, all 10 tasks together (default 20,000; 600 with --quick)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, among {list(METHODS)}")
    ap.add_argument("--eval-episodes", type=int, default=2, help="evaluation episodes per task")
    ap.add_argument("--plot", default=None, help="write the training return curves to this PNG")
    ap.add_argument("--quick", action="store_true",
                    help="one seed, 600 steps, evaluation episodes cut at 20 steps (a smoke run)")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods must be among {list(METHODS)}, got {unknown}")
    config, eval_steps = CONFIG, None
    if args.quick:
        args.seeds, args.eval_episodes, config, eval_steps = args.seeds[:1], 1, QUICK_CONFIG, 20
    steps = args.steps or (600 if args.quick else 20_000)
    t0 = time.perf_counter()
    results = [run_one(m, s, steps, config, args.eval_episodes, eval_steps) for s in args.seeds for m in methods]
    runs = {m: [(r["episodes"], r["wall"]) for r in results if r["method"] == m] for m in methods}
    summary = summarize_runs(runs, steps, late_frac=0.2)
    print(f"\nMetaWorld MT10, SAC, {steps} env steps per run ({steps // NUM_TASKS} per task), seeds {args.seeds}, "
          f"{args.eval_episodes} eval episodes per task\n")
    short = [t.removesuffix("-v3") for t in MT10_TASKS]
    print("| method | params | " + " | ".join(short) + " | MT10 success | return, last 20 % | wall s / run |")
    print("|---|---|" + "---|" * len(short) + "---|---|---|")
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        succ = np.array([r["success"] for r in rs])               # (seeds, tasks)
        s = summary[m]
        s.update(success=mean_sd(succ.mean(1)), success_per_task=succ.mean(0).tolist(), params=rs[0]["params"])
        print(f"| {m} | {rs[0]['params']:,} | " + " | ".join(f"{v:.2f}" for v in succ.mean(0))
              + f" | {s['success'][0]:.2f} ± {s['success'][1]:.2f} | {s['final']:.0f} ± {s['final_std']:.0f} | "
              f"{s['wall']:.0f} |")
    if args.plot:
        plot_return_curves(summary, steps, args.plot, f"MetaWorld MT10, SAC ({len(args.seeds)} seeds)")
        print(f"\ncurves: {args.plot}")
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
