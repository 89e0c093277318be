"""Soft MoE vs dense penultimate layers in DQN on MinAtar: the expert-scaling question (METHODS.md RL1).

    pip install 'moekit[rl]'                         # gymnasium + minatar
    python -m projects.softmoe_dqn_minatar.run [--game Breakout] [--steps 20000] [--seeds 0 1 2] [--quick]

Obando-Ceron et al. (ICML 2024) replace the penultimate dense layer of DQN's value network by a
Soft MoE over PerConv tokens and find that returns grow with the number of experts, while
widening the dense layer does not help (or hurts). Here, at CPU scale, on one MinAtar game
(gymnasium's ``MinAtar/<Game>-v1``, minimal action set, sticky actions 0.1): every network is
`moekit.models.rl.QNetwork` — a 16-channel 3×3 conv encoder, then

- ``dense_xW``: flatten → ``Linear(·, 128·W)`` → ReLU (the baseline at widths ×1 … ×8);
- ``softmoe_E``: `moekit.layers.SoftMoE` on the H·W PerConv tokens (16-dim), E MLP experts
  16 → 128 → 16, M/E slots each (total slots = tokens, so the expert FLOPs do not grow with E);
  ``softmoe_1`` is the tokenised one-expert ablation of Sokar et al. (2024);
- ``top1moe_E``: `moekit.MoE` with a top-1 router on the same tokens and experts;

then the linear Q layer, trained by `moekit.models.rl.train_dqn` (Adam through
`moekit.optim`, Huber TD loss, target network, uniform replay). Each (method, seed) runs in its
own single-threaded process, ``--workers`` at once. Printed: return per tenth of training,
the mean return of the episodes of the last 10 % of steps (± std over seeds), the mean over
the run, parameters, wall time; ``--plot`` writes the return curves as a PNG.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from moekit.models.rl import (
    DQNConfig,
    QNetworkConfig,
    late_return,
    make_gym_vec_env,
    plot_return_curves,
    summarize_runs,
    train_dqn,
)

METHODS = {
    **{f"dense_x{w}": QNetworkConfig(head="dense", width_mult=w) for w in (1, 2, 4, 8)},
    **{f"softmoe_{e}": QNetworkConfig(head="soft_moe", num_experts=e) for e in (1, 2, 4, 8)},
    "top1moe_8": QNetworkConfig(head="moe", num_experts=8, top_k=1),
}
QUICK_METHODS = ("dense_x1", "softmoe_2")


def run_one(method: str, seed: int, game: str, steps: int, num_envs: int, config: DQNConfig):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    envs = make_gym_vec_env(f"MinAtar/{game}-v1", num_envs, vectorization_mode="sync")
    qnet = METHODS[method].build(obs_shape=envs.single_observation_space.shape,
                                 num_actions=int(envs.single_action_space.n))
    n_params = sum(p.numel() for p in qnet.parameters())
    res = train_dqn(qnet, envs, total_steps=steps, config=config, seed=seed)
    envs.close()
    print(f"  done {method} seed {seed}: last-10% return {late_return(res.episodes, steps, 0.1):.2f}, "
          f"{res.wall_s:.0f} s", flush=True)
    return method, seed, n_params, res.episodes, res.wall_s



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--game", default="Breakout", choices=["Asterix", "Breakout", "Freeway", "Seaquest",
                                                           "SpaceInvaders"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20_000, help="environment steps per run")
    ap.add_argument("--num-envs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--plot", default=None, help="write the return curves to this PNG")
    ap.add_argument("--quick", action="store_true",
                    help=f"one seed, 3,000 steps, methods {','.join(QUICK_METHODS)} (a smoke run)")
    args = ap.parse_args(argv)
    config = DQNConfig()
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 3000
        args.methods = ",".join(QUICK_METHODS) if args.methods == ",".join(METHODS) else args.methods
        config = DQNConfig(learning_starts=500, eps_decay_steps=2000, target_update=100)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods must be among {list(METHODS)}, got {unknown}")
    t0 = time.perf_counter()
    jobs = [(m, s, args.game, args.steps, args.num_envs, config) for s in args.seeds for m in methods]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(run_one, *zip(*jobs)))
    else:
        results = [run_one(*job) for job in jobs]
    print(f"MinAtar/{args.game}-v1, DQN, {args.steps} env steps × seeds {args.seeds}, "
          f"{args.workers} worker processes\n")
    print("mean return per tenth of training (mean over seeds):")
    summary = summarize_runs({m: [(r[3], r[4]) for r in results if r[0] == m] for m in methods}, args.steps, 0.1)
    params = {r[0]: r[2] for r in results}
    for m, sm in summary.items():
        print(f"  {m:10s}" + " ".join(f"{v:6.2f}" for v in sm["curve"]))
    print(f"\n{'method':10s} {'params':>8s} {'final return (last 10%)':>25s} {'mean over run':>16s} "
          f"{'wall s/run':>11s}")
    for m, sm in summary.items():
        print(f"{m:10s} {params[m]:8d} {sm['final']:15.2f} ± {format(sm['final_std'], '.2f'):7s} "
              f"{sm['auc']:8.2f} ± {sm['auc_std']:5.2f} {sm['wall']:8.1f}")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    if args.plot:
        plot_return_curves(summary, args.steps, args.plot, f"DQN on MinAtar/{args.game}-v1, seeds {args.seeds}",
                           dashed=("dense",))
    return {m: dict(params=params[m], final=sm["final"], final_std=sm["final_std"], auc=sm["auc"],
                    auc_std=sm["auc_std"], wall=sm["wall"]) for m, sm in summary.items()}

if __name__ == "__main__":
    main()
