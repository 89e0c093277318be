"""R2 (METHODS.md §15): the theory paper's continual MoE on synthetic continual linear regression,
with and without router termination, against a single expert.

    python -m projects.continual_moe_theory.run [--num-tasks 3000] [--experts 4 8] [--t1 1000]
                                                [--seeds 0 1 2] [--plot-dir DIR] [--quick]

Model (`moekit.continual.ContinualLinearMoE`, METHODS C5; Li, Lin, Duan, Liang & Shroff 2024/ICLR
2025): M linear experts, a top-1 router on ``Σ_i X_i`` with small noise, the chosen expert updated
by the minimum-norm interpolator, the router trained by one GD step per task on the locality loss
plus the auxiliary balance loss, and stopped after T1 tasks (or never). Reported per variant:
the model error of each task ``err_τ(t) = ‖w_t^{(m_τ)} − w_{n_τ}‖²``, generalisation
``G_T = mean_τ err_τ(T)``, forgetting ``F_T = mean_{τ<T} (err_τ(T) − err_τ(τ))``, the error of the
chosen expert on each new task before it learns it (it goes to 0 once the system has converged),
expert purity over the last quarter of tasks (the share of tasks sent to their expert's majority
cluster: 1 = each expert serves one cluster) and the number of routing switches there (a task
going to another expert than the previous task of its cluster). Plots: error before learning over
time, and the expert chosen for each task coloured by its cluster.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from moekit.continual import ContinualLinearMoE
from projects.continual_moe_theory.data import make_tasks

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-tasks", type=int, default=3000)
    p.add_argument("--clusters", type=int, default=4)
    p.add_argument("--d", type=int, default=50)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--beta", type=float, default=5.0, help="norm of the cluster-feature column")
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    p.add_argument("--t1", type=int, default=1000, help="router termination round T1")
    p.add_argument("--lr", type=float, default=1.0, help="router step size eta")
    p.add_argument("--alpha", type=float, default=2.0, help="weight of the balance loss")
    p.add_argument("--noise", type=float, default=1e-3, help="std of the router's tie-breaking noise")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--plot-dir", type=str, default=str(HERE / "plots"), help="'' for no plots")
    p.add_argument("--quick", action="store_true", help="600 tasks, T1 = 200, M = 8 only, no plots")
    args = p.parse_args(argv)
    if args.quick:
        args.num_tasks, args.t1, args.experts, args.plot_dir = 600, 200, [8], ""
    return args


def run_variant(tasks, w_true, clusters, *, experts: int, t1, args, seed: int) -> dict:
    """Train one system on the task sequence; return its metrics and per-task traces."""
    moe = ContinualLinearMoE(w_true.shape[1], experts, terminate_after=t1, lr=args.lr, alpha=args.alpha,
                             noise=args.noise, seed=seed)
    T = len(tasks)
    chosen, err_before, err_after = [], [], []
    t0 = time.perf_counter()
    for (X, y), n in zip(tasks, clusters.tolist()):
        w_prev = moe.w.clone()
        m = moe.learn_task(X, y)
        chosen.append(m)
        err_before.append(float((w_prev[m] - w_true[n]).square().sum()))
        err_after.append(float((moe.w[m] - w_true[n]).square().sum()))
    wall = time.perf_counter() - t0
    chosen_T = torch.tensor(chosen)
    final_T = (moe.w[chosen_T] - w_true[clusters]).square().sum(1)
    tail = slice(T - T // 4, T)
    counts_MN = torch.zeros(experts, w_true.shape[0])
    counts_MN.index_put_((chosen_T[tail], clusters[tail]), torch.ones(T // 4), accumulate=True)
    last_expert, switches = {}, 0
    for t in range(T - T // 4, T):
        n = int(clusters[t])
        switches += int(n in last_expert and last_expert[n] != chosen[t])
        last_expert[n] = chosen[t]
    return dict(G=float(final_T.mean()), F=float((final_T[:-1] - torch.tensor(err_after[:-1])).mean()),
                err_tail=statistics.mean(err_before[tail]), purity=float(counts_MN.max(1).values.sum() / (T // 4)),
                switches=switches, wall=wall, chosen=chosen_T, err_before=torch.tensor(err_before),
                router_moves_after_t1=None if t1 is None else bool(moe.router.rounds > t1))


def variants(args):
    out = [("single expert", 1, None)]
    for M in args.experts:
        out += [(f"MoE M={M}, no termination", M, None), (f"MoE M={M}, T1={args.t1}", M, args.t1)]
    return out


def run_seed(args, seed: int) -> dict:
    tasks, w_true, clusters = make_tasks(num_clusters=args.clusters, d=args.d, num_tasks=args.num_tasks,
                                         samples=args.samples, beta=args.beta, seed=seed)
    results = {}
    for name, M, t1 in variants(args):
        results[name] = run_variant(tasks, w_true, clusters, experts=M, t1=t1, args=args, seed=seed)
    results["_clusters"] = clusters
    print_table(results, seed, args)
    return results


def print_table(results, seed, args):
    print(f"\nseed {seed}: {args.num_tasks} tasks, {args.clusters} clusters, d={args.d}, s={args.samples}, "
          f"beta={args.beta}, eta={args.lr}, alpha={args.alpha}")
    print(f"{'variant':28s} {'G_T':>7s} {'F_T':>7s} {'err@new (last 1/4)':>19s} {'purity':>7s} {'switches':>9s} "
          f"{'wall s':>7s}")
    for name, r in results.items():
        if name.startswith("_"):
            continue
        print(f"{name:28s} {r['G']:7.3f} {r['F']:7.3f} {r['err_tail']:19.3f} {r['purity']:7.2f} {r['switches']:9d} "
              f"{r['wall']:7.1f}")


def plot(results, args, seed: int) -> list[str]:
    """Two figures per seed: error of the chosen expert on each new task, and the routing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(args.plot_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in results if not n.startswith("_")]
    fig, ax = plt.subplots(figsize=(8, 4))
    k = 25
    for name in names:
        e = results[name]["err_before"]
        ax.plot(torch.arange(k - 1, len(e)), e.unfold(0, k, 1).mean(1), label=name, lw=1)
    ax.axvline(args.t1, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="task t", ylabel=f"error of the chosen expert before learning task t ({k}-task mean)",
           yscale="log", ylim=(1e-8, 10), title=f"R2: continual linear regression (seed {seed})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [str(out_dir / f"error_seed{seed}.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    moes = [n for n in names if n.startswith("MoE")]
    fig, axes = plt.subplots(len(moes), 1, figsize=(8, 1.6 * len(moes)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], moes):
        ax.scatter(torch.arange(args.num_tasks), results[name]["chosen"], c=results["_clusters"], cmap="tab10",
                   s=2, vmin=0, vmax=9)
        ax.set_ylabel("expert", fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.axvline(args.t1, color="grey", ls="--", lw=0.8)
    axes[-1, 0].set_xlabel("task t (colour: ground-truth cluster)")
    fig.tight_layout()
    paths.append(str(out_dir / f"routing_seed{seed}.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(args, seed)
        if args.plot_dir:
            print("plots:", ", ".join(plot(per_seed[seed], args, seed)))
    if len(args.seeds) > 1:
        print(f"\nmean ± std over seeds {args.seeds}:")
        for name, _, _ in variants(args):
            vals = {k: [per_seed[s][name][k] for s in args.seeds] for k in ("G", "F", "err_tail", "purity")}
            print(f"{name:28s} " + "  ".join(f"{k} {statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"
                                             for k, v in vals.items()))
    return per_seed


if __name__ == "__main__":
    main()
