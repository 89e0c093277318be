"""Sigmoid vs softmax gating: how fast least squares recovers an MoE's experts (METHODS.md R5, TH3).

    python -m projects.gating_sample_efficiency.run [--quick] [--seeds 0 1 ...] [--experts relu linear]

Nguyen, Ho & Rinaldo (2024), "Sigmoid Gating is More Sample Efficient than Softmax Gating in
Mixture of Experts": a true MoE with k* = 2 experts on x ~ U[−1, 1], ``y = Σ_i G_i(x) h(x) +
N(0, 0.1²)``, is fitted by least squares with k = 3 atoms (over-specified) for n ∈ {10³, 3·10³,
10⁴, 3·10⁴} (10⁵ with ``--ns``), 20 seeds each, once with each gate (each gate fitted to data from its own
true model, same experts). Measured per (gate, expert kind, n): the Voronoi loss between fitted
and true atoms, the worst expert-parameter error, and the regression-function error; their
log–log slopes over n (geometric mean over seeds; a 90 % bootstrap interval over seeds).

Expected (the paper's direction): the function error falls at about n^(−1/2) under both gates;
expert parameters are estimated with fewer samples under sigmoid gating (a steeper or lower
Voronoi / expert-error curve). GELU experts by default (``--experts gelu relu linear`` for the others:
ReLU and linear experts are positively homogeneous, ``c·h(x; a, b) = h(x; c·a, c·b)``, so an
over-specified atom can split an expert into scaled copies and the expert parameters are not
identified — seen in the first runs).

``--quick``: n ∈ {300, 1000, 3000}, 3 seeds, one restart, GELU experts (CI).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from projects.gating_sample_efficiency.model import (
    EXPERTS,
    GATES,
    expert_error,
    fit_least_squares,
    function_error,
    sample,
    true_atoms,
    voronoi_loss,
)

METRICS = ("voronoi", "expert", "function")
HERE = Path(__file__).resolve().parent


def run_one(n: int, seed: int, gate: str, expert: str, *, restarts: int, init_scale: float,
            max_iter: int = 200) -> dict:
    g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * n + 31 * GATES.index(gate) + EXPERTS.index(expert))
    x, y = sample(n, gate, expert, generator=g)
    fit = fit_least_squares(x, y, 3, gate, expert, restarts=restarts, init_scale=init_scale, generator=g,
                            max_iter=max_iter)
    true = true_atoms(gate)
    return {"voronoi": voronoi_loss(fit, true, gate), "expert": expert_error(fit, true),
            "function": function_error(fit, true, gate, expert)}


def loglog_slope(ns, values_NS) -> float:
    """Least-squares slope of log(geometric mean over seeds) against log n."""
    lx = [math.log(n) for n in ns]
    ly = [sum(math.log(max(v, 1e-300)) for v in vs) / len(vs) for vs in values_NS]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def bootstrap_interval(ns, values_NS, *, reps: int = 400, seed: int = 0) -> tuple[float, float]:
    """90 % interval of the slope when the seeds are resampled (the same resample at every n)."""
    g = torch.Generator().manual_seed(seed)
    S = len(values_NS[0])
    slopes = []
    for _ in range(reps):
        pick = torch.randint(0, S, (S,), generator=g).tolist()
        slopes.append(loglog_slope(ns, [[vs[i] for i in pick] for vs in values_NS]))
    slopes.sort()
    return slopes[int(0.05 * reps)], slopes[int(0.95 * reps) - 1]


def summarise(results: dict, ns, seeds) -> dict:
    out = {}
    for (gate, expert), per_n in results.items():
        for m in METRICS:
            vals = [[per_n[n][s][m] for s in range(len(seeds))] for n in ns]
            lo, hi = bootstrap_interval(ns, vals) if len(seeds) > 1 else (float("nan"), float("nan"))
            geo = [math.exp(sum(math.log(max(v, 1e-300)) for v in vs) / len(vs)) for vs in vals]
            out[f"{gate}/{expert}/{m}"] = {"slope": loglog_slope(ns, vals), "interval": [lo, hi], "geomean": geo}
    return out


def plot(summary: dict, ns, experts, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(experts), 3, figsize=(12, 3.6 * len(experts)), squeeze=False)
    titles = {"voronoi": "Voronoi loss", "expert": "worst expert error", "function": "‖f̂ − f*‖ (L2)"}
    for r, expert in enumerate(experts):
        for c, m in enumerate(METRICS):
            ax = axes[r][c]
            for gate, style in (("sigmoid", "o-"), ("softmax", "s--")):
                s = summary[f"{gate}/{expert}/{m}"]
                ax.loglog(ns, s["geomean"], style, label=f"{gate} (slope {s['slope']:.2f})")
            ax.set_title(f"{titles[m]} — {expert} experts")
            ax.set_xlabel("n")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size: 3 n, 3 seeds, 1 restart, GELU experts")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(20)))
    p.add_argument("--ns", type=int, nargs="+", default=[1000, 3000, 10000, 30000])
    p.add_argument("--experts", nargs="+", choices=list(EXPERTS), default=["gelu"])
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--max-iter", type=int, default=200, help="L-BFGS iterations per start")
    p.add_argument("--init-scale", type=float, default=0.3, help="std of the perturbation of the starts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and the plot")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.ns, args.experts, args.restarts = [0, 1, 2], [300, 1000, 3000], ["gelu"], 1
    if any(n < 10 for n in args.ns) or args.restarts < 1 or not args.seeds:
        p.error("--ns must be >= 10, --restarts >= 1, --seeds non-empty")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    results = {}
    for expert in args.experts:
        for gate in GATES:
            per_n = {n: [run_one(n, s, gate, expert, restarts=args.restarts, init_scale=args.init_scale,
                                 max_iter=args.max_iter)
                         for s in args.seeds] for n in args.ns}
            results[(gate, expert)] = per_n
            print(f"{gate:8s} {expert:6s} done ({time.time() - t0:.0f} s)", flush=True)
    summary = summarise(results, args.ns, args.seeds)
    print(f"\n| experts | metric | sigmoid slope [90% CI] | softmax slope [90% CI] | "
          f"sigmoid at n={args.ns[-1]} | softmax at n={args.ns[-1]} |")
    print("|---|---|---|---|---|---|")
    for expert in args.experts:
        for m in METRICS:
            a, b = summary[f"sigmoid/{expert}/{m}"], summary[f"softmax/{expert}/{m}"]
            print(f"| {expert} | {m} | {a['slope']:.2f} [{a['interval'][0]:.2f}, {a['interval'][1]:.2f}] | "
                  f"{b['slope']:.2f} [{b['interval'][0]:.2f}, {b['interval'][1]:.2f}] | "
                  f"{a['geomean'][-1]:.2e} | {b['geomean'][-1]:.2e} |")
    wall = time.time() - t0
    print(f"\nwall {wall:.0f} s; seeds {args.seeds}; n {args.ns}; restarts {args.restarts}")
    report = {"ns": args.ns, "seeds": args.seeds, "restarts": args.restarts, "wall_s": wall, "summary": summary,
              "raw": {f"{g}/{e}": {str(n): v for n, v in per_n.items()} for (g, e), per_n in results.items()}}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=1))
        if plot(summary, args.ns, args.experts, args.out / "slopes.png"):
            print(f"plot: {args.out / 'slopes.png'}")
    return report


if __name__ == "__main__":
    main()
