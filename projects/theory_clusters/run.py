"""Theory reproductions on a CPU: MoE on cluster-structured data, and learned vs hash routing.

    python -m projects.theory_clusters.run [--seeds 0 1 2] [--settings S1 S2 S3 S4] [--single-seeds 0]
                                           [--r7-seeds 0 1 2] [--threads 1] [--quick]

**R1** (METHODS.md §15 R1; Chen, Deng, Wu, Gu & Li 2022, NeurIPS, official code ``uclaml/MoE``):
16,000 train / 16,000 test examples of 4 patches in R^50 (`data.make_cluster_data`)
in settings S1–S4. Per setting one data draw (``--data-seed``) and one initialisation per ``--seeds`` of
each model, as the official notebooks (10 runs on one dataset):
- MoE(cubic) / MoE(linear): `moekit.MoE` with 8 patch-CNN experts (m = 8, init ×0.001) and the
  zero-initialised patch-sum router with U[0, 1) exploration noise, top-1; experts by normalised
  GD (lr 1e-3), router by SGD (lr 0.1), full batch, 600 / 500 epochs with the code's early stop;
- single CNNs (m = 64; Adam, lr 3e-3 linear / 1e-2 cubic, wd 5e-4, 800 epochs), on S1 only,
  the setting where the paper reports them.
Reported: test accuracy (mean ± std over seeds) and the final dispatch entropy (entropy of the
cluster labels inside each expert, weighted by load) beside the paper's numbers.

**R7** (METHODS.md §15 R7, our parameters): 8 Gaussian clusters in R^32, ``y = A_k x + b_k +
N(0, 0.1²)``; 8 linear experts routed by a learned Switch router (balance loss 1.0) or by a hash of
the sign pattern of a fixed random projection, and one dense linear map. Reported: test MSE (noise
floor 0.01) and router purity.

Every update is a `moekit.optim.UpdateStep` (`train.py`); models in `models.py`, data in `data.py`.

``--quick``: S1 only on 4,000 / 4,000 examples, one seed, single CNNs for 300 epochs, R7 one seed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

# On a shared CPU, OpenMP threads that spin while waiting for a busy core slow every step
# many times over; one thread is fastest for these full-batch runs. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from projects.theory_clusters.data import make_cluster_data
from projects.theory_clusters.train import run_r1, run_r7

# Official notebooks (10 runs), as collected in METHODS.md §15 R1: accuracy, dispatch entropy.
PAPER_ACC = {
    ("S1", "moe_cubic"): "99.46 ± 0.55", ("S1", "moe_linear"): "93.00 ± 2.11",
    ("S1", "single_linear"): "≈ 68–71", ("S1", "single_cubic"): "≈ 73–80",
    ("S2", "moe_cubic"): "98.10 ± 1.56", ("S2", "moe_linear"): "89.49 ± 1.35",
    ("S3", "moe_cubic"): "99.99 ± 0.02", ("S3", "moe_linear"): "95.93 ± 1.34",
    ("S4", "moe_cubic"): "98.92 ± 1.18", ("S4", "moe_linear"): "93.30 ± 1.48",
}
PAPER_ENTROPY = {"moe_cubic": "≈ 0.01–0.18", "moe_linear": "≈ 1.16–1.30"}
R7_EXPECTED = {"learned": "purity > 0.9, MSE ≈ noise (0.01)", "hash": "much higher MSE", "dense": "worst MSE"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["S1", "S2", "S3", "S4"], choices=["S1", "S2", "S3", "S4"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="initialisations of each MoE model")
    p.add_argument("--single-seeds", type=int, nargs="+", default=[0], help="initialisations of each single CNN (S1)")
    p.add_argument("--single-width", type=int, default=64, help="m of the single CNNs")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--n", type=int, default=16000, help="train and test examples each")
    p.add_argument("--single-epochs", type=int, default=800)
    p.add_argument("--r7-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--r7-steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="S1 on 4,000 examples, one seed, R7 one seed")
    args = p.parse_args(argv)
    if args.quick:
        args.settings, args.seeds, args.single_seeds, args.n = ["S1"], args.seeds[:1], args.single_seeds[:1], 4000
        args.single_epochs, args.r7_seeds, args.r7_steps = 300, args.r7_seeds[:1], 1000
    return args


def mean_std(xs, digits: int = 2) -> str:
    """``mean ± std`` (population std over seeds), or the value alone for one seed."""
    m = f"{statistics.mean(xs):.{digits}f}"
    return f"{m} ± {statistics.pstdev(xs):.{digits}f}" if len(xs) > 1 else m


def run_r1_table(args) -> dict:
    """Print one row per (setting, model); return {(setting, model): [R1Result per seed]}."""
    rows = {}
    for setting in args.settings:
        data = make_cluster_data(setting, n_train=args.n, n_test=args.n, seed=args.data_seed)
        models = ["moe_cubic", "moe_linear"] + (["single_linear", "single_cubic"] if setting == "S1" else [])
        for model in models:
            single = model.startswith("single")
            seeds = args.single_seeds if single else args.seeds
            res = [run_r1(model, setting, seed=s, data=data, width=args.single_width if single else None,
                          epochs=args.single_epochs if single else None) for s in seeds]
            acc = mean_std([r.test_acc for r in res])
            ent = "—" if single else mean_std([r.dispatch_entropy for r in res], 3)
            row = (f"{setting:4} {model:14} {acc:>15} {PAPER_ACC.get((setting, model), ''):>14} "
                   f"{ent:>13} {PAPER_ENTROPY.get(model, '—'):>12} {statistics.mean(r.train_acc for r in res):7.2f} "
                   f"{statistics.mean(r.epochs for r in res):7.0f} {statistics.mean(r.seconds for r in res):7.1f}")
            print(row, flush=True)
            rows[setting, model] = res
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    header = (f"{'set':4} {'model':14} {'test acc %':>15} {'paper acc %':>14} {'dispatch H':>13} "
              f"{'paper H':>12} {'train %':>7} {'epochs':>7} {'s/run':>7}")
    print(f"R1 — Chen et al. 2022 ({args.n} train / {args.n} test, data seed {args.data_seed}; "
          f"MoE {args.seeds} seed(s), single CNNs m = {args.single_width}, {args.single_seeds} seed(s))")
    print(header)
    r1 = run_r1_table(args)

    print(f"\nR7 — learned vs hash routing ({args.r7_seeds} seed(s), {args.r7_steps} full-batch Adam steps)")
    print(f"{'model':8} {'test MSE':>15} {'purity':>13} {'s/run':>7}  expected")
    results = [run_r7(seed=s, steps=args.r7_steps) for s in args.r7_seeds]
    for name in ("learned", "hash", "dense"):
        rs = [r[name] for r in results]
        mse = mean_std([r.test_mse for r in rs], 4)
        purity = "—" if rs[0].purity is None else mean_std([r.purity for r in rs], 3)
        print(f"{name:8} {mse:>15} {purity:>13} {statistics.mean(r.seconds for r in rs):7.1f}  {R7_EXPECTED[name]}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s on {args.threads} thread(s)")
    return {"r1": r1, "r7": results}


if __name__ == "__main__":
    main()
