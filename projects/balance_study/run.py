"""Balance-control study (METHODS.md R8): the Switch balancing loss at α ∈ {0, 1e-3, 1e-2, 1e-1}
against the sigmoid router with aux-loss-free bias balancing (Wang et al. 2024; DeepSeek-V3),
on the main job's model and data; plus the other balancing forms of METHODS.md T1.

    python -m projects.balance_study.run [--quick] [--seeds 0 1 2] [--extra-seeds 0] [--out DIR]

The model and data are those of ``moekit train`` (the ``default`` preset: a 4-layer, d = 128
decoder with an MoE in every layer; Shakespeare's plays, State of the Union addresses and
Django's source, byte-level BPE of 4096 tokens), with R8's E = 16 experts and k = 2 (experts of
hidden 88, so the 16 hold as many parameters as the preset's 8 of hidden 176), trained for a
short schedule (`FULL`) with 2 micro-batches of gradient accumulation per step. Variants:

- ``switch_a0`` … ``switch_a0.1``: softmax top-2 (renormalised gates) with the Switch loss
  ``α · E Σ f P`` at α = 0, 1e-3, 1e-2, 1e-1;
- ``bias``: sigmoid scores, top-2 chosen on ``s + b``, gates from ``s``; ``b`` moves by
  ``u · sign(mean load − load)`` after every optimizer step (u = 1e-3), no loss (α = 0);
- extra rows (``--extra-seeds``): ``gshard_a0.01`` (GShard's first-choice form),
  ``device4_a0.01`` (DeepSeek's device-level loss over 4 groups of 4 experts) and
  ``global_a0.01`` (the Switch loss with f counted over the step's micro-batches).

Every variant is trained by the library trainer (`moekit.train.run_experiment`, AdamW through
`moekit.optim.UpdateStep`, which also runs the bias update). Measured: validation loss (and per
domain); MaxVio per layer (`moekit.analysis.max_vio`) **global** (over all validation batches)
and **per batch** — on the validation batches and over the training steps (each step's routed
counts, logged every step; the mean over the second half of training); routing by domain
(NMI of expert and domain). Results go to ``OUT/results.json``, plots to ``OUT/plots``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from moekit.analysis import domain_specialisation, max_vio, max_violation, probe_routing
from moekit.analysis.plots import have_matplotlib, plot_max_vio
from moekit.train.config import RunConfig, apply_overrides, config_from_dict, get_preset
from moekit.train.data import eval_batches
from moekit.train.experiment import train_seeds, validation_corpus
from moekit.train.metrics import read_metrics
from moekit.train.sample import load_model

ALPHAS = (0.0, 1e-3, 1e-2, 1e-1)
BIAS_RATE = 1e-3                         # u of Wang et al. / DeepSeek-V3
MODEL = ["model.num_experts=16", "model.top_k=2", "model.expert_hidden=88", "model.router=topk"]
# Shorter runs of the main job (the `default` preset trains 600 steps of 24 windows of 128 tokens):
# 250 steps of 2 × 6 windows of 64 tokens; every step's routing is logged for the per-batch MaxVio.
FULL = ["train.steps=250", "data.seq_len=64", "data.batch_size=6", "train.grad_accum=2", "train.eval_every=125",
        "train.eval_batches=8", "train.ckpt_every=250", "train.log_every=1", "optim.warmup_steps=25"]
# CI-sized: a small model on the same data, a few steps.
QUICK = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.num_experts=8", "model.expert_hidden=16",
         "data.seq_len=32", "data.batch_size=4", "train.grad_accum=2", "train.steps=6", "train.eval_every=3",
         "train.eval_batches=2", "train.ckpt_every=6", "train.log_every=1", "optim.warmup_steps=2"]


def alpha_name(a: float) -> str:
    return f"switch_a{a:g}"


def variants(alphas: Sequence[float] = ALPHAS, *, num_experts: int = 16, extras: bool = True) -> dict:
    """The balancing settings compared (model changes over the study's base model)."""
    out = {alpha_name(a): {"router": "topk", "top_k": 2, "aux_loss_coef": float(a)} for a in alphas}
    out["bias"] = {"router": "sigmoid", "top_k": 2, "aux_loss_coef": 0.0,
                   "router_kwargs": {"bias_update_rate": BIAS_RATE}}
    if extras:
        out["gshard_a0.01"] = {"router": "topk", "top_k": 2, "aux_loss_coef": 0.01, "balance_loss": "gshard"}
        out["device4_a0.01"] = {"router": "topk", "top_k": 2, "aux_loss_coef": 0.01, "balance_loss": "device",
                                "balance_devices": 4 if num_experts % 4 == 0 else 1}
        out["global_a0.01"] = {"router": "topk", "top_k": 2, "aux_loss_coef": 0.01, "balance_scope": "global_batch"}
    return out


EXTRAS = ("gshard_a0.01", "device4_a0.01", "global_a0.01")


def study_config(*, quick: bool = False) -> RunConfig:
    """The main job's preset with R8's layer (E = 16, k = 2), these variants and the short schedule."""
    d = get_preset("default").to_dict()
    d["name"] = "balance_study"
    run = apply_overrides(config_from_dict(d), MODEL + (QUICK if quick else FULL))
    d = run.to_dict()
    d["variants"] = variants(num_experts=run.to_dict()["model"]["num_experts"])
    return config_from_dict(d)


def train_max_vio(metrics_path: Path, *, from_fraction: float = 0.5) -> dict:
    """MaxVio per layer of each training step's routed counts (the ``routing`` records, logged
    every step), over the steps after `from_fraction` of training: ``{"batch": [L], "global": [L]}``."""
    recs = read_metrics(metrics_path, kind="routing")
    if not recs:
        raise ValueError(f"{metrics_path}: no routing records (train.log_every must be 1 for per-step counts)")
    counts = np.asarray([r["tokens_per_expert"] for r in recs], dtype=np.float64)      # (steps, L, E)
    start = int(len(recs) * from_fraction)
    out = max_vio(counts[start:])
    return {"batch": out["batch"], "global": out["global"], "steps": [r["step"] for r in recs][start:],
            "curve": max_violation(counts).mean(-1).tolist()}              # per step, mean over layers


def analyse(run: RunConfig, ckpt: Path, val) -> dict:
    """MaxVio per layer on the validation batches (global and per batch) and routing by domain."""
    model, tok, _ = load_model(ckpt)
    batches = eval_batches(val, seq_len=run.data.seq_len, batch_size=run.data.batch_size,
                           max_batches=run.train.eval_batches)
    probe = probe_routing(model, batches, num_docs=len(val.doc_names))
    vio = max_vio(probe.batch_counts)
    out = {"val_max_vio": vio, "layers": probe.layers}
    if val.num_domains > 1:
        dom = domain_specialisation(probe, val.doc_domains.tolist(), val.domain_names)
        out["domain_nmi"] = [d["nmi"] for d in dom]
    return out


def study(run: RunConfig, out: Path, seeds: Sequence[int], *, extra_seeds: Sequence[int] = None,
          progress: bool = False, log=sys.stderr) -> dict:
    """Train every variant for each seed (the extra rows with `extra_seeds`; None: every seed),
    analyse, and write ``out/results.json``; finished variants are kept, not retrained."""
    out = Path(out)
    rows = {v: [] for v in run.variant_names}
    main = [v for v in run.variant_names if v not in EXTRAS]
    extra = [v for v in run.variant_names if v in EXTRAS]
    jobs = [(seed, main, f"seed{seed}") for seed in seeds]
    jobs += [(seed, extra, f"extra-seed{seed}") for seed in (seeds if extra_seeds is None else extra_seeds)]
    val = None
    for seed, result, ckpt in train_seeds(run, jobs, out, progress=progress, stream=log):
        name = result["variant"]
        if val is None:
            val = validation_corpus(run, ckpt)
        rows[name].append({"seed": seed, "val_loss": result["val_loss"],
                           "val_loss_by_domain": result.get("val_loss_by_domain"),
                           "train_time_s": result["train_time_s"],
                           "train_max_vio": train_max_vio(ckpt.parent / "metrics.jsonl"),
                           **analyse(run, ckpt, val)})
    summary = {"config": run.to_dict(), "seeds": list(seeds),
               "extra_seeds": None if extra_seeds is None else list(extra_seeds),
               "variants": rows, "table": summarise(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "plots")
    return summary


def _ms(values) -> list:
    v = np.asarray(values, dtype=np.float64)
    return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]


def summarise(rows: dict) -> dict:
    """Per variant: mean (and sd over seeds) of the validation loss and of each MaxVio, per layer
    and averaged over layers."""
    out = {}
    for name, rs in rows.items():
        if not rs:
            continue
        L = len(rs[0]["layers"])

        def per_layer(get):
            return [_ms([get(r)[j] for r in rs])[0] for j in range(L)]

        t = {"seeds": len(rs), "val_loss": _ms([r["val_loss"] for r in rs]),
             "train_time_s": _ms([r["train_time_s"] for r in rs])[0]}
        for key, get in (("val_global", lambda r: r["val_max_vio"]["global"]),
                         ("val_batch", lambda r: r["val_max_vio"]["batch"]),
                         ("train_batch", lambda r: r["train_max_vio"]["batch"])):
            t[key] = per_layer(get)
            t[key + "_mean"] = _ms([float(np.mean(get(r))) for r in rs])
        if rs[0].get("domain_nmi") is not None:
            t["domain_nmi"] = per_layer(lambda r: r["domain_nmi"])
        if rs[0]["val_loss_by_domain"]:
            t["val_loss_by_domain"] = {d: _ms([r["val_loss_by_domain"][d] for r in rs])[0]
                                       for d in rs[0]["val_loss_by_domain"]}
        out[name] = t
    return out


def markdown(table: dict) -> str:
    """The README's tables from `summarise`'s output."""
    lines = ["| variant | seeds | val loss (mean ± sd) | MaxVio global (val) | MaxVio per batch (val) | "
             "MaxVio per batch (train, 2nd half) | train s |", "|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        lines.append(f"| {name} | {t['seeds']} | {t['val_loss'][0]:.4f} ± {t['val_loss'][1]:.4f} | "
                     f"{t['val_global_mean'][0]:.3f} | {t['val_batch_mean'][0]:.3f} | "
                     f"{t['train_batch_mean'][0]:.3f} ± {t['train_batch_mean'][1]:.3f} | {t['train_time_s']:.0f} |")
    lines += ["", "MaxVio per layer (layers 0 … L−1): global on the validation batches / per training batch "
              "(second half), and NMI(expert; domain) per layer:", "",
              "| variant | MaxVio global (val) | MaxVio per batch (train) | NMI(expert; domain) |", "|---|---|---|---|"]
    for name, t in table.items():
        nmi = " / ".join(f"{v:.3f}" for v in t.get("domain_nmi", [])) or "-"
        lines.append(f"| {name} | " + " / ".join(f"{v:.2f}" for v in t["val_global"]) + " | "
                     + " / ".join(f"{v:.2f}" for v in t["train_batch"]) + f" | {nmi} |")
    return "\n".join(lines)


def plot(summary: dict, folder: Path) -> list:
    """MaxVio per layer of every variant (global and per batch, validation), and the per-step
    training MaxVio (mean over layers, smoothed) of seed 0 — PNGs in `folder` (matplotlib)."""
    if not have_matplotlib() or not summary["table"]:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    vio = {n: {"global": t["val_global"], "batch": t["val_batch"]} for n, t in summary["table"].items()}
    paths = [plot_max_vio(vio, folder / "max_vio_val.png",
                          title="MaxVio per layer on the validation batches (mean over seeds)")]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for name, rs in summary["variants"].items():
        if not rs:
            continue
        curve = np.asarray(rs[0]["train_max_vio"]["curve"])
        k = min(10, len(curve))
        ax.plot(np.convolve(curve, np.ones(k) / k, mode="valid"), label=name)
        t = summary["table"][name]
        bx.errorbar(t["train_batch_mean"][0], t["val_loss"][0], xerr=t["train_batch_mean"][1], yerr=t["val_loss"][1],
                    fmt="o", capsize=3, label=name)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio per batch (mean over layers)")
    ax.set_title("load imbalance during training (seed 0, 10-step mean)", fontsize=9)
    ax.legend(fontsize=7)
    bx.set_xscale("symlog", linthresh=0.1)
    bx.set_xlabel("MaxVio per training batch (2nd half, mean over layers)")
    bx.set_ylabel("validation loss")
    bx.set_title("balance vs loss (mean ± sd over seeds)", fontsize=9)
    bx.legend(fontsize=7)
    p = folder / "train_max_vio.png"
    fig.savefig(p, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return paths + [p]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model for a few steps (a CI smoke run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--extra-seeds", type=int, nargs="*", default=None,
                    help="seeds of the extra rows (gshard, device, global batch); default: every seed")
    ap.add_argument("--out", default=None, help="run folder (default: runs/balance_study[-quick])")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of the run (as `moekit train --set`)")
    args = ap.parse_args(argv)
    run = apply_overrides(study_config(quick=args.quick), args.overrides)
    out = Path(args.out or ("runs/balance_study" + ("-quick" if args.quick else "")))
    t0 = time.time()
    summary = study(run, out, args.seeds, extra_seeds=args.extra_seeds, progress=False)
    print(markdown(summary["table"]))
    print(f"\n{len(args.seeds)} seed(s) x {len(run.variant_names)} variants in {time.time() - t0:.0f} s; "
          f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
