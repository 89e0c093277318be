"""R3: mixtures of linear experts on piecewise-linear regression (METHODS.md §15 R3, F1, F2).

    python -m projects.piecewise_linear_moe.run [--quick] [--seeds 0 1 2 3 4] [--out DIR]

Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive Mixtures of Local Experts", and Jordan &
Jacobs (1994), "Hierarchical Mixtures of Experts and the EM Algorithm". Data: four linear
regimes on [−1, 1] (and one per quadrant of [−1, 1]²), noise N(0, 0.05²), 2000 train / 2000
test. Fits (`methods.py`): a flat mixture of 4 linear experts by EM with IRLS gate updates, by
gradient descent on the competitive loss (σ = 1, and σ = 0.1) and on the cooperative loss; the
depth-2 HME (2 × 2) by EM; one linear regression.

Expected (the papers' direction, METHODS R3): the EM log-likelihood never decreases; EM,
competitive GD and the HME reach test MSE ≈ the noise floor 0.0025 with gate breakpoints within
±0.05 of −0.5, 0, 0.5; the cooperative loss specialises worse; the line's MSE ≫ the floor.
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

from projects.piecewise_linear_moe.data import BREAKPOINTS, NOISE, SLOPES_1D, make_data
from projects.piecewise_linear_moe.methods import BRANCHING, METHODS, evaluate, fit_em, fit_gd, fit_linear

HERE = Path(__file__).resolve().parent
SIGMA = {"gd_competitive": 1.0, "gd_competitive_s01": 0.1}


def run_seed(seed: int, dim: int, *, n: int, em_iters: int, em_restarts: int, gd_steps: int, gd_restarts: int,
             lr: float):
    """Every method on one (seed, dim): metrics per method, EM histories, the fitted models."""
    g = torch.Generator().manual_seed(10_007 * seed + dim)
    train, test = make_data(n, dim, generator=g), make_data(n, dim, generator=g)
    metrics, histories, models = {}, {}, {}
    for method in METHODS:
        t0 = time.time()
        if method.startswith("em_"):
            fit, histories[method] = fit_em(train, BRANCHING[method], generator=g, iters=em_iters,
                                            restarts=em_restarts)
        elif method == "linear":
            fit = fit_linear(train)
        else:
            kind = "cooperative" if method == "gd_cooperative" else "competitive"
            fit, _ = fit_gd(train, kind, generator=g, steps=gd_steps, lr=lr, restarts=gd_restarts,
                            sigma=SIGMA.get(method, 1.0))
        metrics[method] = {**evaluate(fit, test), "seconds": time.time() - t0}
        models[method] = fit
    return metrics, histories, models, (train, test)


def _mean_std(vals):
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s, len(vals)


def summarise(per_seed: dict) -> dict:
    """dim → method → metric → (mean, std, seeds counted); ``break_within_005``: the share of
    seeds with three breakpoints all within ±0.05 of the true ones."""
    out = {}
    for dim, seeds in per_seed.items():
        out[dim] = {}
        for method in METHODS:
            rows = [s["metrics"][method] for s in seeds]
            summ = {k: _mean_std([r[k] for r in rows]) for k in ("mse", "mse_hard", "purity", "leaves_used",
                                                                 "break_err", "seconds") if k in rows[0]}
            if "break_err" in rows[0]:
                summ["break_within_005"] = sum(r["break_err"] <= 0.05 for r in rows) / len(rows)
            out[dim][method] = summ
    return out


def em_monotone(per_seed: dict) -> float:
    """The largest decrease of the EM log-likelihood between iterations, over every EM run."""
    worst = 0.0
    for seeds in per_seed.values():
        for s in seeds:
            for h in s["em_history"].values():
                worst = max([worst] + [a - b for a, b in zip(h, h[1:])])
    return worst


def _fmt(ms, digits=4):
    m, s, k = ms
    return "—" if k == 0 else (f"{m:.{digits}f} ± {s:.{digits}f}" if k > 1 else f"{m:.{digits}f}")


def table(summary: dict, seeds) -> str:
    lines = []
    for dim, by_method in summary.items():
        lines += [f"\n{dim}-D, seeds {seeds} (mean ± std), noise floor {NOISE ** 2:.4f}",
                  "| method | test MSE | argmax-leaf MSE | leaf purity | leaves used | max breakpoint error | "
                  "breakpoints ±0.05 |", "|---|---|---|---|---|---|---|"]
        for method, s in by_method.items():
            brk = (_fmt(s["break_err"], 3) + (f" ({s['break_err'][2]}/{len(seeds)} seeds with 3)"
                                               if s["break_err"][2] < len(seeds) else "")) if "break_err" in s else "—"
            within = f"{s['break_within_005']:.0%}" if "break_within_005" in s else "—"
            lines.append(f"| {method} | {_fmt(s['mse'])} | {_fmt(s.get('mse_hard', (0, 0, 0)))} | "
                         f"{_fmt(s.get('purity', (0, 0, 0)), 3)} | {_fmt(s.get('leaves_used', (0, 0, 0)), 1)} | "
                         f"{brk} | {within} |")
    return "\n".join(lines)


def plot(per_seed: dict, fits_1d, out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    models, (train, _) = fits_1d
    grid = torch.linspace(-1, 1, 801, dtype=torch.float64).unsqueeze(-1)
    names = [m for m in METHODS]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True, sharey=True)
    for ax, method in zip(axes.flat, names):
        ax.scatter(train.x[:400, 0], train.y[:400, 0], s=3, c="0.7")
        fit = models[method]
        with torch.no_grad():
            if isinstance(fit, torch.Tensor):
                pred = torch.cat([grid, torch.ones_like(grid)], 1) @ fit
            else:
                pred = fit(grid)
                for b in (b for b in _breaks(fit)):
                    ax.axvline(b, color="tab:red", lw=0.8, ls="--")
        for b in BREAKPOINTS:
            ax.axvline(b, color="k", lw=0.5, ls=":")
        ax.plot(grid[:, 0], pred[:, 0], color="tab:blue", lw=1.5)
        ax.set_title(method, fontsize=10)
    fig.suptitle("R3, seed %d: fits (blue), gate breakpoints (red dashed), true breakpoints (dotted)"
                 % per_seed[1][0]["seed"], fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "fits.png", dpi=100)
    plt.close(fig)
    written.append("fits.png")
    fig, axes = plt.subplots(1, len(per_seed), figsize=(5.5 * len(per_seed), 3.6), squeeze=False)
    for ax, (dim, seeds) in zip(axes[0], per_seed.items()):
        for s in seeds:
            for method, style in (("em_flat", "-"), ("em_hme", "--")):
                h = s["em_history"][method]
                ax.plot(range(len(h)), h, style, lw=1, label=f"{method} seed {s['seed']}")
        ax.axhline(-0.5 * math.log(2 * math.pi * NOISE ** 2) - 0.5, color="k", lw=0.5, ls=":")
        ax.set_xlabel("EM iteration (the chosen start, from its initialisation)")
        ax.set_ylabel("mean log-likelihood (train)")
        ax.set_title(f"{dim}-D; dotted: the true model's expected value")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "em_loglik.png", dpi=100)
    plt.close(fig)
    written.append("em_loglik.png")
    return written


def _breaks(fit):
    from projects.piecewise_linear_moe.methods import gate_breakpoints
    return gate_breakpoints(fit)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size: 1 seed, n = 300, short fits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--n", type=int, default=2000, help="train and test samples each")
    p.add_argument("--dims", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    p.add_argument("--em-iters", type=int, default=200)
    p.add_argument("--em-restarts", type=int, default=5)
    p.add_argument("--gd-steps", type=int, default=1500)
    p.add_argument("--gd-restarts", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.2, help="Adam learning rate of the GD fits (cosine to 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and the plots")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.n, args.em_iters, args.em_restarts = args.seeds[:1], 300, 30, 2
        args.gd_steps, args.gd_restarts = 150, 1
    if args.n < 10 or not args.seeds or min(args.em_restarts, args.gd_restarts, args.gd_steps) < 1:
        p.error("--n >= 10, --seeds non-empty, restarts and steps >= 1")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    per_seed, fits_1d = {d: [] for d in args.dims}, None
    for dim in args.dims:
        for seed in args.seeds:
            metrics, hist, models, data = run_seed(seed, dim, n=args.n, em_iters=args.em_iters,
                                                   em_restarts=args.em_restarts, gd_steps=args.gd_steps,
                                                   gd_restarts=args.gd_restarts, lr=args.lr)
            per_seed[dim].append({"seed": seed, "metrics": metrics, "em_history": hist})
            if dim == 1 and fits_1d is None:
                fits_1d = (models, data)
            print(f"dim {dim} seed {seed}: " + ", ".join(f"{m} {v['mse']:.4f}" for m, v in metrics.items())
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    summary = summarise(per_seed)
    print(table(summary, args.seeds))
    worst = em_monotone(per_seed)
    wall = time.time() - t0
    print(f"\nlargest EM log-likelihood decrease over all runs: {worst:.2e}; wall {wall:.0f} s")
    report = {"seeds": args.seeds, "n": args.n, "config": {k: (str(v) if isinstance(v, Path) else v)
                                                           for k, v in vars(args).items()},
              "true_slopes": SLOPES_1D, "wall_s": wall, "em_max_decrease": worst,
              "summary": {str(d): v for d, v in summary.items()}, "per_seed": {str(d): v for d, v in per_seed.items()}}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=1))
        if 1 in per_seed:
            for name in plot(per_seed, fits_1d, args.out):
                print(f"plot: {args.out / name}")
    return report


if __name__ == "__main__":
    main()
