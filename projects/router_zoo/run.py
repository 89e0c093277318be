"""The router zoo (METHODS.md R9): every registered router that suits a causal LM, one model,
equal active FLOPs per token, several seeds.

    python -m projects.router_zoo.run [--quick] [--seeds 0 1 2] [--part 1|2] [--out DIR]

The run is the library's ``routers`` preset: the main job's data (Shakespeare's plays, State
of the Union addresses and Django's source in equal shares, byte-level BPE of 4096 tokens), a
small decoder (d = 64, 2 layers, an MoE of 8 SwiGLU experts in both) and a short schedule (250
steps of 8 windows of 64 tokens), one CPU thread. Its variants are the routers, with expert
widths that equalise active FLOPs (see `zoo`); each trains with the library
trainer (`moekit.train.run_experiment` through `moekit.train.train_seeds`: AdamW through
`moekit.optim.UpdateStep`, warmup and cosine decay), which measures active parameters and FLOPs
from the experts each layer actually used. ``--part 1`` / ``--part 2`` train one half of the zoo
(15 and 6 minutes here for 3 seeds); the summary (``OUT/results.json``, the README's
table, ``OUT/zoo.png``) covers every variant trained so far in ``OUT``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from moekit.analysis import mean_sd
from moekit.train.config import RunConfig, apply_overrides, config_from_dict, get_preset
from moekit.train.experiment import load_results, train_seeds
from projects.router_zoo.zoo import DESCRIPTIONS, F, part_names

# The preset as it is, on one thread (two such trainings share the 2-core machine).
FULL = ["train.threads=1"]
# CI-sized: a small model on the same data, a few steps.
QUICK = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.expert_hidden=32",
         "data.seq_len=32", "data.batch_size=4", "train.steps=4", "train.eval_every=4", "train.eval_batches=1",
         "train.ckpt_every=4", "train.log_every=2", "optim.warmup_steps=1"]


def study_config(*, quick: bool = False) -> RunConfig:
    """The ``routers`` preset (with the quick overrides: a smaller model, a few steps)."""
    d = get_preset("routers").to_dict()
    d["name"] = "router_zoo"
    run = apply_overrides(config_from_dict(d), QUICK if quick else FULL)
    if quick:      # keep the quick model's widths in the same ratios as the full one's
        d = run.to_dict()
        for ov in d["variants"].values():
            if "expert_hidden" in ov:
                ov["expert_hidden"] = max(4, 32 * ov["expert_hidden"] // F)
        run = config_from_dict(d)
    return run


def study(run: RunConfig, out: Path, seeds: Sequence[int], *, parts: Sequence[int] = (1, 2),
          progress: bool = False, log=sys.stderr) -> dict:
    """Train the variants of `parts` for every seed (``out/seed<N>-part<P>``; finished variants
    are kept, not retrained), then summarise every variant trained so far in `out`; writes and
    returns ``out/results.json``."""
    out = Path(out)
    jobs = [(seed, [n for n in part_names(p) if n in run.variant_names], f"seed{seed}-part{p}")
            for seed in seeds for p in parts]
    for _ in train_seeds(run, jobs, out, progress=progress, stream=log):
        pass
    rows = collect(out)
    summary = {"config": run.to_dict(), "variants": rows, "table": summarise(rows)}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def collect(out: Path) -> dict:
    """Per variant, one record per finished seed found under `out`."""
    rows = {}
    for d in sorted(Path(out).glob("seed*-part*")):
        seed = int(d.name[4:].split("-")[0])
        for r in load_results(d):
            if r.get("status") != "completed" or r.get("val_loss") is None:
                continue
            ept = r.get("experts_per_token")
            ev = ept["eval"] if ept else None
            rows.setdefault(r["variant"], []).append({
                "seed": seed, "val_loss": r["val_loss"], "params_total": r["params_total"],
                "params_active": r["params_active"],
                "flops_per_token_forward": r["flops_per_token_forward"],
                "flops_per_token_train": r["flops_per_token_train"],
                "experts_eval": float(np.mean(ev)) if ev else None,
                "experts_train": float(np.mean(ept["train"])) if ept and ept["train"] else None,
                "train_time_s": r["train_time_s"]})
    order = list(DESCRIPTIONS)
    return {k: sorted(rows[k], key=lambda x: x["seed"]) for k in sorted(rows, key=lambda k: (
        order.index(k) if k in order else len(order), k))}


def summarise(rows: dict) -> dict:
    """Mean and sample standard deviation over seeds of what the README table shows."""
    out = {}
    for name, rs in rows.items():
        e = [r["experts_eval"] for r in rs if r["experts_eval"] is not None]
        et = [r["experts_train"] for r in rs if r["experts_train"] is not None]
        out[name] = {"seeds": [r["seed"] for r in rs], "val_loss": mean_sd([r["val_loss"] for r in rs]),
                     "flops_per_token_forward": mean_sd([r["flops_per_token_forward"] for r in rs]),
                     "flops_per_token_train": mean_sd([r["flops_per_token_train"] for r in rs]),
                     "experts_eval": mean_sd(e)[0] if e else None, "experts_train": mean_sd(et)[0] if et else None,
                     "params_total": rs[0]["params_total"],
                     "params_active": mean_sd([r["params_active"] for r in rs])[0],
                     "train_time_s": mean_sd([r["train_time_s"] for r in rs])[0]}
    return out


def markdown(table: dict) -> str:
    """The README's table from `summarise`'s output, best validation loss first."""
    lines = ["| router | seeds | val loss (mean ± sd) | fwd MFLOPs/token (measured) | experts/token eval (train) "
             "| active params | total params | train s |", "|---|---|---|---|---|---|---|---|"]
    for name, t in sorted(table.items(), key=lambda kv: kv[1]["val_loss"][0]):
        ex = "—" if t["experts_eval"] is None else f"{t['experts_eval']:.2f} ({t['experts_train']:.2f})"
        lines.append(f"| {name} | {len(t['seeds'])} | {t['val_loss'][0]:.4f} ± {t['val_loss'][1]:.4f} | "
                     f"{t['flops_per_token_forward'][0] / 1e6:.3f} | {ex} | {t['params_active']:,.0f} | "
                     f"{t['params_total']:,} | {t['train_time_s']:.0f} |")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    """Validation loss (mean ± sd over seeds) against measured forward FLOPs per token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, t in table.items():
        x, y = t["flops_per_token_forward"][0] / 1e6, t["val_loss"]
        ax.errorbar([x], [y[0]], yerr=[y[1]], fmt="s" if name == "dense" else "o", capsize=3,
                    color="black" if name == "dense" else None)
        ax.annotate(name, (x, y[0]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if "dense" in table:
        ax.axhline(table["dense"]["val_loss"][0], color="black", lw=0.6, ls="--")
    ax.set_xlabel("forward MFLOPs per token (measured from the routing taken)")
    ax.set_ylabel("validation loss (nats / BPE token), mean ± sd over seeds")
    ax.set_title("Router zoo at equal nominal active FLOPs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model for a few steps (a CI smoke run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--part", type=int, choices=(1, 2), nargs="+", default=[1, 2],
                    help="which half of the zoo to train (default both)")
    ap.add_argument("--out", default=None, help="run folder (default: runs/router_zoo[-quick])")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of the run (as `moekit train --set`)")
    args = ap.parse_args(argv)
    run = apply_overrides(study_config(quick=args.quick), args.overrides)
    out = Path(args.out or ("runs/router_zoo" + ("-quick" if args.quick else "")))
    t0 = time.time()
    summary = study(run, out, args.seeds, parts=args.part)
    print(markdown(summary["table"]))
    plot(summary["table"], out / "zoo.png")
    print(f"\n{len(args.seeds)} seed(s), part(s) {args.part} in {time.time() - t0:.0f} s; "
          f"results in {out / 'results.json'}, plot {out / 'zoo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
