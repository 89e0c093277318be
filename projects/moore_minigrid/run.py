"""Multi-task PPO on MiniGrid: shared network, learned and hard task routing, MOORE, CARE (METHODS.md RL3–RL5).

    pip install 'moekit[rl]'
    python -m projects.moore_minigrid.run [--seeds 0 1 2] [--steps 45000] [--workers 2] [--quick]
    python -m projects.moore_minigrid.run --continual [--steps 45000]     # RL5: the tasks in sequence

One PPO agent (`moekit.models.rl.train_ppo`) serves every task of the set (task id known); the
torsos are `moekit.models.rl.ActorCriticConfig` kinds, all of width D = 64 after a shared input
projection of the 147-feature view (`data.py`):

- shared: one dense residual block (task embedding added to the input), hidden width chosen so
  that its parameter count matches the mixtures' (the "same parameters" baseline);
- task_moe: the block's FFN is `moekit.MoE` with the learned task router (Task-MoE), 4 experts
  of 64, top-2 — routing learned from the task id;
- hard_task_moe: the block's FFN sends task t to expert t (Willi et al. 2024), 3 experts of 64;
- moore: 4 experts of 64 orthonormalised by Gram–Schmidt, task weights, tanh (Hendawy et al. 2024);
- care: 4 encoders of 64 mixed by attention from the embedded task description, joined with the
  context (Sodhani et al. 2021).

Each task has its own value output; the policy head is shared (7 MiniGrid actions). Printed: the
mean return per task over the last 10 % of steps (± std over seeds), the mean over tasks, the
mean return of all the run's episodes (episode-weighted area under the curve), parameters and
wall time per run; ``returns.png`` has the curves.

``--continual``: the same agent trains on the tasks one after another (``--steps`` / L steps each,
a fresh Adam per task), and after each phase every task is evaluated (``--eval-episodes``
episodes, sampled actions). Forgetting of task i = its return right after its own phase minus its
return at the end; forward transfer of task i ≥ 1 = the area under its learning curve during its
phase minus that of the same method trained on task i alone from scratch (run here too).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from moekit.layers import MoEConfig
from moekit.models.rl import (
    ActorCriticConfig,
    PPOConfig,
    RolloutCollector,
    late_return,
    return_curve,
    summarize_runs,
    train_ppo,
)
from projects.moore_minigrid.data import NUM_ACTIONS, OBS_DIM, TASK_SETS, descriptions, make_task_envs

D, F = 64, 64
METHODS = {
    "shared": ActorCriticConfig(torso="dense", d_model=D, num_layers=1, d_hidden=4 * F),
    "task_moe": ActorCriticConfig(torso="task_moe", d_model=D, num_layers=1, d_hidden=F,
                                  moe=MoEConfig(num_experts=4, top_k=2)),
    "hard_task_moe": ActorCriticConfig(torso="hard_task_moe", d_model=D, num_layers=1, d_hidden=F,
                                       moe=MoEConfig(num_experts=3, top_k=1)),
    "moore": ActorCriticConfig(torso="moore", d_model=D, num_layers=0, d_hidden=F, moe=MoEConfig(num_experts=4)),
    "care": ActorCriticConfig(torso="care", d_model=D, num_layers=0, d_hidden=F, moe=MoEConfig(num_experts=4),
                              metadata_dim=32),
}
CONTINUAL_METHODS = ("shared", "task_moe", "hard_task_moe", "moore")
PPO = PPOConfig(num_steps=32, lr=1e-3, epochs=4, minibatches=4, ent_coef=0.01)
QUICK_PPO = replace(PPO, epochs=1, minibatches=1)           # --quick: a smoke run of every code path


def build_agent(method: str, tasks) -> torch.nn.Module:
    return METHODS[method].build(obs_dim=OBS_DIM, num_actions=NUM_ACTIONS, num_tasks=len(tasks),
                                 task_metadata=descriptions(tasks))


def mean_return(episodes) -> float:
    """Mean return over all of a run's episodes (the area under its learning curve); NaN if none."""
    return float(np.mean([r for *_, r in episodes])) if episodes else math.nan


def run_one(method: str, seed: int, steps: int, tasks, num_envs: int, ppo: PPOConfig = PPO):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    agent = build_agent(method, tasks)
    envs = make_task_envs(tasks, num_envs)
    res = train_ppo(agent, envs, total_steps=steps, config=ppo, seed=seed)
    return dict(method=method, seed=seed, params=sum(p.numel() for p in agent.parameters()),
                episodes=res.episodes, wall=res.wall_s)


# ---------------------------------------------------------------------------------------------
# RL5: tasks in sequence
def single_task_envs(tasks, task: int, num_envs: int):
    """Task `task`'s vector env alone, its rows labelled with that task id."""
    envs = make_task_envs([tasks[task]], num_envs)
    envs.task_ids = np.full(envs.num_envs, task)
    return envs


def evaluate(agent, tasks, task: int, episodes: int, num_envs: int, seed: int) -> float:
    """Mean return of `episodes` episodes of `task` with actions sampled from the policy."""
    collector = RolloutCollector(single_task_envs(tasks, task, num_envs), seed=seed)
    agent.eval()
    while len(collector.episodes) < episodes:
        collector.collect(agent, 32)
    agent.train()
    return float(np.mean([r for *_, r in collector.episodes[:episodes]]))


def run_continual(method: str, seed: int, steps: int, tasks, num_envs: int, eval_episodes: int,
                  ppo: PPOConfig = PPO):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    L, per_task = len(tasks), steps // len(tasks)
    t0 = time.perf_counter()
    agent = build_agent(method, tasks)
    R = np.zeros((L, L))                                    # R[phase, task]: return after that phase
    auc_seq, episodes = [], []                              # episodes: (step of the whole sequence, task, return)
    for i in range(L):
        res = train_ppo(agent, single_task_envs(tasks, i, num_envs), total_steps=per_task, config=ppo,
                        seed=seed + 100 * i)
        auc_seq.append(mean_return(res.episodes))
        episodes += [(i * per_task + s, t, r) for s, t, r in res.episodes]
        R[i] = [evaluate(agent, tasks, j, eval_episodes, num_envs, seed + 7) for j in range(L)]
    auc_scratch = []
    for i in range(1, L):                                   # the reference: task i alone, fresh agent
        torch.manual_seed(seed)
        fresh = build_agent(method, tasks)
        res = train_ppo(fresh, single_task_envs(tasks, i, num_envs), total_steps=per_task, config=ppo,
                        seed=seed + 100 * i)
        auc_scratch.append(mean_return(res.episodes))
    return dict(method=method, seed=seed, R=R, auc_seq=auc_seq, auc_scratch=auc_scratch, episodes=episodes,
                wall=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
def mean_std(xs):
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def plot_curves(curves: dict, tasks, steps: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4 * (len(tasks) + 1), 3.2), sharey=True)
    x = (np.arange(10) + 0.5) * steps / 10 / 1000
    for ax, j in zip(axes, range(len(tasks) + 1)):
        for m, c in curves.items():                       # c: (seeds, L + 1, bins)
            mu = np.nanmean(c[:, j], 0)
            ax.plot(x, mu, label=m)
            if c.shape[0] > 1:
                sd = np.nanstd(c[:, j], 0)
                ax.fill_between(x, mu - sd, mu + sd, alpha=0.15)
        title = tasks[j].removeprefix("MiniGrid-") if j < len(tasks) else "all episodes (episode-weighted)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("env steps (k, all tasks)")
    axes[0].set_ylabel("episode return")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_continual(results: dict, tasks, steps: int, path: Path) -> None:
    """Left: each method's training return over the whole sequence (mean ± std over seeds, phase
    boundaries dotted); then one panel per task: its evaluated return after each phase."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L, bins = len(tasks), 10 * len(tasks)
    fig, axes = plt.subplots(1, L + 1, figsize=(4 * (L + 1), 3.2))
    x = (np.arange(bins) + 0.5) * steps / bins / 1000
    for m, runs in results.items():
        c = np.array([return_curve(r["episodes"], steps, bins) for r in runs])
        with warnings.catch_warnings():                     # a bin where no seed finished an episode: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mu, sd = np.nanmean(c, 0), np.nanstd(c, 0)
        line, = axes[0].plot(x, mu, label=m)
        if len(runs) > 1:
            axes[0].fill_between(x, mu - sd, mu + sd, color=line.get_color(), alpha=0.15)
        R = np.array([r["R"] for r in runs])                 # (seeds, phase, task)
        for j in range(L):
            axes[j + 1].errorbar(np.arange(1, L + 1), R[:, :, j].mean(0), yerr=R[:, :, j].std(0), marker="o",
                                 capsize=3, label=m, color=line.get_color())
    for i in range(1, L):
        axes[0].axvline(i * steps / L / 1000, color="grey", ls=":", lw=1)
    axes[0].set(title="training episodes (task of the phase)", xlabel="env steps (k, whole sequence)",
                ylabel="episode return")
    for j in range(L):
        axes[j + 1].set(title=f"eval: {tasks[j].removeprefix('MiniGrid-')}", xlabel="after phase", ylim=(-0.05, 1.05),
                        xticks=range(1, L + 1))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pool_map(fn, jobs, workers):
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(fn, *zip(*jobs)))
    return [fn(*job) for job in jobs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None,
                    help="environment steps per run, all tasks together (default 45,000; 3,000 with --quick)")
    ap.add_argument("--tasks", default="MT3", choices=sorted(TASK_SETS))
    ap.add_argument("--num-envs", type=int, default=4, help="environments per task")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", default=None, help=f"comma-separated, among {list(METHODS)}")
    ap.add_argument("--continual", action="store_true", help="RL5: the tasks in sequence (forgetting, transfer)")
    ap.add_argument("--eval-episodes", type=int, default=24)
    ap.add_argument("--plot", default=None,
                    help="'' for no plot (default returns.png, continual.png with --continual, next to this file)")
    ap.add_argument("--quick", action="store_true", help="one seed, 3,000 steps, 1 PPO epoch, no plot (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.eval_episodes, args.plot = args.seeds[:1], min(args.eval_episodes, 4), ""
    if args.plot is None:
        args.plot = str(Path(__file__).with_name("continual.png" if args.continual else "returns.png"))
    args.ppo = QUICK_PPO if args.quick else PPO
    if args.steps is None:
        args.steps = 3000 if args.quick else 45_000
    methods = (args.methods or ",".join(CONTINUAL_METHODS if args.continual else METHODS)).split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods must be among {list(METHODS)}, got {unknown}")
    tasks = TASK_SETS[args.tasks]
    t0 = time.perf_counter()
    if args.continual:
        return continual_report(args, methods, tasks, t0)
    jobs = [(m, s, args.steps, tasks, args.num_envs, args.ppo) for s in args.seeds for m in methods]
    results = _pool_map(run_one, jobs, args.workers)
    L = len(tasks)
    print(f"{args.tasks} {[t.removeprefix('MiniGrid-') for t in tasks]}, {args.steps} env steps per run "
          f"(all tasks), {args.num_envs} envs per task, seeds {args.seeds}, {args.workers} worker processes\n")
    head = " ".join(f"{t.removeprefix('MiniGrid-')[:16]:>18s}" for t in tasks)
    print(f"{'method':14s} {'params':>7s} {head} {'mean over tasks':>18s} {'AUC (mean)':>12s} {'wall s/run':>10s}")
    summary, curves = {}, {}
    for m in methods:
        runs = [r for r in results if r["method"] == m]
        overall = summarize_runs({m: [(r["episodes"], r["wall"]) for r in runs]}, args.steps)[m]
        # Per task: the episodes that finished within `steps` (the last rollout overshoots it a little).
        within = [[e for e in r["episodes"] if e[0] <= args.steps] for r in runs]
        by_task = [summarize_runs({m: [(ep, 0.0) for ep in within]}, args.steps, task=t)[m] for t in range(L)]
        mean_tasks = [float(np.nanmean([late_return(ep, args.steps, 0.1, task=t) for t in range(L)])) for ep in within]
        curves[m] = np.stack([s["curves"] for s in by_task] + [overall["curves"]], axis=1)    # (seeds, L + 1, bins)
        summary[m] = dict(params=runs[0]["params"], tasks=[(s["final"], s["final_std"]) for s in by_task],
                          mean=mean_std(mean_tasks), auc=(overall["auc"], overall["auc_std"]),
                          wall=(overall["wall"], overall["wall_std"]))
        s = summary[m]
        cells = " ".join(f"{mu:8.3f} ± {sd:6.3f}  " for mu, sd in s["tasks"])
        print(f"{m:14s} {s['params']:7d} {cells} {s['mean'][0]:8.3f} ± {s['mean'][1]:6.3f} "
              f"{s['auc'][0]:6.3f} ± {s['auc'][1]:.3f} {s['wall'][0]:8.1f}")
    if args.plot:
        plot_curves(curves, tasks, args.steps, Path(args.plot))
        print(f"\ncurves: {args.plot}")
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return summary


def continual_report(args, methods, tasks, t0):
    jobs = [(m, s, args.steps, tasks, args.num_envs, args.eval_episodes, args.ppo) for s in args.seeds for m in methods]
    results = _pool_map(run_continual, jobs, args.workers)
    L = len(tasks)
    print(f"continual {args.tasks}: {' → '.join(t.removeprefix('MiniGrid-') for t in tasks)}, "
          f"{args.steps // L} env steps per task, seeds {args.seeds}, {args.eval_episodes} eval episodes\n")
    print(f"{'method':14s} {'final mean return':>18s} {'forgetting':>16s} {'forward transfer':>18s} "
          f"{'wall s/run':>10s}")
    summary = {}
    for m in methods:
        runs = [r for r in results if r["method"] == m]
        final = [float(r["R"][-1].mean()) for r in runs]
        forget = [float(np.mean([r["R"][i, i] - r["R"][-1, i] for i in range(L - 1)])) for r in runs]
        transfer = [float(np.mean(np.array(r["auc_seq"][1:]) - np.array(r["auc_scratch"]))) for r in runs]
        summary[m] = dict(final=mean_std(final), forgetting=mean_std(forget), transfer=mean_std(transfer),
                          wall=mean_std([r["wall"] for r in runs]),
                          R=np.mean([r["R"] for r in runs], axis=0))
        s = summary[m]
        print(f"{m:14s} {s['final'][0]:9.3f} ± {s['final'][1]:5.3f} "
              f"{s['forgetting'][0]:8.3f} ± {s['forgetting'][1]:5.3f} "
              f"{s['transfer'][0]:9.3f} ± {s['transfer'][1]:5.3f} {s['wall'][0]:9.1f}")
    if args.plot:
        plot_continual({m: [r for r in results if r["method"] == m] for m in methods}, tasks, args.steps,
                       Path(args.plot))
        print(f"\ncurves: {args.plot}")
    for m, s in summary.items():
        print(f"\n{m}: return on each task (columns) after each phase (rows), mean over seeds")
        for i, row in enumerate(s["R"]):
            print(f"  after {tasks[i].removeprefix('MiniGrid-'):24s}" + " ".join(f"{v:6.3f}" for v in row))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
