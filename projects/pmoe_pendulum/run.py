"""PMOE mixture policy vs SAC's Gaussian policy on gymnasium's Pendulum-v1 (METHODS.md RL2).

    pip install 'moekit[rl]'
    python -m projects.pmoe_pendulum.run [--env Pendulum-v1] [--steps 8000] [--seeds 0 1 2] [--experts 4] [--quick]

Ren et al. (2021) report that a Gaussian-mixture policy trained with their frequency-approximate
gradient learns faster than SAC's unimodal Gaussian on MuJoCo. Here, on Pendulum-v1 (default) or
a MuJoCo task (``--env HalfCheetah-v5``; mujoco comes with the ``rl`` extra), both agents are
`moekit.models.rl.train_sac` with the same critics (two 64-unit MLPs), buffer and optimizer (`moekit.optim`):

- ``gaussian``: `MixtureGaussianPolicy` with one component — SAC's tanh-Gaussian policy;
- ``pmoe_K``: K components, the actor loss through the best expert's sample, the gate trained
  towards the frequency of each expert being best.

Each (method, seed) runs in its own single-threaded process, ``--workers`` at once. Printed:
return per tenth of training, the mean return of the episodes of the last 20 % of steps
(± std over seeds), the mean over the run, wall time; ``--plot`` writes the curves as a PNG.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from moekit.models.rl import (
    MixtureGaussianPolicy,
    SACConfig,
    TwinQ,
    late_return,
    make_gym_vec_env,
    plot_return_curves,
    summarize_runs,
    train_sac,
)


def run_one(method: str, seed: int, steps: int, num_envs: int, config: SACConfig, env_id: str = "Pendulum-v1"):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    envs = make_gym_vec_env(env_id, num_envs, vectorization_mode="sync")
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    K = 1 if method == "gaussian" else int(method.split("_")[1])
    policy = MixtureGaussianPolicy(obs_dim=obs_dim, action_dim=act_dim, num_experts=K, hidden=64,
                                   action_low=envs.single_action_space.low, action_high=envs.single_action_space.high)
    critic = TwinQ(obs_dim=obs_dim, action_dim=act_dim, hidden=64)
    cfg = SACConfig(**{**config.__dict__, "pmoe": K > 1})
    res = train_sac(policy, critic, envs, total_steps=steps, config=cfg, seed=seed)
    envs.close()
    print(f"  done {method} seed {seed}: last-20% return {late_return(res.episodes, steps, 0.2):.1f}, "
          f"{res.wall_s:.0f} s", flush=True)
    return method, seed, res.episodes, res.wall_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", default="Pendulum-v1",
                    help="gymnasium id of a continuous-control task (MuJoCo ones, e.g. HalfCheetah-v5, need mujoco)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=8_000, help="environment steps per run (Pendulum: 200 per episode)")
    ap.add_argument("--experts", type=int, default=4, help="K of the PMOE policy")
    ap.add_argument("--num-envs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plot", default=None, help="write the return curves to this PNG")
    ap.add_argument("--quick", action="store_true", help="one seed, 1,200 steps (a smoke run)")
    args = ap.parse_args(argv)
    if args.experts < 2:
        ap.error(f"--experts must be >= 2 (1 is the gaussian baseline), got {args.experts}")
    config = SACConfig()
    if args.quick:
        args.seeds, args.steps, args.num_envs = args.seeds[:1], 1200, 2
        config = SACConfig(learning_starts=400, train_every=4)
    methods = ["gaussian", f"pmoe_{args.experts}"]
    t0 = time.perf_counter()
    jobs = [(m, s, args.steps, args.num_envs, config, args.env) for s in args.seeds for m in methods]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(run_one, *zip(*jobs)))
    else:
        results = [run_one(*job) for job in jobs]
    print(f"\n{args.env}, SAC, {args.steps} env steps × seeds {args.seeds}, {args.workers} worker processes\n")
    print("mean return per tenth of training (mean over seeds):")
    summary = summarize_runs({m: [(r[2], r[3]) for r in results if r[0] == m] for m in methods}, args.steps, 0.2)
    for m, sm in summary.items():
        print(f"  {m:9s}" + " ".join(f"{v:8.1f}" for v in sm["curve"]))
    print(f"\n{'method':9s} {'final return (last 20%)':>25s} {'mean over run':>18s} {'wall s/run':>11s}")
    for m, sm in summary.items():
        print(f"{m:9s} {sm['final']:15.1f} ± {format(sm['final_std'], '.1f'):7s} {sm['auc']:9.1f} "
              f"± {sm['auc_std']:6.1f} {sm['wall']:8.1f}")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    if args.plot:
        plot_return_curves(summary, args.steps, args.plot, f"SAC on {args.env}")
    return {m: dict(final=sm["final"], final_std=sm["final_std"], auc=sm["auc"], auc_std=sm["auc_std"],
                    wall=sm["wall"]) for m, sm in summary.items()}

if __name__ == "__main__":
    main()
