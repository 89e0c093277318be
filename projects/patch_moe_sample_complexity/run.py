"""R6: patch-level routing (pMoE) against a single CNN — sample complexity and spurious patches
(METHODS.md §15 R6, TH4).

    python -m projects.patch_moe_sample_complexity.run [--quick] [--seeds 0 1 2] [--out DIR]

Chowdhury, Zhang, Wang, Liu & Chen (2023, ICML), "Patch-level Routing in Mixture-of-Experts is
Provably Sample-efficient for CNNs". Data (`data.py`): 16 patches of dim 32, one discriminative
patch ±v, two spurious patches ±u whose sign agrees with y 90 % of the time in training only,
the rest Gaussian noise. Models (`models.py`): a single two-layer CNN with 64 shared filters
against a pMoE of 4 experts × 16 filters, each expert taking its top-l patches of every example
(l ∈ {1, 2, 4}) by a linear router (`moekit.MoE` with the expert-choice router, one group per
example). Sweep n ∈ {100, …, 5000}; test accuracy on a test set where the spurious sign is
independent of y and on one where it is flipped.

Expected (the paper's direction): pMoE reaches a target test accuracy with fewer training
samples than the single CNN (by a factor polynomial in P/l), and its routers discard
label-irrelevant patches, so it relies less on the spurious ones (smaller drop on the flipped set).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from moekit.analysis import mean_sd
from projects.patch_moe_sample_complexity.data import make_task, sample
from projects.patch_moe_sample_complexity.models import PatchCNN, PatchMoE
from projects.patch_moe_sample_complexity.train import accuracy, routing_recall, train

MODELS = ("cnn", "pmoe_l1", "pmoe_l2", "pmoe_l4")
TARGETS = (0.9, 0.95)


def build(name: str, *, dim: int, num_patches: int, experts: int, hidden: int):
    """``cnn``: one CNN with experts·hidden filters; ``pmoe_l<l>``: experts × hidden filters, l patches each."""
    if name == "cnn":
        return PatchCNN(dim=dim, hidden=experts * hidden)
    if name.startswith("pmoe_l"):
        return PatchMoE(dim=dim, num_patches=num_patches, num_experts=experts,
                        patches_per_expert=int(name[len("pmoe_l"):]), hidden=hidden)
    raise ValueError(f"model must be 'cnn' or 'pmoe_l<l>', got {name!r}")


def run_seed(seed: int, ns, models, *, steps: int, lr: float, noise: float, spurious_corr: float,
             test_size: int, experts: int, hidden: int) -> dict:
    """model → n → metrics, for one seed (one task, one test set, nested training sets)."""
    g = torch.Generator().manual_seed(7_919 * seed + 1)
    task = make_task(generator=g, noise=noise, spurious_corr=spurious_corr)
    test = sample(task, test_size, split="test", generator=g)
    flipped = sample(task, test_size, split="flipped", generator=g)
    pool = sample(task, max(ns), split="train", generator=g)           # the n-sample set is its first n
    out = {m: {} for m in models}
    for n in ns:
        data = type(pool)(pool.x[:n], pool.y[:n], pool.signal_pos[:n], pool.spurious_BP[:n])
        for name in models:
            torch.manual_seed(1_000 * seed + n)
            model = build(name, dim=task.dim, num_patches=task.num_patches, experts=experts, hidden=hidden)
            t0 = time.time()
            losses = train(model, data, steps=steps, lr=lr)
            row = {"train_acc": accuracy(model, data), "test_acc": accuracy(model, test),
                   "flipped_acc": accuracy(model, flipped), "final_loss": losses[-1], "seconds": time.time() - t0}
            if isinstance(model, PatchMoE):
                row.update(routing_recall(model, test))
            out[name][n] = row
    return out


def summarise(per_seed: list, ns, models) -> dict:
    """model → {metric: [(mean, std) per n], "n_to_<target>": smallest n whose mean test accuracy
    reaches the target (None if none does)}."""
    out = {}
    for name in models:
        s = {}
        for metric in ("test_acc", "flipped_acc", "train_acc", "signal_kept", "spurious_kept"):
            if metric in per_seed[0][name][ns[0]]:
                s[metric] = [mean_sd([r[name][n][metric] for r in per_seed]) for n in ns]
        for t in TARGETS:
            s[f"n_to_{t}"] = next((n for n, (m, _) in zip(ns, s["test_acc"]) if m >= t), None)
        out[name] = s
    return out


def table(summary: dict, ns, seeds) -> str:
    lines = [f"test accuracy (spurious sign independent of y) / flipped-spurious accuracy, mean ± std over "
             f"seeds {seeds}", "| model | " + " | ".join(f"n = {n}" for n in ns) + " | n to 90 % | n to 95 % |",
             "|---|" + "---|" * (len(ns) + 2)]
    for name, s in summary.items():
        cells = [f"{a[0]:.3f} ± {a[1]:.3f} / {b[0]:.3f}" for a, b in zip(s["test_acc"], s["flipped_acc"])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['n_to_0.9'] or '> ' + str(ns[-1])} | "
                     f"{s['n_to_0.95'] or '> ' + str(ns[-1])} |")
    lines += ["", "routing (pMoE, test set): share of examples whose discriminative patch is chosen by some "
              "expert / share of spurious patches chosen", "| model | " + " | ".join(f"n = {n}" for n in ns) + " |",
              "|---|" + "---|" * len(ns)]
    for name, s in summary.items():
        if "signal_kept" in s:
            lines.append(f"| {name} | " + " | ".join(f"{a[0]:.2f} / {b[0]:.2f}" for a, b in
                                                    zip(s["signal_kept"], s["spurious_kept"])) + " |")
    return "\n".join(lines)


def plot(summary: dict, ns, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, metric, title in ((axes[0], "test_acc", "test (spurious sign independent of y)"),
                              (axes[1], "flipped_acc", "flipped test (spurious sign = −y)")):
        for name, s in summary.items():
            m = [a for a, _ in s[metric]]
            sd = [b for _, b in s[metric]]
            ax.plot(ns, m, "o-" if name == "cnn" else "s--", label=name)
            ax.fill_between(ns, [max(0.0, a - b) for a, b in zip(m, sd)], [min(1.0, a + b) for a, b in zip(m, sd)],
                            alpha=0.12)                                      # ± 1 std over seeds, clipped
        ax.set_xscale("log")
        ax.set_xlabel("training samples n")
        ax.set_title(title + "; bands ± 1 std over seeds", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size: n ∈ {100, 300}, 1 seed, 30 steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ns", type=int, nargs="+", default=[100, 200, 500, 1000, 2000, 5000])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--steps", type=int, default=300, help="full-batch AdamW steps per fit (cosine to 0)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--noise", type=float, default=1.0, help="noise norm per patch (std noise/√D per coordinate)")
    p.add_argument("--spurious-corr", type=float, default=0.9, help="P(spurious sign = y) in training")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--hidden", type=int, default=16, help="filters per expert (the CNN has experts × hidden)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and the plot")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.ns, args.steps, args.test_size = args.seeds[:1], [100, 300], 30, 300
    for name in args.models:
        build(name, dim=32, num_patches=16, experts=args.experts, hidden=args.hidden)     # fail early on a bad name
    if not args.seeds or min(args.ns) < 2 or args.steps < 1:
        p.error("--seeds non-empty, --ns >= 2, --steps >= 1")
    args.ns = sorted(args.ns)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(seed, args.ns, args.models, steps=args.steps, lr=args.lr, noise=args.noise,
                                 spurious_corr=args.spurious_corr, test_size=args.test_size,
                                 experts=args.experts, hidden=args.hidden))
        print(f"seed {seed} done ({time.time() - t0:.0f} s): " + ", ".join(
            f"{m} {per_seed[-1][m][args.ns[-1]]['test_acc']:.3f}" for m in args.models), flush=True)
    summary = summarise(per_seed, args.ns, args.models)
    print(table(summary, args.ns, args.seeds))
    wall = time.time() - t0
    print(f"\nwall {wall:.0f} s")
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "wall_s": wall,
              "summary": summary, "per_seed": [{m: {str(n): r for n, r in d.items()} for m, d in s.items()}
                                               for s in per_seed]}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=1))
        if plot(summary, args.ns, args.out / "accuracy_vs_n.png"):
            print(f"plot: {args.out / 'accuracy_vs_n.png'}")
    return report


if __name__ == "__main__":
    main()
